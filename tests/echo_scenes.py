"""A synthetic room and the sounds in it: the agent's echo, a second talker, and noises that are not speech.

Everything is made at test time from a seed, so the test set is the same in every run:

- `room_ir(rt60, seed, drr_db)`: a room impulse response: a direct path 2 ms in and a few
  discrete early reflections, then exponentially decaying Gaussian noise (the standard statistical
  model of late reverberation: energy falls 60 dB in `rt60`), scaled to a direct-to-reverberant
  ratio (0 dB: as much energy in the diffuse tail as in the direct sound, a speakerphone on a desk
  about a metre from the microphone); normalised to unit energy, so an echo gain in dB is the
  echo's level relative to the agent's voice as sent.
- `EchoPath`: the loudspeaker-to-microphone path of one caller: what the agent sent, at 16 kHz on a
  sample clock, convolved with the room (FFT, block by block) and returned `delay_s` later at `gain_db`.
- Noises (all 16 kHz float32, peak given), each built from what makes the real sound:
  * `cough`: two bursts of noise through formant resonators (a cough is turbulent air through an
    open vocal tract: broadband, vowel-like resonances, unvoiced), 10 ms attack, ~90 ms decay, the
    second weaker (about 0.35 s in all);
  * `door_knock`: three knocks 0.2 s apart, each a damped low resonance of the door panel (95 and
    190 Hz, ~30 ms decay) plus a 3 ms broadband click of the impact;
  * `noise_burst`: 150 ms of white noise (a bump of the microphone, a hiss);
  * `keyboard`: typing: clicks at 90-220 ms intervals, each a 4 ms click ringing at a random
    2-5 kHz key resonance (~8 ms decay), with a weaker lower thud 40 ms later (the key release).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RATE = 16_000


def room_ir(rt60: float, seed: int = 0, length_s: float | None = None, drr_db: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int((length_s or rt60) * RATE)
    t = np.arange(n) / RATE
    d = int(0.002 * RATE)
    tail = rng.standard_normal(n) * np.exp(-6.9 * t / rt60)  # -60 dB at rt60
    tail[: d + 1] = 0.0
    early = np.zeros(n)
    early[d] = 1.0  # direct path
    for k in range(4):  # early reflections (desk, walls)
        early[int((0.004 + 0.006 * k + 0.004 * rng.random()) * RATE)] += rng.choice([-1.0, 1.0]) * (0.6 - 0.1 * k)
    # Direct-to-reverberant ratio: direct path and early reflections against the diffuse tail.
    tail *= np.sqrt(np.sum(early**2) / np.sum(tail**2) / 10 ** (drr_db / 10))
    h = early + tail
    return (h / np.sqrt(np.sum(h**2))).astype(np.float32)


class EchoPath:
    """What comes back into the microphone from the loudspeaker, block by block."""

    def __init__(self, delay_s: float, gain_db: float, rt60: float = 0.3, seed: int = 0, drr_db: float = 0.0) -> None:
        self.delay = int(round(delay_s * RATE))
        self.gain = float(10 ** (gain_db / 20))
        self.h = room_ir(rt60, seed, drr_db=drr_db)
        self._played = np.zeros(0, np.float32)  # the far end at 16 kHz, sample k at time k / RATE
        self._nfft = 1 << int(np.ceil(np.log2(self.h.size + 2048)))
        self._H = np.fft.rfft(self.h, self._nfft)

    def play(self, at: int, x: np.ndarray) -> None:
        """Far-end samples `x` (16 kHz) leave the loudspeaker at sample `at`."""
        end = at + x.size
        if end > self._played.size:
            self._played = np.concatenate([self._played, np.zeros(end - self._played.size, np.float32)])
        self._played[at:end] = x

    def block(self, at: int, n: int) -> np.ndarray:
        """The echo in microphone samples [at, at + n)."""
        L = self.h.size
        a = at - self.delay - (L - 1)
        seg = np.zeros(n + L - 1, np.float32)
        lo, hi = max(a, 0), min(a + seg.size, self._played.size)
        if hi > lo:
            seg[lo - a : hi - a] = self._played[lo:hi]
        if not seg.any():
            return np.zeros(n, np.float32)
        y = np.fft.irfft(np.fft.rfft(seg, self._nfft) * self._H, self._nfft)
        return (self.gain * y[L - 1 : L - 1 + n]).astype(np.float32)


def _resonator(x: np.ndarray, freq: float, bandwidth: float) -> np.ndarray:
    """Two-pole resonance (a formant), run sample by sample on a short signal."""
    r = np.exp(-np.pi * bandwidth / RATE)
    a1, a2 = 2 * r * np.cos(2 * np.pi * freq / RATE), -r * r
    y = np.zeros_like(x, dtype=np.float64)
    y1 = y2 = 0.0
    for i, v in enumerate(x):
        y0 = v + a1 * y1 + a2 * y2
        y[i] = y0
        y2, y1 = y1, y0
    return y


def _peak(x: np.ndarray, peak: float) -> np.ndarray:
    return (peak * x / max(float(np.abs(x).max()), 1e-9)).astype(np.float32)


def cough(seed: int = 0, peak: float = 0.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.zeros(int(0.36 * RATE))
    for start, amp, dur in ((0.0, 1.0, 0.16), (0.19, 0.6, 0.12)):
        n = int(dur * RATE)
        t = np.arange(n) / RATE
        env = np.minimum(t / 0.01, 1.0) * np.exp(-t / 0.045)
        src = rng.standard_normal(n) * env
        y = sum(g * _resonator(src, f, bw) for f, bw, g in ((600, 250, 1.0), (1300, 300, 0.6), (2600, 400, 0.3)))
        y = y / max(np.abs(y).max(), 1e-9)
        a = int(start * RATE)
        out[a : a + n] += amp * y
    return _peak(out, peak)


def door_knock(seed: int = 0, peak: float = 0.6, knocks: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.zeros(int((0.2 * knocks + 0.15) * RATE))
    n = int(0.15 * RATE)
    t = np.arange(n) / RATE
    for k in range(knocks):
        body = np.exp(-t / 0.03) * (np.sin(2 * np.pi * 95 * t) + 0.5 * np.sin(2 * np.pi * 190 * t + 1.0))
        click = np.zeros(n)
        c = int(0.003 * RATE)
        click[:c] = rng.standard_normal(c) * np.linspace(1, 0, c)
        a = int((0.2 * k + 0.01 * rng.random()) * RATE)
        out[a : a + n] += (1.0 - 0.1 * k) * (body + 0.8 * click)
    return _peak(out, peak)


def noise_burst(seed: int = 0, peak: float = 0.6, seconds: float = 0.15) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return _peak(np.clip(rng.standard_normal(int(seconds * RATE)), -3, 3), peak)


def keyboard(seed: int = 0, peak: float = 0.4, seconds: float = 1.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.zeros(int((seconds + 0.1) * RATE))
    n = int(0.03 * RATE)
    t = np.arange(n) / RATE
    pos = 0.0
    while pos < seconds:
        f = rng.uniform(2000, 5000)
        click = rng.standard_normal(n) * np.exp(-t / 0.002)
        ring = np.exp(-t / 0.008) * np.sin(2 * np.pi * f * t)
        a = int(pos * RATE)
        out[a : a + n] += rng.uniform(0.6, 1.0) * (click + 0.7 * ring)
        r = a + int(0.04 * RATE)
        if r + n <= out.size:
            out[r : r + n] += 0.3 * np.exp(-t / 0.01) * np.sin(2 * np.pi * rng.uniform(300, 800) * t)
        pos += rng.uniform(0.09, 0.22)
    return _peak(out, peak)


NOISES = {"cough": cough, "door_knock": door_knock, "noise_burst": noise_burst, "keyboard": keyboard}


@dataclass(frozen=True)
class Room:
    """One caller's acoustics: the echo path and the microphone's own noise floor."""

    delay_s: float = 0.12
    gain_db: float = -6.0
    rt60: float = 0.3
    seed: int = 0
    noise_floor_db: float = -65.0  # white noise RMS in dBFS
    drr_db: float = 0.0  # direct-to-reverberant ratio of the loudspeaker-to-microphone path

    def echo_path(self) -> EchoPath:
        return EchoPath(self.delay_s, self.gain_db, self.rt60, self.seed, self.drr_db)

    def mic_noise(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return (10 ** (self.noise_floor_db / 20) * rng.standard_normal(n)).astype(np.float32)
