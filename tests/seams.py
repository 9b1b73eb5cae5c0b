"""How audible is a join between two synthesised pieces? Measures shared by tests and bench/first_audio.py.

Every bound is read off a *continuous* synthesis of the same text by the same voice (what a join
must not exceed is what the voice itself does inside one utterance), never a magic number:

* gap: the run of silence a join sits in (5 ms windows more than `SILENCE_DB` below the speech
  level, the 95th percentile window of the continuous audio);
* jump: the largest sample-to-sample step within 2 ms of the join, relative to the signal's local
  RMS (±10 ms, floored at the silence level) — a click is a step far larger than its surroundings;
* flux: positive spectral flux (11.6 ms Hann frames, 5.8 ms hop), broadband and above 5 kHz, in the
  frames around the join — a click or a cut through a vowel is a broadband burst of new energy.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

SILENCE_DB = 45.0  # a window this far below the speech level is silence
_WIN_S = 0.005
_FFT = 256
_HOP = 128
_HF_HZ = 5000.0


@dataclass(frozen=True)
class Reference:
    """What the voice does inside one continuous utterance."""

    silence_level: float  # RMS under which a 5 ms window is silence
    max_jump: float
    max_flux: float
    max_hf_flux: float
    gaps_s: tuple[float, ...]  # the pauses inside the utterance (voice onset to offset only)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Join:
    at_s: float
    gap_s: float
    jump: float
    flux: float
    hf_flux: float

    def as_dict(self) -> dict:
        return asdict(self)


def _float(audio: np.ndarray) -> np.ndarray:
    a = np.asarray(audio)
    if a.dtype == np.int16:
        return a.astype(np.float32) / 32768.0
    return a.astype(np.float32, copy=False)


def _window_rms(x: np.ndarray, rate: int) -> np.ndarray:
    w = max(1, int(round(_WIN_S * rate)))
    k = x.size // w
    if k == 0:
        return np.zeros(0)
    return np.sqrt(np.mean(np.square(x[: k * w].reshape(k, w), dtype=np.float64), axis=1))


def _jump_ratio(x: np.ndarray, rate: int, floor: float) -> np.ndarray:
    """|x[n] - x[n-1]| / local RMS, per sample (index n-1)."""
    d = np.abs(np.diff(x.astype(np.float64)))
    half = max(1, int(0.010 * rate))
    sq = np.concatenate([[0.0], np.cumsum(np.square(x.astype(np.float64)))])
    idx = np.arange(d.size)
    lo = np.clip(idx - half, 0, x.size)
    hi = np.clip(idx + half, 0, x.size)
    local = np.sqrt((sq[hi] - sq[lo]) / np.maximum(hi - lo, 1))
    return d / np.maximum(local, floor)


def _flux(x: np.ndarray, rate: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(frame centres in samples, broadband flux, flux above 5 kHz)."""
    if x.size < _FFT + _HOP:
        z = np.zeros(0)
        return z, z, z
    n = 1 + (x.size - _FFT) // _HOP
    frames = np.lib.stride_tricks.sliding_window_view(x, _FFT)[::_HOP][:n] * np.hanning(_FFT)
    mag = np.abs(np.fft.rfft(frames, axis=1))
    pos = np.maximum(np.diff(mag, axis=0), 0.0)
    hf = np.fft.rfftfreq(_FFT, 1.0 / rate) >= _HF_HZ
    centres = np.arange(1, n) * _HOP + _FFT // 2
    return centres, pos.sum(axis=1), pos[:, hf].sum(axis=1)


def _silent_runs(rms: np.ndarray, level: float) -> list[tuple[int, int]]:
    """[start, stop) window indices of silent runs between the first and last voiced window."""
    voiced = np.flatnonzero(rms > level)
    if voiced.size == 0:
        return []
    runs, start = [], None
    for i in range(int(voiced[0]), int(voiced[-1]) + 1):
        if rms[i] <= level:
            start = i if start is None else start
        elif start is not None:
            runs.append((start, i))
            start = None
    return runs


def reference(audio: np.ndarray, rate: int) -> Reference:
    x = _float(audio)
    rms = _window_rms(x, rate)
    level = float(np.percentile(rms, 95)) * 10 ** (-SILENCE_DB / 20)
    _, flux, hf = _flux(x, rate)
    gaps = tuple(round((b - a) * _WIN_S, 3) for a, b in _silent_runs(rms, level))
    return Reference(level, float(_jump_ratio(x, rate, level).max()), float(flux.max()), float(hf.max()), gaps)


def joins(pieces: Sequence[np.ndarray], rate: int, ref: Reference) -> tuple[np.ndarray, list[Join]]:
    """Concatenate `pieces` (as played back to back) and measure every border between two of them."""
    xs = [_float(p) for p in pieces]
    x = np.concatenate(xs) if xs else np.zeros(0, dtype=np.float32)
    borders = np.cumsum([p.size for p in xs])[:-1]
    rms = _window_rms(x, rate)
    w = max(1, int(round(_WIN_S * rate)))
    runs = _silent_runs(rms, ref.silence_level)
    ratio = _jump_ratio(x, rate, ref.silence_level)
    centres, flux, hf = _flux(x, rate)
    near_j, near_f = int(0.002 * rate), int(0.020 * rate)
    out = []
    for b in borders:
        wi = int(b) // w
        # the silent run the border lies in, or that ends or starts right at it
        gap = max(((e - s) * _WIN_S for s, e in runs if s - 1 <= wi <= e), default=0.0)
        lo, hi = max(0, int(b) - near_j), min(ratio.size, int(b) + near_j)
        sel = np.abs(centres - int(b)) <= near_f
        out.append(Join(
            at_s=round(float(b) / rate, 4), gap_s=round(gap, 3),
            jump=float(ratio[lo:hi].max()) if hi > lo else 0.0,
            flux=float(flux[sel].max()) if sel.any() else 0.0,
            hf_flux=float(hf[sel].max()) if sel.any() else 0.0,
        ))
    return x, out


def level_step_db(gains: Sequence[float]) -> float:
    """Spread of the gains applied to the pieces of one sentence (0 dB: one level throughout)."""
    g = [v for v in gains if v > 0]
    return float(20 * np.log10(max(g) / min(g))) if len(g) > 1 else 0.0
