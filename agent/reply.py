"""One spoken question in, one spoken answer out: the batch pipeline behind `rejoinder reply`.

    audio -> 16 kHz -> VAD (is there speech at all?) -> Whisper -> engine (persona + question) -> Piper
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rejoinder.streaming.asr import ASR_RATE
from rejoinder.streaming.audio import AudioError, read_wav, resample, write_wav
from rejoinder.streaming.vad import speech_segments

from .config import AgentConfig
from .models import Models


class NoSpeechError(AudioError):
    """The input holds no speech (silence or noise only)."""


@dataclass
class StageTimings:
    load_s: float = 0.0
    asr_s: float = 0.0
    llm_ttft_s: float = 0.0
    llm_total_s: float = 0.0
    llm_tokens: int = 0
    llm_tok_s: float = 0.0
    tts_s: float = 0.0
    total_s: float = 0.0  # ASR start -> answer audio ready (excludes model loading)


@dataclass
class Reply:
    transcript: str
    answer: str
    audio: np.ndarray = field(repr=False)
    sample_rate: int
    timings: StageTimings

    def as_json(self) -> dict:
        return {"transcript": self.transcript, "answer": self.answer, "timings": asdict(self.timings)}


def answer_text(models: Models, cfg: AgentConfig, question: str, timings: StageTimings) -> str:
    messages = [{"role": "system", "content": cfg.persona}, {"role": "user", "content": question}]
    t0 = time.perf_counter()
    tokens = [ev.token_id for ev in models.engine.generate(models.engine.chat_ids(messages), cfg.sampling_params())]
    stats = models.engine.last_stats
    timings.llm_total_s = time.perf_counter() - t0
    timings.llm_ttft_s = stats.ttft_s
    timings.llm_tokens = stats.new_tokens
    timings.llm_tok_s = stats.decode_tok_s
    return models.engine.tokenizer.decode(tokens).strip()


def reply_to_audio(models: Models, cfg: AgentConfig, samples: np.ndarray, sample_rate: int) -> Reply:
    timings = StageTimings(load_s=models.load_s)
    t_start = time.perf_counter()
    audio16 = resample(samples, sample_rate, ASR_RATE)
    if not speech_segments(audio16, vad=models.vad):
        raise NoSpeechError("no speech found in the input (silence or noise only)")
    t0 = time.perf_counter()
    transcript = models.asr.transcribe(audio16, word_timestamps=False).text.strip()
    timings.asr_s = time.perf_counter() - t0
    if not transcript:
        raise NoSpeechError("speech was detected but nothing intelligible was recognised")
    answer = answer_text(models, cfg, transcript, timings)
    if not answer:
        answer = "Sorry, I have no answer to that."
    t0 = time.perf_counter()
    audio = models.tts.synthesize(answer)
    timings.tts_s = time.perf_counter() - t0
    timings.total_s = time.perf_counter() - t_start
    return Reply(transcript, answer, audio, models.tts.sample_rate, timings)


def reply_to_file(models: Models, cfg: AgentConfig, in_path: Path, out_path: Path) -> Reply:
    samples, rate = read_wav(in_path, max_seconds=cfg.max_input_seconds)
    reply = reply_to_audio(models, cfg, samples, rate)
    write_wav(out_path, reply.audio, reply.sample_rate)
    return reply
