"""Whole-file audio I/O and one-shot resampling.

This is the batch side of audio handling (a WAV given on the command line, test fixtures, benches).
Audio in motion (20 ms frames, streaming resampling) lives in `frames.py` and `resample.py`.

Everything returned here is float32 mono in [-1, 1]: the one internal sample format, so callers
never branch on bit depth or channel count.
"""
from __future__ import annotations

import logging
import math
import os
from typing import BinaryIO, Union

import numpy as np
import soundfile as sf
import soxr

from rejoinder.errors import BadInputError

log = logging.getLogger("rejoinder.streaming.audio")

PathOrFile = Union[str, "os.PathLike[str]", BinaryIO]

MIN_RATE = 8_000
MAX_RATE = 48_000
DEFAULT_MAX_SECONDS = 120.0

# soundfile reports the container as "WAV" for RIFF WAVE, "WAVEX" for WAVE_FORMAT_EXTENSIBLE (what
# many tools write for 24-bit or multichannel) and "RF64" for >4 GiB WAV; all three are WAV to a user.
_WAV_FORMATS = frozenset({"WAV", "WAVEX", "RF64"})


class AudioError(BadInputError):
    """Audio input is unusable; the message is one line meant for a human."""


def _describe(source: PathOrFile) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return getattr(source, "name", "<stream>")


def read_wav(source: PathOrFile, *, max_seconds: float | None = DEFAULT_MAX_SECONDS) -> tuple[np.ndarray, int]:
    """Read a WAV file as float32 mono in [-1, 1]; returns (samples, sample_rate).

    Accepts 8-48 kHz, any channel count (averaged to mono), 8/16/24/32-bit PCM and 32/64-bit float.
    Raises AudioError for anything that is not a readable WAV, empty, longer than `max_seconds`
    (None: no limit) or holding NaN/inf samples. Float files may exceed [-1, 1]; they are clipped
    (with a warning) because every stage downstream assumes that range.
    """
    name = _describe(source)
    try:
        info = sf.info(source)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise AudioError(f"{name}: not a readable audio file ({_short(exc)})") from None
    except OSError as exc:
        raise AudioError(f"{name}: cannot open ({exc.strerror or exc})") from None
    if info.format not in _WAV_FORMATS:
        raise AudioError(f"{name}: not a WAV file (found {info.format_info or info.format})")
    if not MIN_RATE <= info.samplerate <= MAX_RATE:
        raise AudioError(f"{name}: sample rate {info.samplerate} Hz is outside {MIN_RATE}-{MAX_RATE} Hz")
    if info.frames <= 0:
        raise AudioError(f"{name}: the file holds no audio")
    duration = info.frames / info.samplerate
    # Checked from the header, before decoding: a 3-hour file is refused without reading it.
    if max_seconds is not None and duration > max_seconds:
        raise AudioError(f"{name}: {duration:.1f} s of audio is longer than the {max_seconds:g} s limit")
    if not isinstance(source, (str, os.PathLike)) and hasattr(source, "seek"):
        source.seek(0)  # sf.info consumed the header of a file object
    try:
        data, rate = sf.read(source, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise AudioError(f"{name}: the WAV data is damaged ({_short(exc)})") from None
    if data.size == 0:
        raise AudioError(f"{name}: the file holds no audio")
    samples = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(samples).all():
        raise AudioError(f"{name}: the audio contains NaN or infinite samples")
    peak = float(np.abs(samples).max())
    if peak > 1.0:
        log.warning("%s: float samples reach %.2f, clipped to [-1, 1]", name, peak)
        samples = np.clip(samples, -1.0, 1.0)
    return np.ascontiguousarray(samples, dtype=np.float32), int(rate)


def write_wav(path: PathOrFile, samples: np.ndarray, sample_rate: int) -> None:
    """Write mono (1-D) or multichannel (frames x channels) float or int16 samples as 16-bit PCM WAV."""
    data = np.asarray(samples)
    if data.dtype != np.int16:
        data = np.clip(np.nan_to_num(data.astype(np.float32, copy=False)), -1.0, 1.0)
    sf.write(path, data, int(sample_rate), subtype="PCM_16", format="WAV")


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """One-shot high-quality resampling (soxr "HQ") of float32 mono; returns a new float32 array.

    For audio arriving frame by frame use `resample.StreamResampler`, which keeps filter state
    across calls (calling this per frame would click at every frame border).
    """
    x = np.asarray(samples, dtype=np.float32)
    if from_rate <= 0 or to_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {from_rate} -> {to_rate}")
    if from_rate == to_rate or x.size == 0:
        return x.copy()
    return soxr.resample(x, from_rate, to_rate, quality="HQ").astype(np.float32, copy=False)


def duration_s(samples: np.ndarray, sample_rate: int) -> float:
    return len(samples) / float(sample_rate)


def rms_dbfs(samples: np.ndarray) -> float:
    """Level in dBFS (float full scale 1.0); -inf for digital silence."""
    x = np.asarray(samples, dtype=np.float64)
    if x.size == 0:
        return -math.inf
    rms = math.sqrt(float(np.mean(x * x)))
    return 20.0 * math.log10(rms) if rms > 0 else -math.inf


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:120] if text else type(exc).__name__
