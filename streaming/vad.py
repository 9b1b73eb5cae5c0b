"""Voice activity detection: the models, and the state machine that turns probabilities into speech.

Two models sit behind one `VAD` protocol:
- `SileroVAD`: Silero VAD v6 run through onnxruntime by our own ~30-line wrapper (not the package's
  torch-based helpers) so the recurrent state is ours to reset and no torch tensors are made per window.
- `WebRTCVAD`: the classic GMM detector from webrtcvad; much lighter, much less robust to noise.

`SpeechDetector` is model-agnostic: it feeds audio of any chunk size through a VAD, applies a
hysteresis threshold, a minimum speech duration and a hang-over, and emits speech start/end events
with audio-time and wall-clock (time.monotonic) stamps. Its memory is O(1) in stream length, so it
runs for hours. `speech_segments` is the same machine run over a whole buffer.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from rejoinder.errors import ConfigError

from .assets import resolve
from .frames import AudioFrame, to_pcm16

log = logging.getLogger("rejoinder.streaming.vad")

VAD_RATE = 16_000


@runtime_checkable
class VAD(Protocol):
    """A frame-level speech detector at 16 kHz.

    `window_samples` is the exact chunk size `speech_prob` takes; `reset` forgets all history
    (call it between independent streams).
    """

    sample_rate: int
    window_samples: int

    def speech_prob(self, window: np.ndarray) -> float: ...

    def reset(self) -> None: ...


class SileroVAD:
    """Silero VAD v6 (ONNX), 512-sample (32 ms) windows at 16 kHz.

    The model is stateful: a (2, 1, 128) LSTM state plus the last 64 input samples as context.
    One instance serves one stream at a time; `new_stream()` gives another stream on the same
    loaded model (the state lives here, not in the ONNX session, which is stateless and safe to
    run from several threads), so a process loads the network once however many calls it serves.
    """

    sample_rate = VAD_RATE
    window_samples = 512
    _CONTEXT = 64

    def __init__(self, model_path: str | os.PathLike | None = None, *, threads: int = 1,
                 session: Any = None) -> None:
        if session is None:
            import onnxruntime as ort  # local: importing vad.py must not pay onnxruntime's import cost

            path = os.fspath(model_path or resolve("vad"))
            opts = ort.SessionOptions()
            # One thread: a window takes well under a millisecond; more threads only add contention
            # with the ASR decode running beside it.
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 3
            session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        self._session = session
        self._sr = np.array(self.sample_rate, dtype=np.int64)
        self.reset()

    def new_stream(self) -> SileroVAD:
        """Another stream on this loaded model: its own state (fresh), the same ONNX session.

        A session costs ~11 MiB of native memory and tens of ms to build; one per call (as the
        server once did) held that much per ended call until Python's next full garbage collection
        (bench/load.py --soak: +3 MiB/call for the first ~80 calls of a fresh server)."""
        return SileroVAD(session=self._session)

    def reset(self) -> None:
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._context = np.zeros(self._CONTEXT, dtype=np.float32)

    def speech_prob(self, window: np.ndarray) -> float:
        if window.shape != (self.window_samples,):
            raise ValueError(f"SileroVAD takes {self.window_samples} samples, got {window.shape}")
        x = np.concatenate([self._context, window.astype(np.float32, copy=False)])[None, :]
        out, self._state = self._session.run(None, {"input": x, "state": self._state, "sr": self._sr})
        self._context = x[0, -self._CONTEXT :].copy()
        return float(out[0, 0])


class WebRTCVAD:
    """webrtcvad (aggressiveness 0-3) on 30 ms windows; its answer is binary, reported as 0.0/1.0."""

    sample_rate = VAD_RATE
    window_samples = 480

    def __init__(self, aggressiveness: int = 2) -> None:
        import webrtcvad

        if aggressiveness not in (0, 1, 2, 3):
            raise ValueError(f"webrtcvad aggressiveness must be 0-3, got {aggressiveness}")
        self._aggressiveness = aggressiveness
        self._vad = webrtcvad.Vad(aggressiveness)

    def reset(self) -> None:
        import webrtcvad

        # The C object keeps adaptive noise estimates; a new one is the only way to clear them.
        self._vad = webrtcvad.Vad(self._aggressiveness)

    def speech_prob(self, window: np.ndarray) -> float:
        if window.shape != (self.window_samples,):
            raise ValueError(f"WebRTCVAD takes {self.window_samples} samples, got {window.shape}")
        pcm = to_pcm16(window).astype("<i2").tobytes()
        return 1.0 if self._vad.is_speech(pcm, self.sample_rate) else 0.0


def make_vad(kind: str = "silero", **kwargs) -> VAD:
    """`kind` is "silero" (default, robust) or "webrtc" (light)."""
    if kind == "silero":
        return SileroVAD(**kwargs)
    if kind == "webrtc":
        return WebRTCVAD(**kwargs)
    raise ValueError(f"unknown VAD kind {kind!r}; expected 'silero' or 'webrtc'")


# --- from probabilities to speech ------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """A stretch of speech in audio time (seconds from the start of the stream)."""

    start_s: float
    end_s: float

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True)
class VADEvent:
    """A speech boundary.

    `audio_time_s` is where the boundary lies in the stream (onset of speech for a start, the end of
    the last speech window for an end); `emitted_at` is time.monotonic() when the detector decided,
    which is later by up to `min_speech_s` (start) or `hangover_s` (end) plus processing.
    """

    kind: Literal["speech_start", "speech_end"]
    audio_time_s: float
    emitted_at: float
    # time.monotonic() at which the boundary's audio was captured, when fed with AudioFrames
    # (`SpeechDetector.process_frame`): emitted_at - captured_at is the detector's decision latency.
    captured_at: float | None = None


@dataclass(frozen=True)
class VADConfig:
    threshold: float = 0.5  # probability at or above which a window is speech
    # Hysteresis: once in speech, a window only counts as silence below this (default threshold - 0.15,
    # as Silero's own helper does): breathy word endings hover around the threshold.
    neg_threshold: float | None = None
    min_speech_s: float = 0.25  # speech must last this long to start a segment (coughs, clicks)
    hangover_s: float = 0.5  # silence must last this long to end one (pauses between words)
    pre_roll_s: float = 0.1  # a start is dated this much before the first speech window (soft onsets)
    # After this much continuous silence the model state is reset, so a stream running for hours
    # starts every utterance from the same state as the first one.
    reset_after_silence_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"VAD threshold must be in (0, 1), got {self.threshold}")
        if self.neg_threshold is not None and not 0.0 <= self.neg_threshold <= self.threshold:
            raise ConfigError("VAD neg_threshold must be in [0, threshold]")
        if min(self.min_speech_s, self.hangover_s, self.pre_roll_s) < 0:
            raise ConfigError("VAD durations must be >= 0")

    @property
    def off_threshold(self) -> float:
        return self.neg_threshold if self.neg_threshold is not None else max(self.threshold - 0.15, 0.01)


class SpeechDetector:
    """Streaming speech start/end detection over a `VAD`.

    Feed 16 kHz float32 mono of any length with `process`; it returns the events decided by that
    audio. State is a handful of numbers plus less than one model window of samples.
    """

    def __init__(self, vad: VAD | None = None, config: VADConfig | None = None) -> None:
        self.vad: VAD = vad if vad is not None else SileroVAD()
        self.config = config or VADConfig()
        self._win = self.vad.window_samples
        self._win_s = self._win / self.vad.sample_rate
        self.reset()

    def reset(self) -> None:
        """Forget everything, including the stream clock (a new stream starts at 0 s)."""
        self.vad.reset()
        self._pending = np.zeros(0, dtype=np.float32)
        self._windows = 0  # windows consumed: the stream clock
        self.in_speech = False
        self.last_prob = 0.0
        self._run_start: int | None = None  # first window of the current candidate speech run
        self._last_speech: int = -1  # last window that counted as speech
        self._silent_windows = 0
        # Capture time (time.monotonic()) of the end of the last speech window, when fed AudioFrames:
        # while a pause runs its course (the hang-over), it says when the user stopped.
        self.speech_end_captured_at: float | None = None

    @property
    def silence_s(self) -> float:
        """Length of the current run of non-speech windows (0.0 while speech continues)."""
        return self._silent_windows * self._win_s

    @property
    def last_speech_end_s(self) -> float:
        """Audio time (stream seconds) where the last speech window ended (0.0 before any speech)."""
        return (self._last_speech + 1) * self._win_s

    @property
    def audio_time_s(self) -> float:
        """Audio time up to which decisions are made (excludes the partial window held back)."""
        return self._windows * self._win_s

    def process(self, samples: np.ndarray) -> list[VADEvent]:
        x = np.asarray(samples, dtype=np.float32).reshape(-1)
        if self._pending.size:
            x = np.concatenate([self._pending, x])
        n_full = x.size // self._win
        events: list[VADEvent] = []
        for i in range(n_full):
            ev = self._step(x[i * self._win : (i + 1) * self._win])
            if ev is not None:
                events.append(ev)
        self._pending = x[n_full * self._win :].copy()
        return events

    def process_frame(self, frame: AudioFrame) -> list[VADEvent]:
        """Like `process`, for a 16 kHz AudioFrame; events also carry `captured_at`."""
        if frame.sample_rate != self.vad.sample_rate:
            raise ValueError(f"VAD takes {self.vad.sample_rate} Hz frames, got {frame.sample_rate} Hz")
        # Audio time of this frame's first sample (the pending partial window precedes it).
        frame_start_s = (self._windows * self._win + self._pending.size) / self.vad.sample_rate
        last = self._last_speech
        events = self.process(frame.to_float_mono())
        if self._last_speech != last:
            self.speech_end_captured_at = frame.timestamp + ((self._last_speech + 1) * self._win_s - frame_start_s)
        return [
            VADEvent(e.kind, e.audio_time_s, e.emitted_at, frame.timestamp + (e.audio_time_s - frame_start_s))
            for e in events
        ]

    def cut(self) -> list[VADEvent]:
        """End an open segment now, whatever the audio says, and start afresh (the network's state
        too): the input changed under it (the echo canceller engaged over the agent's echo)."""
        self.vad.reset()
        self._run_start = None
        self._silent_windows = 0
        if not self.in_speech:
            return []
        self.in_speech = False
        return [VADEvent("speech_end", self.audio_time_s, time.monotonic())]

    def flush(self) -> list[VADEvent]:
        """End of stream: close an open segment at its last speech window."""
        self._pending = np.zeros(0, dtype=np.float32)
        if self.in_speech:
            self.in_speech = False
            self._run_start = None
            return [VADEvent("speech_end", (self._last_speech + 1) * self._win_s, time.monotonic())]
        return []

    def _step(self, window: np.ndarray) -> VADEvent | None:
        cfg = self.config
        prob = self.vad.speech_prob(window)
        self.last_prob = prob
        idx = self._windows
        self._windows += 1
        is_speech = prob >= (cfg.off_threshold if self.in_speech else cfg.threshold)

        if is_speech:
            self._silent_windows = 0
            self._last_speech = idx
            if self.in_speech:
                return None
            if self._run_start is None:
                self._run_start = idx
            if (idx + 1 - self._run_start) * self._win_s >= cfg.min_speech_s:
                self.in_speech = True
                start_s = max(0.0, self._run_start * self._win_s - cfg.pre_roll_s)
                return VADEvent("speech_start", start_s, time.monotonic())
            return None

        self._silent_windows += 1
        if self.in_speech:
            if self._silent_windows * self._win_s >= cfg.hangover_s:
                self.in_speech = False
                self._run_start = None
                return VADEvent("speech_end", (self._last_speech + 1) * self._win_s, time.monotonic())
            return None
        # A candidate run shorter than min_speech_s survives short gaps (it dies only after a full
        # hang-over of silence), so two quick bursts such as "a-ha" still add up to a start.
        if self._run_start is not None and self._silent_windows * self._win_s >= cfg.hangover_s:
            self._run_start = None
        if self._silent_windows * self._win_s >= cfg.reset_after_silence_s:
            log.debug("%.1f s of silence: VAD state reset", self._silent_windows * self._win_s)
            self.vad.reset()
            self._silent_windows = 0
        return None


def speech_segments(
    samples_16k: np.ndarray, *, vad: VAD | None = None, config: VADConfig | None = None
) -> list[Segment]:
    """Speech segments of a whole 16 kHz mono buffer (the streaming detector run to the end)."""
    det = SpeechDetector(vad, config)  # reset() inside: a shared VAD starts clean
    events = det.process(samples_16k) + det.flush()
    segments: list[Segment] = []
    start: float | None = None
    for ev in events:
        if ev.kind == "speech_start":
            start = ev.audio_time_s
        elif start is not None:
            segments.append(Segment(start, min(ev.audio_time_s, len(samples_16k) / VAD_RATE)))
            start = None
    return segments
