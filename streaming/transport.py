"""What a session needs from whatever carries its audio: frames in, frames out, events out.

A `Transport` is one remote party (a browser over WebRTC, a LiveKit participant, a WAV file played
in real time). The agent's session reads `audio_in()` until it ends (the party left), sends its
speech with `send_audio()` at playout pace, and forwards its typed events as JSON-ready dicts with
`send_event()` (a data channel, a LiveKit data packet, nothing at all). Everything a transport needs
to know about the agent is in those dicts, so this package never imports `rejoinder.agent`.

`InProcessTransport` is the transport of tests, benchmarks and `rejoinder talk`: audio is pushed
from Python (optionally paced in real time from a WAV), and everything sent back is recorded with
the monotonic time it was sent.
"""
from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from rejoinder.errors import TransportError

from .frames import FRAME_MS, AudioFrame, to_pcm16

log = logging.getLogger("rejoinder.streaming.transport")

__all__ = ["InProcessTransport", "SentFrame", "Transport", "TransportClosed", "event_json"]


class TransportClosed(TransportError):
    """The remote party is gone; sending more is pointless (the session ends)."""


def _json_default(o: Any) -> Any:
    if isinstance(o, enum.Enum):
        return o.value
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    item = getattr(o, "item", None)  # numpy scalars
    if callable(item):
        return item()
    return str(o)


def _finite(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def event_json(event: Mapping[str, Any]) -> str:
    """One session event as compact JSON text: the wire form on every channel (data channel, MQTT, LiveKit).

    Enums, dataclasses, numpy values and sets become JSON; NaN and infinities become null, since a
    consumer's parser would reject the whole event for one field.
    """
    try:
        return json.dumps(dict(event), default=_json_default, allow_nan=False, ensure_ascii=False,
                          separators=(",", ":"))
    except ValueError:
        plain = json.loads(json.dumps(dict(event), default=_json_default))
        return json.dumps(_finite(plain), ensure_ascii=False, separators=(",", ":"))


@runtime_checkable
class Transport(Protocol):
    """One remote party. Implementations: InProcessTransport, the WebRTC and LiveKit transports."""

    #: Sample rate the transport wants outgoing audio in (the session resamples TTS output to it).
    output_sample_rate: int
    #: Seconds of speech to hand over ahead of real time: the reserve of a transport whose sender
    #: pulls frames on its own clock (WebRTC); 0 for one that sends what it gets when it gets it.
    audio_lead_s: float

    def audio_in(self) -> AsyncIterator[AudioFrame]:
        """Incoming audio frames, any size and rate; the iterator ends when the party leaves."""
        ...

    async def send_audio(self, frame: AudioFrame) -> None:
        """Send one frame of agent speech now (called at real-time pace by the playout buffer)."""
        ...

    async def send_event(self, event: Mapping[str, Any]) -> None:
        """Forward one session event (a JSON-serialisable dict with a "type" key)."""
        ...

    def recall_audio(self) -> float:
        """Drop speech handed over but not sent yet (a barge-in); returns how many seconds were dropped."""
        ...

    async def close(self) -> None:
        """Hang up; idempotent."""
        ...


@dataclass(frozen=True)
class SentFrame:
    frame: AudioFrame
    sent_at: float  # time.monotonic() when send_audio was called


_EOF = object()


@dataclass
class InProcessTransport:
    """A transport whose far end is Python code: push audio in, inspect what came out.

    `on_audio_out` (optional) is called with every frame sent, e.g. to loop the agent's voice back
    into its input (echo tests).
    """

    output_sample_rate: int = 22_050
    audio_lead_s: float = 0.0  # every frame is "sent" when it is handed over
    on_audio_out: Callable[[AudioFrame], Awaitable[None] | None] | None = None
    sent_audio: list[SentFrame] = field(default_factory=list)
    sent_events: list[dict[str, Any]] = field(default_factory=list)
    closed: bool = False

    def __post_init__(self) -> None:
        self._in: asyncio.Queue[object] = asyncio.Queue()
        self._event_waiters: list[tuple[Callable[[dict], bool], asyncio.Future]] = []
        self.started_at = time.monotonic()

    # --- the far end (tests, CLI) ----------------------------------------------------------------

    def push_audio(self, frame: AudioFrame) -> None:
        if not self.closed:
            self._in.put_nowait(frame)

    def end_input(self) -> None:
        """The party stops sending (hangs up): audio_in() ends after the frames already pushed."""
        self._in.put_nowait(_EOF)

    async def play(
        self,
        samples: np.ndarray,
        sample_rate: int,
        *,
        realtime: bool = True,
        frame_ms: int = FRAME_MS,
        mix: Callable[[int, int], np.ndarray | None] | None = None,
    ) -> float:
        """Push `samples` as `frame_ms` frames, paced like a microphone when `realtime`.

        Each frame is stamped with the monotonic time its first sample is "captured". Pacing is
        drift-free (frame n is due at start + n * frame duration). `mix(start, n)` may return extra
        samples to add into frame [start, start + n) (e.g. the agent's echo). Returns the start time.
        """
        x = np.asarray(samples)
        n = sample_rate * frame_ms // 1000
        t0 = time.monotonic()
        for k, i in enumerate(range(0, x.shape[0], n)):
            due = t0 + k * frame_ms / 1000
            if realtime:
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            chunk = x[i : i + n]
            if mix is not None:
                extra = mix(i, chunk.shape[0])
                if extra is not None:
                    chunk = _mix(chunk, extra)
            self.push_audio(AudioFrame(chunk, sample_rate, 1, due if realtime else time.monotonic()))
            if not realtime:
                await asyncio.sleep(0)
        return t0

    async def wait_event(self, predicate: Callable[[dict], bool], timeout: float | None = None) -> dict:
        """The first event (already sent or to come) for which `predicate` is true."""
        for ev in self.sent_events:
            if predicate(ev):
                return ev
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._event_waiters.append((predicate, fut))
        return await asyncio.wait_for(fut, timeout)

    def events_of(self, type_: str) -> list[dict[str, Any]]:
        return [e for e in self.sent_events if e.get("type") == type_]

    def output_audio(self, origin: float | None = None, sample_rate: int | None = None) -> np.ndarray:
        """All agent audio on one int16 timeline starting at `origin` (default: transport creation).

        Each frame lands at the time it was sent, so the result lines up with the input timeline:
        gaps are silence, and a barge-in shows as speech stopping early.
        """
        rate = sample_rate or self.output_sample_rate
        origin = self.started_at if origin is None else origin
        if not self.sent_audio:
            return np.zeros(0, np.int16)
        end = max(int(round((s.sent_at - origin) * rate)) + s.frame.samples_per_channel for s in self.sent_audio)
        out = np.zeros(max(end, 0), np.int32)
        pos = 0
        for s in self.sent_audio:
            x = to_pcm16(s.frame.samples if s.frame.samples.ndim == 1 else s.frame.samples[:, 0])
            # Frames are paced to be contiguous; snap to the previous frame's end when within a frame
            # so scheduling jitter does not cut holes or overlaps into the waveform.
            at = int(round((s.sent_at - origin) * rate))
            if abs(at - pos) < x.shape[0]:
                at = pos
            at = max(at, 0)
            out[at : at + x.shape[0]] += x[: max(0, out.shape[0] - at)]
            pos = at + x.shape[0]
        return np.clip(out, -32768, 32767).astype(np.int16)

    # --- the Transport protocol ------------------------------------------------------------------

    async def audio_in(self) -> AsyncIterator[AudioFrame]:  # type: ignore[override]
        while True:
            item = await self._in.get()
            if item is _EOF:
                return
            yield item  # type: ignore[misc]

    async def send_audio(self, frame: AudioFrame) -> None:
        if self.closed:
            raise TransportClosed("in-process transport closed")
        self.sent_audio.append(SentFrame(frame, time.monotonic()))
        if self.on_audio_out is not None:
            result = self.on_audio_out(frame)
            if asyncio.iscoroutine(result):
                await result

    def recall_audio(self) -> float:
        return 0.0  # nothing is held: every frame reached the far end when it was sent

    async def send_event(self, event: Mapping[str, Any]) -> None:
        ev = dict(event)
        self.sent_events.append(ev)
        for pair in list(self._event_waiters):
            predicate, fut = pair
            if not fut.done() and predicate(ev):
                fut.set_result(ev)
                self._event_waiters.remove(pair)

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._in.put_nowait(_EOF)


def _mix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a + b over a's length, in a's dtype (int16 saturates)."""
    n = a.shape[0]
    b = np.asarray(b)[:n]
    if a.dtype == np.int16:
        bb = to_pcm16(b)
        out = a.astype(np.int32)
        out[: bb.shape[0]] += bb
        return np.clip(out, -32768, 32767).astype(np.int16)
    bb = b.astype(np.float32) / 32768.0 if b.dtype == np.int16 else b.astype(np.float32)
    out = a.astype(np.float32).copy()
    out[: bb.shape[0]] += bb
    return np.clip(out, -1.0, 1.0)
