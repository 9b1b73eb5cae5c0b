"""What of the input is the user? Echo cancellation and noise suppression against the far-end reference.

The agent's voice comes back through the caller's loudspeaker and microphone: delayed (playout,
network, device buffers: tens to hundreds of ms), filtered by the room, attenuated. `EchoCanceller`
removes it from the input with WebRTC's audio processing module (AEC3 echo canceller, noise
suppressor, high-pass filter: what browsers run on their own microphones), through the
`pywebrtc-audio` package (a maintained build of the WebRTC C++ code), or the same module in the
`livekit` rtc package (`rtc.AudioProcessingModule`, installed with livekit-agents; `--aec-backend
livekit`). AEC3 adapts a linear filter per frequency band to the echo path, estimates its
delay itself, and suppresses what the filter leaves; bench/echo_barge_in.py measures it.

The far-end reference is what the agent sent (`add_reference`, with each frame's send time); the
input comes with capture times (`process`). Both are laid on one 16 kHz timeline keyed by the
monotonic clock, and the module is fed in lockstep: for every 10 ms of input captured at t, first the
reference at t - reference_lag, then the input. AEC3 pairs render and capture blocks by count, so a
constant lag keeps the echo delay it sees constant (the true delay minus the lag): the lag only has
to cover how late a reference frame can be written after the input it pairs with (a microphone frame
handed over at its first sample's time, a playout frame sent up to one frame late), and echoes
shorter than it cannot be cancelled (they would come before their reference).

Cost: ~0.8 ms per 10 ms block on this 2-core box (measured by the bench), so it runs inline on the event loop.
With `mode="auto"` (the default) it runs only where the agent's echo may be or is in the input
(`EchoCanceller`; the detector: streaming/echo.py `EchoPathDetector`).
"""
from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from rejoinder.errors import ConfigError

from .echo import EchoPathDetector, to_16k_linear
from .frames import AudioFrame, to_pcm16

log = logging.getLogger("rejoinder.streaming.aec")

__all__ = ["AECConfig", "AECStats", "BlockProcessor", "EchoCanceller", "PyWebRTCModule", "WebRTCModule"]

RATE = 16_000
BLOCK = RATE // 100  # the module works on 10 ms blocks


def _m(help: str, **meta: object) -> dict[str, object]:
    return {"help": help, **meta}


@dataclass(frozen=True)
class AECConfig:
    """Echo cancellation settings; `agent.config` generates the --aec* flags and REJOINDER_AEC* variables."""

    # auto (the default): the canceller engages only once the agent's voice is found coming back
    # in the raw input (`echo.EchoPathDetector`); until then the input passes untouched. Where there
    # is no echo (a headset, a browser that already ran AEC3 on its microphone) AEC3's double-talk
    # suppression would only mangle a caller talking over the agent (tests/test_talk.py's
    # interruption was lost with it always on). on: always; off: never (the echo guard alone).
    mode: str = field(default="auto", metadata=_m(
        "cancel the agent's own voice and suppress noise in the input (WebRTC AEC3 + NS) before the VAD: "
        "auto (once an echo of the agent is found in the input), on, off", flag="--aec", env="REJOINDER_AEC",
        choices=("auto", "on", "off")))
    # Chosen by bench/echo_barge_in.py: both builds leave no false barge-in on the echo/noise set;
    # pywebrtc-audio's hears a caller talking over the agent sooner (median 0.31 s vs 0.44 s) at
    # 0.79 ms per 10 ms block against 1.09, and needs no LiveKit install.
    backend: str = field(default="pywebrtc", metadata=_m(
        "who runs WebRTC's module: pywebrtc (pywebrtc-audio, a dependency) or livekit (livekit's rtc package)",
        choices=("livekit", "pywebrtc")))
    # Without it, residual echo let through while a cough or typing opens the canceller's
    # suppressor reaches the VAD (bench/echo_barge_in.py); with it (livekit's build suppresses
    # hard) a caller talking over the agent is heard ~0.2 s later.
    noise_suppression: bool = field(default=True, metadata=_m(
        "WebRTC noise suppression after the echo canceller (fewer false barge-ins, later true ones)"))
    # How much later than the input it pairs with a reference frame may be written (see the module
    # docstring); echoes shorter than this are not cancelled.
    reference_lag_ms: int = field(default=20, metadata=_m(
        "the reference is paired with input captured this much later (covers late reference frames)"))
    history_s: float = field(default=2.0, metadata=_m("seconds of reference kept"))
    # A second of raw input against the reference: 0.3-0.8 with an echo path, <= 0.23 without one
    # (streaming/echo.py, EchoPathDetector).
    path_threshold: float = field(default=0.3, metadata=_m(
        "auto: correlation of the raw input with the agent's voice that means its echo comes back"))
    # Speech the canceller took this much energy out of, around its onset, is what it left of the
    # agent's voice (see `EchoCanceller.removed_db`), not the caller.
    echo_removed_db: float = field(default=15.0, metadata=_m(
        "speech whose onset the canceller removed this many dB from is leftover echo, never a barge-in"))

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "on", "off"):
            raise ConfigError(f"aec mode must be auto, on or off, got {self.mode!r}")
        if not 0.0 < self.path_threshold <= 1.0:
            raise ConfigError(f"aec path_threshold must be in (0, 1], got {self.path_threshold}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"aec backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if not 0 <= self.reference_lag_ms <= 500:
            raise ConfigError(f"aec reference_lag_ms must be within 0-500, got {self.reference_lag_ms}")
        if not self.reference_lag_ms / 1000 + 0.1 < self.history_s <= 30.0:
            raise ConfigError("aec history_s must exceed reference_lag_ms + 0.1 s and be at most 30 s")
        if not 0.0 < self.echo_removed_db <= 100.0:
            raise ConfigError(f"aec echo_removed_db must be within (0, 100], got {self.echo_removed_db}")


@dataclass
class AECStats:
    blocks: int = 0  # 10 ms input blocks processed
    reference_frames: int = 0
    late_reference_blocks: int = 0  # reference written after its pairing had passed (lost for the canceller)
    seconds: float = 0.0  # time spent in the module (process + reverse), wall clock

    @property
    def ms_per_block(self) -> float:
        return 1000.0 * self.seconds / self.blocks if self.blocks else 0.0


class _Reference:
    """The far end at 16 kHz on the monotonic clock: a ring of samples, zeros where nothing was sent."""

    def __init__(self, history_s: float) -> None:
        self.size = int(history_s * RATE)
        self.ring = np.zeros(self.size, np.float32)
        self.origin: float | None = None  # monotonic time of sample 0
        self.end = 0  # one past the last sample written
        self.read_to = 0  # one past the last sample handed to the module

    def index(self, t: float) -> int:
        if self.origin is None:
            self.origin = t
        return int(round((t - self.origin) * RATE))

    def write(self, t: float, x: np.ndarray) -> int:
        """Lay `x` at time `t` (contiguous with the last write when within 30 ms); returns late samples."""
        a = self.index(t)
        if abs(a - self.end) < 0.03 * RATE:
            a = self.end  # send-time jitter must not tear the stream apart
        if a > self.end:
            self._put(self.end, np.zeros(min(a - self.end, self.size), np.float32))
        late = max(0, min(self.read_to, a + x.size) - a)
        self._put(a, x)
        self.end = max(self.end, a + x.size)
        return late

    def _put(self, a: int, x: np.ndarray) -> None:
        if x.size > self.size:
            a, x = a + x.size - self.size, x[-self.size :]
        i = a % self.size
        k = min(x.size, self.size - i)
        self.ring[i : i + k] = x[:k]
        self.ring[: x.size - k] = x[k:]

    def read(self, a: int, n: int) -> np.ndarray:
        """Samples [a, a + n); zeros for what was never written or has been overwritten."""
        out = np.zeros(n, np.float32)
        lo, hi = max(a, self.end - self.size, 0), min(a + n, self.end)
        if hi > lo:
            idx = np.arange(lo, hi) % self.size
            out[lo - a : hi - a] = self.ring[idx]
        self.read_to = max(self.read_to, a + n)
        return out


class BlockProcessor(Protocol):
    """An echo canceller core: 10 ms of far end, then the 10 ms of input paired with it (int16, 16 kHz)."""

    def process(self, near: np.ndarray, far: np.ndarray) -> np.ndarray: ...


class WebRTCModule:
    """WebRTC's audio processing module through livekit's rtc package: AEC3, NS, high-pass filter."""

    def __init__(self, *, noise_suppression: bool = True) -> None:
        try:
            from livekit import rtc  # local: the FFI library loads on first use, not on `import rejoinder`
        except ImportError:
            raise ConfigError("echo cancellation needs the livekit package (pip install livekit), or turn it off "
                              "(--no-aec, REJOINDER_AEC=0)") from None
        self._rtc = rtc
        self._apm = rtc.AudioProcessingModule(echo_cancellation=True, noise_suppression=noise_suppression,
                                              high_pass_filter=True)
        # AEC3 estimates the echo delay itself (the reported delay is a hint it does not use unless
        # configured to); the reference comes already aligned in time (see the module docstring).
        self._apm.set_stream_delay_ms(0)

    def process(self, near: np.ndarray, far: np.ndarray) -> np.ndarray:
        rtc = self._rtc
        self._apm.process_reverse_stream(rtc.AudioFrame(far.tobytes(), RATE, 1, BLOCK))
        frame = rtc.AudioFrame(near.tobytes(), RATE, 1, BLOCK)
        self._apm.process_stream(frame)  # in place
        return np.frombuffer(frame.data, np.int16)


class PyWebRTCModule:
    """The same module through the `pywebrtc-audio` package (the default; bench/echo_barge_in.py compares them)."""

    def __init__(self, *, noise_suppression: bool = True) -> None:
        try:
            import pywebrtc_audio
        except ImportError:
            raise ConfigError("aec backend 'pywebrtc' needs the pywebrtc-audio package (pip install pywebrtc-audio)") \
                from None
        self._ap = pywebrtc_audio.AudioProcessor(sample_rate=RATE, echo_cancellation=True,
                                                 noise_suppression=noise_suppression, high_pass_filter=True)

    def process(self, near: np.ndarray, far: np.ndarray) -> np.ndarray:
        return self._ap.process(near, far)


BACKENDS = {"livekit": WebRTCModule, "pywebrtc": PyWebRTCModule}


class EchoCanceller:
    """One caller's input cleaned against the agent's output. Not thread-safe; one per session.

    `mode="on"`: `engaged` from the first frame. `mode="auto"`: while `echo_path` is "unknown" the
    module runs in the shadow once the agent has spoken (it adapts to the room, its output unused)
    and `process` hands the input back untouched; once the path is "present" (found on the raw
    input by `echo.EchoPathDetector`, or by `check` at a speech start) the cleaned output is used for
    the rest of the call, from a module that has heard the agent's first words. While the path is
    "absent" the module does not run (no CPU for callers without echo); should the echo appear
    later, it starts again and engages.
    """

    def __init__(self, config: AECConfig | None = None, module: BlockProcessor | None = None) -> None:
        self.config = config or AECConfig()
        if self.config.mode == "off":
            raise ValueError("EchoCanceller with mode 'off': make none instead")
        self.stats = AECStats()
        self._module: BlockProcessor | None = module
        self._ref = _Reference(self.config.history_s)
        self._lag = int(round(self.config.reference_lag_ms * RATE / 1000))
        # (capture time, input energy, cleaned energy) of recent frames: what the canceller removed.
        self._energy: collections.deque[tuple[float, float, float]] = collections.deque(
            maxlen=int(self.config.history_s * 100))
        self._path = EchoPathDetector(self.config.path_threshold) if self.config.mode == "auto" else None
        self.engaged = self._path is None
        self.engaged_at: float | None = None  # auto: capture time of the first input it cleaned

    @property
    def echo_path(self) -> str:
        """"present" ("on", or found), "unknown" (auto, not decided yet) or "absent" (auto, none so far)."""
        return "present" if self._path is None else self._path.state

    @property
    def path_scores(self) -> list[float]:
        """auto: the echo-path correlations scored so far."""
        return list(self._path.scores) if self._path is not None else []

    def check(self, t0: float, t1: float) -> bool:
        """auto, not engaged: is the raw input in [t0, t1) the agent's echo (the path threshold)? A hit
        is the echo path found: the next frame is cleaned. Engaged (or "on"): False, the cleaned
        input has its own checks (the echo guard's cleaned threshold, `removed_db`)."""
        if self.engaged or self._path is None:
            return False
        return self._path.check(t0, t1)

    def add_reference(self, frame: AudioFrame, sent_at: float) -> None:
        """Agent audio handed to the transport at `sent_at` (any rate; mono or not)."""
        if self._path is not None and not self.engaged:
            self._path.add_reference(frame, sent_at)
        late = self._ref.write(sent_at, to_16k_linear(frame.to_float_mono(), frame.sample_rate))
        self.stats.reference_frames += 1
        if late:
            self.stats.late_reference_blocks += -(-late // BLOCK)

    def process(self, frame: AudioFrame) -> AudioFrame:
        """The input frame (16 kHz, a multiple of 10 ms, stamped with its capture time) without the echo."""
        if frame.sample_rate != RATE:
            raise ValueError(f"EchoCanceller.process takes {RATE} Hz frames, got {frame.sample_rate}")
        x = frame.to_float_mono()
        if x.size % BLOCK:
            raise ValueError(f"EchoCanceller.process takes multiples of {BLOCK} samples, got {x.size}")
        if not self.engaged:
            assert self._path is not None
            if self._path.state != "present":
                self._path.add_input(frame)
            if self._path.state == "present":  # found by this frame or by a check since the last one
                self.engaged, self.engaged_at = True, frame.timestamp
                log.info("the agent's echo is in the input: echo cancellation engaged")
            else:
                if self._path.state == "unknown" and self._path.heard_agent:
                    self._run(frame.timestamp, to_pcm16(x))  # in the shadow: adapting to the room
                e = float(np.dot(x, x))
                self._energy.append((frame.timestamp, e, e))  # nothing removed
                return frame
        y = self._run(frame.timestamp, to_pcm16(x)).astype(np.float32) / 32768.0
        self._energy.append((frame.timestamp, float(np.dot(x, x)), float(np.dot(y, y))))
        return AudioFrame(y, RATE, 1, frame.timestamp)

    def _run(self, captured_at: float, pcm: np.ndarray) -> np.ndarray:
        """The module on input captured at `captured_at`, each 10 ms block after its reference."""
        if self._module is None:
            self._module = BACKENDS[self.config.backend](noise_suppression=self.config.noise_suppression)
        start = self._ref.index(captured_at) - self._lag
        out = np.empty(pcm.size, np.int16)
        t0 = time.perf_counter()
        for k in range(0, pcm.size, BLOCK):
            far = to_pcm16(self._ref.read(start + k, BLOCK))
            out[k : k + BLOCK] = self._module.process(pcm[k : k + BLOCK], far)
        self.stats.seconds += time.perf_counter() - t0
        self.stats.blocks += pcm.size // BLOCK
        return out

    def removed_db(self, t0: float, t1: float) -> float:
        """How much of the input captured in [t0, t1) the canceller took out, in dB (0.0: nothing known).

        Speech the VAD finds in the cleaned input while this is high (15 dB and more) is a remnant of
        the agent's voice: a person talking over it adds energy the canceller leaves in, so the ratio
        stays low (under ~12 dB on bench/echo_barge_in.py's rooms, the interrupter 6 dB below the echo).
        """
        raw = clean = 0.0
        for t, e_in, e_out in reversed(self._energy):
            if t < t0:
                break
            if t < t1:
                raw += e_in
                clean += e_out
        if raw < 1e-9:
            return 0.0
        return float(10.0 * np.log10(raw / max(clean, 1e-12)))
