"""Server-side echo guard: is what the microphone hears right now the agent's own voice?

Without (or despite) echo cancellation at the far end, the agent's speech can come back through
the user's microphone, and a VAD cannot tell it from the user: the agent would interrupt itself.
`EchoGuard` keeps the last few seconds of what was sent (the reference) and of what was received,
both at 16 kHz on the monotonic clock, and scores an input stretch by its best normalised
cross-correlation with the reference over the plausible echo delays. An echo is a delayed, filtered,
attenuated copy of the reference, so it correlates strongly (0.6-1.0); a person talking over the
agent does not (< 0.3), whatever the levels.

Behind the echo canceller (streaming/aec.py) the guard sees what the canceller left: now and then
a burst of residual echo (while it converges, or a reverberant tail it under-estimates) that the
VAD takes for speech. The residual is still the agent's voice, but filtered and suppressed band by
band, so it correlates less (0.34-0.45 on bench/echo_barge_in.py's room, where the second talker's
cleaned speech scores 0.10-0.28): such input is judged against `cleaned_threshold`.

`EchoPathDetector` asks the question once per call, on the input as it arrives: does the agent's
voice come back at all? While the agent speaks it scores each second of input against the
reference; an echo path, however reverberant or quiet, scores 0.3-0.8 there (bench/echo_barge_in.py's
rooms: -20 to 0 dB, 20-250 ms, RT60 0.2-0.4 s, diffuse), a caller talking over the agent without
one (a headset, a browser that cancelled its own echo) or noise at most 0.23. The echo canceller
engages when it finds one (streaming/aec.py, `mode="auto"`).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np

from rejoinder.errors import ConfigError

from .frames import AudioFrame

__all__ = ["EchoGuard", "EchoGuardConfig", "EchoPathDetector", "to_16k_linear"]

RATE = 16_000


@dataclass(frozen=True)
class EchoGuardConfig:
    threshold: float = 0.6  # correlation at or above which input counts as echo
    cleaned_threshold: float = 0.32  # the same, for input through the echo canceller (see the module docstring)
    max_delay_s: float = 0.6  # longest echo path considered (playout buffers + network + device)
    history_s: float = 4.0  # reference and input kept this long
    min_reference_rms: float = 1e-3  # the agent must have actually said something in the window

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"echo threshold must be in (0, 1], got {self.threshold}")
        if not 0.0 < self.cleaned_threshold <= 1.0:
            raise ConfigError(f"echo cleaned_threshold must be in (0, 1], got {self.cleaned_threshold}")
        if not 0.0 < self.max_delay_s < self.history_s:
            raise ConfigError("need 0 < echo max_delay_s < echo history_s")
        if self.min_reference_rms < 0:
            raise ConfigError("echo min_reference_rms must be >= 0")


def to_16k_linear(x: np.ndarray, rate: int) -> np.ndarray:
    """One frame to 16 kHz by linear interpolation, frame by frame.

    A streaming resampler releases its output in bursts (soxr buffers), which would misplace audio
    on a timeline keyed by send time; echo scoring needs timing more than fidelity, and a 20 ms
    frame maps to exactly 320 samples this way.
    """
    if rate == RATE or x.size == 0:
        return np.asarray(x, np.float32)
    n_out = max(1, int(round(x.size * RATE / rate)))
    pos = np.arange(n_out, dtype=np.float64) * (rate / RATE)
    return np.interp(pos, np.arange(x.size), x).astype(np.float32)


class _Timeline:
    """Recent audio as (start time, samples) blocks at 16 kHz; rebuilt into one array on demand."""

    def __init__(self, history_s: float) -> None:
        self.history_s = history_s
        self.blocks: collections.deque[tuple[float, np.ndarray]] = collections.deque()

    def add(self, t: float, x: np.ndarray) -> None:
        if x.size:
            self.blocks.append((t, x))
        while self.blocks and self.blocks[0][0] < t - self.history_s:
            self.blocks.popleft()

    def span(self, t0: float, t1: float) -> np.ndarray:
        """Samples covering [t0, t1); zeros where nothing was recorded."""
        n = max(0, int(round((t1 - t0) * RATE)))
        out = np.zeros(n, np.float32)
        for t, x in self.blocks:
            a = int(round((t - t0) * RATE))
            if a >= n or a + x.size <= 0:
                continue
            lo, hi = max(0, -a), min(x.size, n - a)
            out[a + lo : a + hi] = x[lo:hi]
        return out


class EchoGuard:
    def __init__(self, config: EchoGuardConfig | None = None, *, cleaned: bool = False) -> None:
        """`cleaned`: the input it is given has been through the echo canceller."""
        self.config = config or EchoGuardConfig()
        self.threshold = self.config.threshold
        self.cleaned = cleaned
        self._ref = _Timeline(self.config.history_s)
        self._inp = _Timeline(self.config.history_s)
        self._ref_next: float | None = None  # where the next reference block would start if contiguous

    @property
    def cleaned(self) -> bool:
        """Whether the input comes through the echo canceller (it may engage mid-call: `mode="auto"`)."""
        return self._cleaned

    @cleaned.setter
    def cleaned(self, value: bool) -> None:
        self._cleaned = bool(value)
        self.threshold = self.config.cleaned_threshold if value else self.config.threshold

    def add_reference(self, frame: AudioFrame, sent_at: float) -> None:
        """Agent audio handed to the transport at `sent_at` (any rate)."""
        x = to_16k_linear(frame.to_float_mono(), frame.sample_rate)
        # Contiguous frames are laid end to end, so that scheduling jitter in the send times does
        # not tear the reference apart.
        t = sent_at
        if self._ref_next is not None and abs(self._ref_next - sent_at) < 0.03:
            t = self._ref_next
        self._ref.add(t, x)
        self._ref_next = t + x.size / RATE

    def add_input(self, frame: AudioFrame) -> None:
        """Microphone audio at 16 kHz (as the listener's chunker produces it), stamped with capture time."""
        if frame.sample_rate != RATE:
            raise ValueError(f"EchoGuard.add_input takes {RATE} Hz frames, got {frame.sample_rate}")
        self._inp.add(frame.timestamp, frame.to_float_mono())

    def score(self, t0: float, t1: float) -> float:
        """Best normalised cross-correlation of input [t0, t1) with the reference up to max_delay earlier."""
        x = self._inp.span(t0, t1)
        if x.size < RATE // 20:
            return 0.0
        if not self.reference_active(t0, t1):
            return 0.0
        return _max_ncc(x, self._ref.span(t0 - self.config.max_delay_s, t1))

    def reference_active(self, t0: float, t1: float) -> bool:
        """Whether the agent said something that could come back as input in [t0, t1)."""
        r = self._ref.span(t0 - self.config.max_delay_s, t1)
        return bool(r.size) and float(np.sqrt(np.mean(r * r))) >= self.config.min_reference_rms

    def is_echo(self, t0: float, t1: float) -> bool:
        return self.score(t0, t1) >= self.threshold


class EchoPathDetector:
    """Does this caller's input carry the agent's echo? "unknown", then "present" (for good) or "absent".

    Fed the raw input and the reference (an `EchoGuard` of its own). While the agent speaks it
    scores the input every `EVERY_S` against what was sent, over the last `WINDOW_S` (less at first:
    from `FIRST_S` after the agent's first frame): `HITS` windows at or above `threshold` and the
    path is present; `MISSES` below it with fewer hits, absent (silence while the agent talks is a
    miss: no echo came back). Absent is not final: scoring goes on, and a caller who switches to a
    loudspeaker is found. `check(t0, t1)` scores a stretch at once (a speech start while the path is
    unknown): a hit there makes it present. Cost: one correlation (about 3 ms) per quarter second of
    agent speech, none once present.
    """

    FIRST_S = 0.5
    WINDOW_S = 1.0
    EVERY_S = 0.25
    HITS = 2
    MISSES = 4

    def __init__(self, threshold: float = 0.3, config: EchoGuardConfig | None = None) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ConfigError(f"echo path threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self._guard = EchoGuard(config)
        self.hits = self.misses = 0
        self.scores: list[float] = []  # every window scored (diagnostics)
        self.found_at: float | None = None  # input time the path was found
        self._first: float | None = None  # the agent's first frame
        self._next: float | None = None

    @property
    def heard_agent(self) -> bool:
        """Whether the agent has said anything yet (before that there is nothing to look for)."""
        return self._first is not None

    @property
    def state(self) -> str:
        if self.found_at is not None:
            return "present"
        return "absent" if self.misses >= self.MISSES else "unknown"

    def add_reference(self, frame: AudioFrame, sent_at: float) -> None:
        self._guard.add_reference(frame, sent_at)
        if self._first is None:
            self._first, self._next = sent_at, sent_at + self.FIRST_S

    def add_input(self, frame: AudioFrame) -> bool:
        """Raw microphone audio (16 kHz, capture-stamped); True when this frame found the echo path."""
        self._guard.add_input(frame)
        if self.found_at is not None:
            return False
        now = frame.timestamp + frame.samples.shape[0] / frame.sample_rate
        if self._next is None or now < self._next:
            return False
        self._next = now + self.EVERY_S
        t0 = max(now - self.WINDOW_S, self._first or now)
        if not self._guard.reference_active(t0, now):
            return False  # the agent said nothing that could come back in this window: no evidence
        return self._score(t0, now, now)

    def check(self, t0: float, t1: float) -> bool:
        """Whether the input in [t0, t1) is the agent's echo, by the path threshold; a hit finds the path."""
        if not self._guard.reference_active(t0, t1):
            return False
        if self.found_at is not None:
            return self._guard.score(t0, t1) >= self.threshold
        self._score(t0, t1, t1, hits=self.HITS)
        return self.found_at is not None

    def _score(self, t0: float, t1: float, now: float, hits: int = 1) -> bool:
        """Score a window; True when it found the path."""
        score = self._guard.score(t0, t1)
        self.scores.append(round(score, 3))
        if score < self.threshold:
            self.misses += 1
            return False
        self.hits += hits
        if self.hits >= self.HITS:
            self.found_at = now
            return True
        return False


def _max_ncc(x: np.ndarray, r: np.ndarray) -> float:
    """max over lags k of <x, r[k:k+n]> / (|x| |r[k:k+n]|), by FFT (x shorter than r)."""
    n, m = x.size, r.size
    if m < n:
        r = np.concatenate([r, np.zeros(n - m, np.float32)])
        m = n
    x = x - x.mean()
    nx = float(np.linalg.norm(x))
    if nx < 1e-6:
        return 0.0
    size = 1 << int(np.ceil(np.log2(n + m)))
    corr = np.fft.irfft(np.fft.rfft(r, size) * np.conj(np.fft.rfft(x, size)), size)[: m - n + 1]
    c2 = np.concatenate([[0.0], np.cumsum(r.astype(np.float64) ** 2)])
    energy = (c2[n:] - c2[:-n])[: m - n + 1]
    # Lags where the reference is (nearly) silent cannot hold an echo; their ratio is rounding noise.
    valid = energy > 1e-4 * n * max(float(energy.max()) / n, 1e-8)
    if not valid.any():
        return 0.0
    ncc = np.abs(corr[valid]) / (nx * np.sqrt(energy[valid]))
    return float(min(1.0, ncc.max()))
