"""Audio in LiveKit's shape for the LiveKit tests: int16 `rtc.AudioFrame`s from float test speech, and back.

Import from a test module as `from livekit_audio import rtc_frames` (pytest puts tests/ on sys.path).
"""
from __future__ import annotations

import numpy as np
from livekit import rtc
from speech import RATE

from rejoinder.streaming.audio import resample


def pcm16(x: np.ndarray) -> np.ndarray:
    return (np.clip(np.asarray(x, np.float32), -1, 1) * 32767).astype(np.int16)


def rtc_frames(samples_16k: np.ndarray, rate: int = 48_000, frame_ms: int = 10) -> list[rtc.AudioFrame]:
    x = pcm16(resample(np.asarray(samples_16k, np.float32), RATE, rate))
    n = rate * frame_ms // 1000
    return [rtc.AudioFrame(x[i : i + n].tobytes(), rate, 1, len(x[i : i + n])) for i in range(0, x.size - n + 1, n)]


def frames_to_float(frames: list[rtc.AudioFrame]) -> tuple[np.ndarray, int]:
    f = rtc.combine_audio_frames(frames)
    return np.frombuffer(f.data, np.int16).astype(np.float32) / 32768.0, f.sample_rate
