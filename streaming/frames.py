"""The audio frame type, and turning whatever a transport delivers into clean 20 ms frames.

Transports hand us audio in every shape: WebRTC gives 10 ms int16 at 48 kHz stereo, LiveKit 10 or
20 ms, a WAV reader arbitrary blocks, a phone line 8 kHz. Everything downstream (VAD, ASR) wants one
thing: float32 mono 16 kHz in 20 ms frames. `FrameChunker` makes that, keeping resampler state
across frames, re-cutting odd sizes, and carrying capture timestamps through.

Bad input is never allowed to crash the audio path: `FrameChunker` rejects what cannot be used
(unknown rate, ragged channel layout, empty) and repairs what can (NaN/inf zeroed, out-of-range
floats clipped, odd dtypes converted), with a rate-limited log line and a counter for each.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .resample import StreamResampler

log = logging.getLogger("rejoinder.streaming.frames")

FRAME_MS = 20
MIN_RATE = 8_000
MAX_RATE = 192_000


def to_pcm16(x: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] as int16 (scaled by 32767, clipped); int16 input is returned as is.

    The one float -> PCM16 conversion of the package: every transport, the playout and the TTS use it.
    """
    x = np.asarray(x)
    if x.dtype == np.int16:
        return x
    return (np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16)


@dataclass(frozen=True, eq=False)
class AudioFrame:
    """A block of PCM audio.

    `samples` is int16 or float32 (float in [-1, 1]); shape (n,) for mono or (n, channels)
    interleaved-as-2D for more channels. `timestamp` is time.monotonic() when the first sample was
    captured (or received, when the source does not say), so latencies can be measured end to end.
    """

    samples: np.ndarray
    sample_rate: int
    channels: int = 1
    timestamp: float = field(default_factory=time.monotonic)

    @property
    def samples_per_channel(self) -> int:
        return int(self.samples.shape[0]) if self.samples.ndim else 0

    @property
    def duration_s(self) -> float:
        return self.samples_per_channel / self.sample_rate if self.sample_rate > 0 else 0.0

    def to_float_mono(self) -> np.ndarray:
        """float32 mono in [-1, 1] (channels averaged, int16 scaled by 1/32768)."""
        x = self.samples
        if x.dtype == np.int16:
            x = x.astype(np.float32) / 32768.0
        else:
            x = x.astype(np.float32, copy=False)
        if x.ndim == 2:
            x = x.mean(axis=1, dtype=np.float32) if x.shape[1] > 1 else x[:, 0]
        return x

    def to_pcm16(self) -> np.ndarray:
        """The samples as int16 (float scaled by 32767 and clipped; int16 returned as is)."""
        return to_pcm16(self.samples)

    def to_pcm16_bytes(self) -> bytes:
        return self.to_pcm16().astype("<i2", copy=False).tobytes()

    @classmethod
    def from_float(cls, x: np.ndarray, sample_rate: int, timestamp: float | None = None) -> AudioFrame:
        """A mono int16 frame from float samples in [-1, 1]."""
        return cls(to_pcm16(x), sample_rate, 1, time.monotonic() if timestamp is None else timestamp)

    @classmethod
    def from_pcm16_bytes(
        cls, data: bytes, sample_rate: int, channels: int = 1, timestamp: float | None = None
    ) -> AudioFrame:
        x = np.frombuffer(data, dtype="<i2").astype(np.int16)
        if channels > 1:
            x = x[: x.size - x.size % channels].reshape(-1, channels)
        return cls(x, sample_rate, channels, time.monotonic() if timestamp is None else timestamp)


@dataclass
class FrameStats:
    frames_in: int = 0
    frames_out: int = 0
    rejected: Counter = field(default_factory=Counter)  # reason -> count
    repaired: Counter = field(default_factory=Counter)


class FrameChunker:
    """Any AudioFrame in; float32 mono 20 ms frames at `rate` out (as AudioFrame).

    Output timestamps are derived from input timestamps plus sample offsets, so they stay accurate
    when input blocks are larger or smaller than 20 ms. A change of input rate mid-stream is
    allowed (a new resampler is started; the old one's tail is flushed first).
    """

    def __init__(self, rate: int = 16_000, frame_ms: int = FRAME_MS, *, log_every: int = 500) -> None:
        self.rate = rate
        self.frame_samples = rate * frame_ms // 1000
        self.stats = FrameStats()
        self._log_every = log_every
        self._resampler: StreamResampler | None = None
        self._buf = np.zeros(0, dtype=np.float32)
        self._out_pos = 0  # output samples produced into _buf so far (stream clock at `rate`)
        self._emitted = 0  # output samples already cut into frames
        # Timestamp mapping. Output sample k of the current resampler segment sits at segment time
        # k / rate, the same instant as input sample k * from_rate / rate: we anchor on the latest
        # input frame (its capture time, its segment time) and extrapolate. This stays right despite
        # the resampler's look-ahead delay (output lags input by a few ms of *processing*, not of
        # signal time).
        self._seg_out_start = 0  # output index where the current resampler segment began
        self._seg_in = 0  # input samples fed to the current segment
        self._anchor: tuple[float, float] | None = None  # (monotonic time, segment time in s)

    def reset(self) -> None:
        """Forget buffered audio, resampler state and counters (a new stream follows)."""
        self.__init__(self.rate, self.frame_samples * 1000 // self.rate, log_every=self._log_every)  # type: ignore[misc]

    # -- validation ---------------------------------------------------------------------------

    def _note(self, kind: str, reason: str, detail: str) -> None:
        counter = self.stats.rejected if kind == "rejected" else self.stats.repaired
        counter[reason] += 1
        n = counter[reason]
        # First occurrence, then every `log_every`th: a broken microphone at 50 frames/s must not
        # flood the log, but its count stays visible.
        if n == 1 or n % self._log_every == 0:
            log.warning("audio frame %s (%s): %s [%d so far]", kind, reason, detail, n)

    def _sanitize(self, frame: AudioFrame) -> np.ndarray | None:
        """The frame as float32 mono at its own rate, or None when it must be dropped."""
        if not isinstance(frame, AudioFrame):
            self._note("rejected", "type", f"expected AudioFrame, got {type(frame).__name__}")
            return None
        rate = frame.sample_rate
        if not isinstance(rate, (int, np.integer)) or not MIN_RATE <= rate <= MAX_RATE:
            self._note("rejected", "rate", f"sample rate {rate!r} outside {MIN_RATE}-{MAX_RATE} Hz")
            return None
        x = np.asarray(frame.samples)
        if x.size == 0:
            self._note("rejected", "empty", "no samples")
            return None
        if x.ndim == 1 and frame.channels > 1:
            if x.size % frame.channels:
                self._note("rejected", "layout", f"{x.size} samples do not split into {frame.channels} channels")
                return None
            x = x.reshape(-1, frame.channels)
        elif x.ndim > 2 or (x.ndim == 2 and x.shape[1] != frame.channels):
            self._note("rejected", "layout", f"shape {x.shape} does not match {frame.channels} channel(s)")
            return None
        if x.dtype == np.int16:
            y = x.astype(np.float32) / 32768.0
        elif np.issubdtype(x.dtype, np.floating):
            y = x.astype(np.float32)
        elif np.issubdtype(x.dtype, np.integer):
            # int32 PCM (some capture APIs): scale by its own full range
            self._note("repaired", "dtype", f"{x.dtype} samples converted")
            y = (x.astype(np.float64) / float(np.iinfo(x.dtype).max + 1)).astype(np.float32)
        else:
            self._note("rejected", "dtype", f"unsupported sample type {x.dtype}")
            return None
        if y.ndim == 2:
            y = y.mean(axis=1, dtype=np.float32) if y.shape[1] > 1 else y[:, 0]
        if not np.isfinite(y).all():
            bad = int((~np.isfinite(y)).sum())
            self._note("repaired", "nonfinite", f"{bad} NaN/inf samples set to 0")
            y = np.nan_to_num(y, nan=0.0, posinf=0.0, neginf=0.0)
        peak = float(np.abs(y).max())
        if peak > 1.0:
            self._note("repaired", "clipped", f"float samples reach {peak:.2f}, clipped to [-1, 1]")
            y = np.clip(y, -1.0, 1.0)
        return y

    # -- chunking -----------------------------------------------------------------------------

    def push(self, frame: AudioFrame) -> list[AudioFrame]:
        """Add one input frame; returns the complete 20 ms frames now available (maybe none)."""
        self.stats.frames_in += 1
        try:
            mono = self._sanitize(frame)
        except Exception as exc:  # noqa: BLE001 - the audio path must survive any malformed input
            self._note("rejected", "error", f"{type(exc).__name__}: {exc}")
            return []
        if mono is None:
            return []
        if self._resampler is None or self._resampler.from_rate != frame.sample_rate:
            if self._resampler is not None:
                log.info("input rate changed %d -> %d Hz", self._resampler.from_rate, frame.sample_rate)
                self._append(self._resampler.flush())
            self._resampler = StreamResampler(int(frame.sample_rate), self.rate)
            self._seg_out_start = self._out_pos
            self._seg_in = 0
        self._anchor = (frame.timestamp, self._seg_in / frame.sample_rate)
        self._seg_in += mono.size
        self._append(self._resampler.process(mono))
        return self._cut()

    def flush(self) -> list[AudioFrame]:
        """End of stream: drain the resampler and zero-pad the last partial frame."""
        if self._resampler is not None:
            self._append(self._resampler.flush())
        out = self._cut()
        if self._buf.size:
            pad = self.frame_samples - self._buf.size
            self._append(np.zeros(pad, dtype=np.float32))
            out += self._cut()
        return out

    def _append(self, y: np.ndarray) -> None:
        if y.size:
            self._buf = np.concatenate([self._buf, y]) if self._buf.size else y
            self._out_pos += y.size

    def _cut(self) -> list[AudioFrame]:
        n = self.frame_samples
        k = self._buf.size // n
        if k == 0:
            return []
        t0, seg_t0 = self._anchor if self._anchor else (time.monotonic(), 0.0)
        frames = []
        for i in range(k):
            start = self._emitted + i * n
            ts = t0 + (start - self._seg_out_start) / self.rate - seg_t0
            frames.append(AudioFrame(self._buf[i * n : (i + 1) * n].copy(), self.rate, 1, ts))
        self._buf = self._buf[k * n :].copy()
        self._emitted += k * n
        self.stats.frames_out += k
        return frames
