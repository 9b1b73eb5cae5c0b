"""Test speech, synthesised at test time, and the shared model instances that tests reuse.

Two voices, so no test passes because of one synthesiser's quirks:
- Piper (`en_US-joe-medium`, the product's own TTS voice, neural),
- espeak-ng (formant synthesis, very different spectrum), through its CLI.

Everything is cached for the whole pytest session (functools.lru_cache): synthesising and loading
models dominate test time on a 2-core CPU. Returned arrays are read-only so one test cannot corrupt
another's input; copy before modifying.

Import from a test module as `from speech import piper_say` (pytest puts tests/ on sys.path).
"""
from __future__ import annotations

import functools
import io
import shutil
import subprocess
from dataclasses import dataclass

import numpy as np
import pytest

from rejoinder.streaming.assets import resolve
from rejoinder.streaming.audio import read_wav, resample

RATE = 16_000


def _frozen(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    x.setflags(write=False)
    return x


@functools.lru_cache(maxsize=1)
def piper_voice():
    from piper import PiperVoice

    return PiperVoice.load(resolve("tts"))


@functools.cache
def piper_say(text: str, rate: int = RATE, length_scale: float | None = None, natural: bool = False) -> np.ndarray:
    """`text` spoken by Piper, float32 mono at `rate` (leading/trailing silence as Piper makes it).

    Piper (VITS) samples noise for timing and timbre, so by default the noise is switched off: the
    same text then gives the same waveform in every run and a test cannot pass or fail by the draw.
    `natural=True` keeps the voice's own noise settings (what the product plays).
    """
    from piper import SynthesisConfig

    voice = piper_voice()
    cfg = SynthesisConfig(length_scale=length_scale)
    if not natural:
        cfg.noise_scale = 0.0
        cfg.noise_w_scale = 0.0
    chunks = list(voice.synthesize(text, syn_config=cfg))
    audio = np.concatenate([c.audio_float_array for c in chunks]).astype(np.float32)
    return _frozen(resample(audio, chunks[0].sample_rate, rate))


def have_espeak() -> bool:
    return shutil.which("espeak-ng") is not None


@functools.cache
def espeak_say(text: str, rate: int = RATE, words_per_minute: int = 150, voice: str = "en-us") -> np.ndarray:
    """`text` spoken by espeak-ng (skips the calling test when the CLI is missing)."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    wav = subprocess.run(
        [exe, "-v", voice, "-s", str(words_per_minute), "--stdout", text], check=True, capture_output=True
    ).stdout
    audio, sr = read_wav(io.BytesIO(wav), max_seconds=None)
    return _frozen(resample(audio, sr, rate))


def silence(seconds: float, rate: int = RATE) -> np.ndarray:
    return np.zeros(int(round(seconds * rate)), dtype=np.float32)


def trim(audio: np.ndarray, threshold: float = 0.01) -> np.ndarray:
    """Cut leading/trailing near-silence, so ground-truth speech boundaries are where the voice is."""
    idx = np.flatnonzero(np.abs(audio) > threshold)
    return audio[idx[0] : idx[-1] + 1] if idx.size else audio[:0]


@dataclass(frozen=True)
class Dialogue:
    audio: np.ndarray
    spans: tuple[tuple[float, float], ...]  # ground truth (start_s, end_s) of each utterance
    rate: int = RATE


def dialogue(*parts: np.ndarray | float, rate: int = RATE) -> Dialogue:
    """Concatenate utterances (arrays, trimmed) and pauses (floats, seconds) with known boundaries."""
    pieces: list[np.ndarray] = []
    spans: list[tuple[float, float]] = []
    t = 0
    for p in parts:
        if isinstance(p, (int, float)):
            chunk = silence(float(p), rate)
        else:
            chunk = trim(np.asarray(p, dtype=np.float32))
            spans.append((t / rate, (t + chunk.size) / rate))
        pieces.append(chunk)
        t += chunk.size
    return Dialogue(_frozen(np.concatenate(pieces)), tuple(spans), rate)


# A pool of plain sentences (no numbers, no names): WER then measures recognition, not normalisation.
SENTENCES = (
    "The weather is lovely today and the park is full of people.",
    "Please remind me to call my sister after lunch tomorrow.",
    "I would like a cup of coffee with a little milk.",
    "The library closes early on the weekend, so we should hurry.",
    "Could you tell me how to get to the train station from here?",
    "My favourite season is autumn because the leaves change colour.",
    "We planted tomatoes and beans in the garden last spring.",
    "The meeting has been moved to the afternoon, after the break.",
    "She opened the window to let some fresh air into the room.",
    "Turn left at the bakery and walk straight for a few minutes.",
    "He forgot his umbrella at home and got wet in the rain.",
    "Reading a good book before bed helps me fall asleep.",
)


def long_text(min_words: int) -> str:
    """Sentences from the pool, in order, until at least `min_words` words."""
    out: list[str] = []
    n = 0
    i = 0
    while n < min_words:
        s = SENTENCES[i % len(SENTENCES)]
        out.append(s)
        n += len(s.split())
        i += 1
    return " ".join(out)


@functools.lru_cache(maxsize=1)
def shared_whisper():
    """One Whisper model for the whole session (loading costs ~1 s and ~150 MB)."""
    from rejoinder.streaming.asr import WhisperASR

    return WhisperASR()


def words_heard(said: str, heard: str) -> float:
    """Share of the words of `said` that are in `heard` (as a bag: order and extra words aside).

    For checking that synthesised speech came through, where WER is too strict for this voice: Piper
    says "France is" much like "Francis" (Whisper writes that for 2 of 5 clean syntheses of "The
    capital of France is Paris.", 2 errors in 6 words) and Whisper sometimes adds a word after the
    end of the audio ("... Paris. Congress."); through Opus "Paris" is now and then "Peris". Audio
    that broke up loses words, and fails this (the sender's own count of holes is asserted apart).
    """
    from collections import Counter

    from rejoinder.streaming.text_metrics import normalized_words

    want, got = Counter(normalized_words(said)), Counter(normalized_words(heard))
    return sum((want & got).values()) / max(1, sum(want.values()))
