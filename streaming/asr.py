"""Batch speech recognition: faster-whisper (CTranslate2) behind a small typed wrapper.

`WhisperASR.transcribe` turns one 16 kHz buffer into a `Transcript` with word timestamps. It is
synchronous and CPU-heavy (hundreds of ms): async callers run it in a worker thread
(`asr_stream.StreamingASR` does). The streaming layer is built on top of this one call.

The model is only ever loaded from a local directory (the embedded package's joined copy, or a path
the user gives); a hub name is refused rather than downloaded.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .assets import AssetError, resolve

log = logging.getLogger("rejoinder.streaming.asr")

ASR_RATE = 16_000


@dataclass(frozen=True)
class Word:
    """One recognised word; times are seconds from the start of the buffer given (plus any offset).
    `text` keeps Whisper's leading space, so "".join(w.text for w in words) is the running text."""

    text: str
    start_s: float
    end_s: float
    probability: float


@dataclass(frozen=True)
class TranscriptSegment:
    text: str
    start_s: float
    end_s: float
    words: tuple[Word, ...] = ()
    avg_logprob: float = 0.0
    no_speech_prob: float = 0.0


@dataclass(frozen=True)
class Transcript:
    text: str  # stripped, single-spaced
    segments: tuple[TranscriptSegment, ...]
    duration_s: float  # audio duration transcribed
    language: str
    decode_s: float = 0.0  # wall-clock cost of the call
    words: tuple[Word, ...] = field(default=())


class WhisperASR:
    """faster-whisper on a local CTranslate2 model directory.

    Defaults are tuned for interactive use on a small CPU: int8 weights, greedy decoding
    (beam_size=1), a single temperature (no fallback re-decodes, whose cost is unpredictable),
    English, no conditioning on previous windows (the streaming layer passes its own prompt).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike | None = None,
        compute_type: str = "int8",
        cpu_threads: int = 0,
        language: str | None = "en",
        beam_size: int = 1,
        *,
        device: str = "cpu",
        temperatures: Sequence[float] = (0.0,),
    ) -> None:
        from faster_whisper import WhisperModel  # heavy import (ctranslate2): pay it only when used

        path = Path(model_dir) if model_dir is not None else resolve("asr")
        if not (path / "model.bin").is_file():
            raise AssetError(f"not a CTranslate2 Whisper model directory (no model.bin): {path}")
        self.model_dir = path
        self.language = language
        self.beam_size = beam_size
        self.temperatures = tuple(temperatures)
        t0 = time.perf_counter()
        # A directory path never touches the hub; local_files_only guards the day someone passes a name.
        self._model = WhisperModel(
            str(path), device=device, compute_type=compute_type, cpu_threads=cpu_threads, local_files_only=True
        )
        # CTranslate2 serialises calls on one worker anyway; the lock makes that explicit and keeps
        # two threads from interleaving their lazy segment generators.
        self._lock = threading.Lock()
        log.info("Whisper loaded from %s (%s, %.2f s)", path, compute_type, time.perf_counter() - t0)

    def transcribe(
        self,
        samples_16k: np.ndarray,
        *,
        prompt: str | None = None,
        word_timestamps: bool = True,
        offset_s: float = 0.0,
    ) -> Transcript:
        """Transcribe float32 mono 16 kHz audio. `prompt` is previous text that conditions the
        decoder (continuity of spelling and style); `offset_s` is added to every time reported."""
        audio = np.ascontiguousarray(samples_16k, dtype=np.float32).reshape(-1)
        duration = audio.size / ASR_RATE
        if audio.size < ASR_RATE // 10:  # < 100 ms: nothing to recognise, and Whisper may hallucinate
            return Transcript("", (), duration, self.language or "", 0.0, ())
        t0 = time.perf_counter()
        with self._lock:
            seg_iter, info = self._model.transcribe(
                audio,
                language=self.language,
                beam_size=self.beam_size,
                best_of=1,
                temperature=list(self.temperatures),
                condition_on_previous_text=False,
                initial_prompt=prompt or None,
                word_timestamps=word_timestamps,
                vad_filter=False,
            )
            raw = list(seg_iter)  # the generator does the actual decoding: consume under the lock
        segments: list[TranscriptSegment] = []
        words: list[Word] = []
        for s in raw:
            ws = tuple(
                Word(w.word, float(w.start) + offset_s, float(w.end) + offset_s, float(w.probability)) for w in (s.words or ())
            )
            words.extend(ws)
            segments.append(
                TranscriptSegment(
                    s.text, float(s.start) + offset_s, float(s.end) + offset_s, ws,
                    float(s.avg_logprob), float(s.no_speech_prob),
                )
            )
        text = " ".join("".join(s.text for s in segments).split())
        dt = time.perf_counter() - t0
        log.debug("transcribed %.2f s of audio in %.3f s: %r", duration, dt, text[:80])
        return Transcript(text, tuple(segments), duration, info.language, dt, tuple(words))
