"""Where does the time go on the WebRTC path? Per-stage timings and counters of one peer connection.

Both directions are stamped on `time.monotonic()` (on Linux one clock for every process of the
machine, so a caller in another process compares its own stamps with these directly):

    inbound   packet arrived -> released by the jitter buffer -> decoded frame taken by audio_in()
              -> handed to the session -> the session asks for the next one (its VAD has run)
    outbound  send_audio() queued it -> the encoder pulled it (its pacing slot) -> the encoder's next
              pull (so this one was Opus-encoded and its RTP packet sent)

Frames are named by their RTP timestamp relative to the first packet of the stream (48 kHz samples:
frame k of a 20 ms stream is `960 * k`), the name both ends can compute, so a caller can ask for the
server's stamps of the exact frame it cares about (its last word, the first frame of an answer).

Memory is bounded: each stage keeps a fixed 1 ms histogram (percentiles without keeping samples),
and per-frame stamps are kept for the last `FRAME_LOG` frames only.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FrameLog", "InboundFrame", "OutboundFrame", "SpeechRun", "StageStats", "WebRTCStats"]

FRAME_LOG = 1500  # 30 s of 20 ms frames


class StageStats:
    """Durations of one stage: count, mean, max and percentiles (1 ms bins up to 2 s, then one overflow bin)."""

    BIN_S = 0.001
    BINS = 2000

    __slots__ = ("_hist", "count", "max_s", "total_s")

    def __init__(self) -> None:
        self._hist = [0] * (self.BINS + 1)
        self.count = 0
        self.total_s = 0.0
        self.max_s = 0.0

    def add(self, seconds: float) -> None:
        s = max(0.0, seconds)
        self._hist[min(self.BINS, int(s / self.BIN_S))] += 1
        self.count += 1
        self.total_s += s
        self.max_s = max(self.max_s, s)

    def percentile(self, q: float) -> float | None:
        """Upper edge of the bin holding the q-th percentile (None when empty)."""
        if not self.count:
            return None
        rank = q / 100.0 * self.count
        seen = 0
        for i, n in enumerate(self._hist):
            seen += n
            if n and seen >= rank:
                return min(self.max_s, (i + 1) * self.BIN_S)
        return self.max_s

    @property
    def mean_s(self) -> float | None:
        return self.total_s / self.count if self.count else None

    def to_dict(self) -> dict[str, Any]:
        def ms(v: float | None) -> float | None:
            return None if v is None else round(v * 1000.0, 2)

        return {"n": self.count, "mean_ms": ms(self.mean_s), "p50_ms": ms(self.percentile(50)),
                "p95_ms": ms(self.percentile(95)), "max_ms": ms(self.max_s if self.count else None)}


@dataclass
class InboundFrame:
    ts: int  # RTP timestamp since the stream's first packet
    arrived_at: float | None = None  # the RTP packet reached the receiver
    released_at: float | None = None  # the jitter buffer handed it to the decoder
    received_at: float | None = None  # audio_in() took the decoded frame
    done_at: float | None = None  # the session asked for the next frame (it has processed this one)


@dataclass
class OutboundFrame:
    ts: int  # RTP timestamp of the outgoing stream (pts of the frame)
    speech: bool
    queued_at: float | None  # send_audio() put it in the track (None: silence filler)
    slot_at: float  # when the pacing clock wanted it out
    handed_at: float  # recv() returned it to aiortc's encoder
    sent_at: float | None = None  # the encoder's next pull: this one was encoded and sent


@dataclass
class SpeechRun:
    """One stretch of agent speech on the wire (an answer, or its part between pauses)."""

    start_ts: int
    first_queued_at: float | None
    first_handed_at: float
    end_ts: int | None = None  # last speech frame (None while it goes on)
    last_handed_at: float | None = None


class FrameLog:
    """The last `size` frames' stamps by RTP timestamp."""

    def __init__(self, size: int = FRAME_LOG) -> None:
        self.size = size
        self._frames: OrderedDict[int, Any] = OrderedDict()

    def put(self, ts: int, frame: Any) -> None:
        self._frames[ts] = frame
        self._frames.move_to_end(ts)
        while len(self._frames) > self.size:
            self._frames.popitem(last=False)

    def get(self, ts: int) -> Any:
        return self._frames.get(ts)

    def __len__(self) -> int:
        return len(self._frames)


INBOUND_STAGES = ("in_jitter", "in_decode", "in_session")
OUTBOUND_STAGES = ("out_queue", "out_slot_late", "out_encode_send")
STAGE_HELP = {
    "in_jitter": "RTP packet arrived -> released by the jitter buffer",
    "in_decode": "released -> decoded frame taken by audio_in() (decoder thread, track queue)",
    "in_session": "frame handed to the session -> it asked for the next (chunking, resampling, VAD)",
    "out_queue": "send_audio() queued a speech frame -> the encoder pulled it",
    "out_slot_late": "the encoder pulled a frame -> how far past its pacing slot",
    "out_encode_send": "frame handed to the encoder -> encoded and its RTP packet sent",
}


@dataclass
class WebRTCStats:
    frames_in: int = 0
    frames_out_speech: int = 0
    frames_out_silence: int = 0
    late_frames: int = 0  # speech frames that arrived after their slot but within the grace
    speech_runs: int = 0  # silence -> speech transitions: one per answer when pacing holds up
    speech_holes: int = 0  # speech resumed within 0.2 s of a silence slot: a hole mid-answer (starved sender)
    dropped_out_frames: int = 0  # send_audio found the track not being consumed
    events_sent: int = 0
    events_dropped: int = 0
    messages_in: int = 0
    first_audio_in_at: float | None = None
    first_speech_out_at: float | None = None  # the track handed the first speech frame to the encoder
    # Receive side: packets the jitter buffer dropped (late or duplicate) and sequence gaps (lost).
    packets_in: int = 0
    packets_late: int = 0
    packets_lost: int = 0
    max_in_queue: int = 0  # decoded frames waiting for audio_in() (the session fell behind)
    max_out_queue: int = 0  # speech frames waiting in the outgoing track
    clock_jumps: int = 0  # the loop stalled: the RTP clock moved over the missed slots instead of bursting
    stages: dict[str, StageStats] = field(
        default_factory=lambda: {k: StageStats() for k in INBOUND_STAGES + OUTBOUND_STAGES})
    inbound: FrameLog = field(default_factory=FrameLog)
    outbound: FrameLog = field(default_factory=FrameLog)
    runs: deque[SpeechRun] = field(default_factory=lambda: deque(maxlen=64))

    def stage(self, name: str, seconds: float) -> None:
        self.stages[name].add(seconds)

    def snapshot(self, frames_in: list[int] | tuple[int, ...] = (), frames_out: list[int] | tuple[int, ...] = (),
                 runs: int = 64) -> dict[str, Any]:
        """JSON-ready: counters, each stage's summary, the stamps of the frames asked for, recent speech runs."""
        counters = {k: v for k, v in self.__dict__.items() if isinstance(v, (int, float)) or v is None}

        def frame(f: Any) -> dict[str, Any] | None:
            return None if f is None else dict(f.__dict__)

        return {
            **counters,
            "stages": {k: {**v.to_dict(), "what": STAGE_HELP[k]} for k, v in self.stages.items()},
            "frames_in": {str(int(ts)): frame(self.inbound.get(int(ts))) for ts in list(frames_in)[:64]},
            "frames_out": {str(int(ts)): frame(self.outbound.get(int(ts))) for ts in list(frames_out)[:64]},
            "runs": [dict(r.__dict__) for r in list(self.runs)[-runs:]],
        }
