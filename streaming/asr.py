"""Batch speech recognition: faster-whisper (CTranslate2) behind a small typed wrapper.

`WhisperASR.transcribe` turns one 16 kHz buffer into a `Transcript` with word timestamps. It is
synchronous and CPU-heavy (hundreds of ms): async callers run it in a worker thread
(`asr_stream.StreamingASR` does). The streaming layer is built on top of this one call.

The model is only ever loaded from a local directory (the embedded package's joined copy, or a path
the user gives); a hub name is refused rather than downloaded.

Short encoder context. Whisper was trained on 30 s windows and faster-whisper pads every buffer to
30 s of features, so a 2 s question costs the encoder as much as 30 s of speech (~0.5 s on two CPU
cores, most of a pass). CTranslate2's encoder accepts fewer frames, so by default the features are
cut to the audio plus `context_pad_s` of padding (at least `min_context_s`) -- the trick whisper.cpp
exposes as `audio_ctx`. `python bench/asr_context.py` (72 synthesised clips, 0.4-10.5 s, Piper and
espeak-ng, clean and noisy) measured word error rate 0.103 vs 0.100 for the full window and 2.6x
less decode time (3.2x on clips under 2 s). Too little padding makes Whisper loop ("yes, yes, yes,
...", a sentence twice) or stop at once -- seen at 1.5-3 s of padding -- so a result that is empty
or looks degenerate (repetitive, a phrase said twice in a row, more words than anyone can say in
the time) is decoded again with the full 30 s context.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .assets import AssetError, resolve
from .text_metrics import normalize_text

log = logging.getLogger("rejoinder.streaming.asr")

ASR_RATE = 16_000
# Encoder context = audio + DEFAULT_CONTEXT_PAD_S, at least DEFAULT_MIN_CONTEXT_S (module docstring).
DEFAULT_CONTEXT_PAD_S = 5.0
DEFAULT_MIN_CONTEXT_S = 8.0


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
    context_s: float = 30.0  # encoder context the kept result was decoded with
    retried_full_context: bool = False  # the short-context result looked degenerate and was redone


# Above these a transcript is treated as a decoding loop: 2.4 is the compression ratio Whisper's own
# fallback uses; nobody speaks more than ~6 words a second.
_MAX_COMPRESSION_RATIO = 2.4
_MAX_WORDS_PER_S = 6.0


_MIN_REPEATED_PHRASE = 3  # "stop, stop" is speech; "the capital of ... the capital of ..." is a loop


def looks_degenerate(text: str, duration_s: float) -> bool:
    """True for the output of a decoding loop: highly repetitive, a phrase said twice in a row, or
    too many words for the audio. (A person can repeat themselves; then the retry costs a pass.)"""
    data = text.encode("utf-8")
    if len(data) >= 24 and len(data) / len(zlib.compress(data)) > _MAX_COMPRESSION_RATIO:
        return True
    words = normalize_text(text).split()
    if len(words) > 2 + _MAX_WORDS_PER_S * duration_s:
        return True
    for n in range(_MIN_REPEATED_PHRASE, len(words) // 2 + 1):
        if any(words[i : i + n] == words[i + n : i + 2 * n] for i in range(len(words) - 2 * n + 1)):
            return True
    return False


def _trimmed_model_class():
    from faster_whisper import WhisperModel  # heavy import (ctranslate2): pay it only when used

    class TrimmedContextWhisper(WhisperModel):
        """WhisperModel whose encoder sees only the first `context_frames` feature frames."""

        context_frames: int | None = None

        def encode(self, features):  # type: ignore[override]
            n = self.context_frames
            if n is not None and features.shape[-1] > n:
                features = features[..., :n]
            return super().encode(features)

    return TrimmedContextWhisper


class WhisperASR:
    """faster-whisper on a local CTranslate2 model directory.

    Defaults are tuned for interactive use on a small CPU: int8 weights, greedy decoding
    (beam_size=1), a single temperature (no fallback re-decodes, whose cost is unpredictable),
    English, no conditioning on previous windows (the streaming layer passes its own prompt), and a
    short encoder context (module docstring; `context_pad_s=None` restores the full 30 s).
    """

    FRAMES_PER_S = 100  # Whisper's mel hop is 10 ms

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
        context_pad_s: float | None = DEFAULT_CONTEXT_PAD_S,
        min_context_s: float = DEFAULT_MIN_CONTEXT_S,
    ) -> None:
        if context_pad_s is not None and (context_pad_s < 0 or min_context_s <= 0):
            raise ValueError("context_pad_s must be >= 0 (or None for the full context) and min_context_s > 0")
        path = Path(model_dir) if model_dir is not None else resolve("asr")
        if not (path / "model.bin").is_file():
            raise AssetError(f"not a CTranslate2 Whisper model directory (no model.bin): {path}")
        self.model_dir = path
        self.language = language
        self.beam_size = beam_size
        self.temperatures = tuple(temperatures)
        self.context_pad_s = context_pad_s
        self.min_context_s = min_context_s
        t0 = time.perf_counter()
        # A directory path never touches the hub; local_files_only guards the day someone passes a name.
        self._model = _trimmed_model_class()(
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
        context_s = self.context_for(duration)
        retried = False
        with self._lock:
            raw, info = self._decode(audio, context_s, prompt, word_timestamps)
            first = "".join(s.text for s in raw)
            # Nothing heard is suspect too: a too-short context can also make Whisper stop at once.
            if context_s < 30.0 and (not first.strip() or looks_degenerate(first, duration)):
                log.debug("%.1f s context gave %r; decoding again with 30 s", context_s, first[:40])
                context_s, retried = 30.0, True
                raw, info = self._decode(audio, context_s, prompt, word_timestamps)
        segments: list[TranscriptSegment] = []
        words: list[Word] = []
        for s in raw:
            ws = tuple(
                Word(w.word, float(w.start) + offset_s, float(w.end) + offset_s, float(w.probability))
                for w in (s.words or ())
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
        log.debug("transcribed %.2f s of audio in %.3f s (%.1f s context): %r", duration, dt, context_s, text[:80])
        return Transcript(text, tuple(segments), duration, info.language, dt, tuple(words), context_s, retried)

    def context_for(self, duration_s: float) -> float:
        """Seconds of encoder context used for `duration_s` of audio (30 = Whisper's full window)."""
        if self.context_pad_s is None:
            return 30.0
        return min(30.0, max(self.min_context_s, duration_s + self.context_pad_s))

    def _decode(self, audio: np.ndarray, context_s: float, prompt: str | None, word_timestamps: bool):
        # Caller holds self._lock: the encoder context is per call, and the generator must be consumed
        # (that is where the decoding happens) before another call changes it.
        frames = int(context_s * self.FRAMES_PER_S) // 2 * 2  # the encoder's first conv has stride 2
        self._model.context_frames = None if context_s >= 30.0 else frames
        try:
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
            return list(seg_iter), info
        finally:
            self._model.context_frames = None
