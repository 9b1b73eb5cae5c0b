"""How does Rejoinder's own session talk to a LiveKit room? `LiveKitTransport`, one participant as a `Transport`.

`rejoinder livekit` (the worker in `rejoinder.agent.cli.livekit`) carries the full-duplex session
over a LiveKit room: the participant's microphone track in, an agent audio track out, session events as
data packets on "rejoinder.events", transcriptions as `lk.transcription` text streams (the format the
LiveKit clients render), the agent state as the `lk.agent.state` participant attribute.

Also here, because both this transport and the livekit-agents plugins need them: `from_rtc_frame` /
`to_rtc_frame`, between LiveKit's int16 `rtc.AudioFrame` and our `AudioFrame`.

This module needs only the LiveKit SDK (`livekit.rtc`), never `livekit.agents`, and, like every
transport, never imports `rejoinder.agent`.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from typing import Any, Protocol

import numpy as np
from livekit import rtc

from .frames import AudioFrame, to_pcm16
from .resample import StreamResampler
from .transport import TransportClosed, event_json

log = logging.getLogger("rejoinder.streaming.livekit")

__all__ = [
    "TOPIC_EVENTS",
    "TOPIC_TRANSCRIPTION",
    "LiveKitTransport",
    "RoomLink",
    "from_rtc_frame",
    "to_rtc_frame",
]


# --- frames ---------------------------------------------------------------------------------------


def from_rtc_frame(frame: rtc.AudioFrame, timestamp: float | None = None) -> AudioFrame:
    """A LiveKit frame (int16 interleaved) as our AudioFrame, without rescaling."""
    x = np.frombuffer(frame.data, dtype=np.int16).copy()
    if frame.num_channels > 1:
        x = x.reshape(-1, frame.num_channels)
    return AudioFrame(x, frame.sample_rate, frame.num_channels, time.monotonic() if timestamp is None else timestamp)


def to_rtc_frame(frame: AudioFrame) -> rtc.AudioFrame:
    """Our AudioFrame (int16 or float in [-1, 1], mono or (n, channels)) as a LiveKit int16 frame."""
    x = to_pcm16(frame.samples)
    n = int(x.shape[0]) if x.ndim else 0
    return rtc.AudioFrame(
        data=np.ascontiguousarray(x).reshape(-1).tobytes(),
        sample_rate=frame.sample_rate,
        num_channels=frame.channels,
        samples_per_channel=n,
    )


# --- the transport -------------------------------------------------------------------------------


class _TextWriter(Protocol):
    async def write(self, text: str) -> None: ...

    async def aclose(self) -> None: ...


class RoomLink(Protocol):
    """What the transport needs of the agent's side of a room (an `rtc.LocalParticipant` is one)."""

    async def publish_data(self, payload: bytes | str, *, reliable: bool = True, topic: str = "") -> None: ...

    async def stream_text(
        self, *, topic: str = "", attributes: dict[str, str] | None = None, sender_identity: str | None = None
    ) -> _TextWriter: ...

    async def set_attributes(self, attributes: dict[str, str]) -> None: ...


TOPIC_EVENTS = "rejoinder.events"
TOPIC_TRANSCRIPTION = "lk.transcription"
_AGENT_STATES = {"listening": "listening", "user_speaking": "listening", "thinking": "thinking", "speaking": "speaking"}
_EOF = object()


class LiveKitTransport:
    """One LiveKit participant as a `rejoinder.streaming.transport.Transport`.

    Audio in is the participant's microphone track (delivered by LiveKit at `input_sample_rate`, so the
    resampling happens natively); audio out goes to an `rtc.AudioSource` published as the agent's track.
    Session events are published as JSON data packets on topic "rejoinder.events", and the ones the
    LiveKit clients understand are also translated: transcripts to `lk.transcription` text streams
    (user segments sent on the user's behalf, tied to their track), the agent state to `lk.agent.state`.

    An interruption clears the source's queue, so audio already handed to LiveKit stops at once instead
    of playing out the queue.
    """

    def __init__(
        self,
        *,
        source: rtc.AudioSource,
        audio: AsyncIterable[rtc.AudioFrameEvent] | AsyncIterable[rtc.AudioFrame],
        link: RoomLink | None = None,
        user_identity: str = "",
        user_track_sid: Callable[[], str] | str = "",
        agent_track_sid: str = "",
        input_queue_frames: int = 500,
    ) -> None:
        self.output_sample_rate = source.sample_rate
        self.audio_lead_s = 0.0  # the source paces what it is given (its own queue is the reserve)
        self._source = source
        self._audio = audio
        self._link = link
        self._user_identity = user_identity
        self._user_track_sid = user_track_sid
        self._agent_track_sid = agent_track_sid
        self._in: asyncio.Queue[Any] = asyncio.Queue(input_queue_frames)
        self._pump: asyncio.Task[None] | None = None
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._publisher: asyncio.Task[None] | None = None
        self._resampler: StreamResampler | None = None
        self._closed = False
        self._dropped = 0
        self.frames_in = 0
        self.frames_out = 0

    # --- construction in a room -----------------------------------------------------------------

    @classmethod
    async def join(
        cls,
        room: rtc.Room,
        participant: rtc.RemoteParticipant,
        *,
        output_sample_rate: int = 48_000,
        input_sample_rate: int = 16_000,
        track_name: str = "rejoinder",
    ) -> LiveKitTransport:
        """Publish the agent's audio track in `room` and listen to `participant`'s microphone."""
        source = rtc.AudioSource(output_sample_rate, 1, queue_size_ms=200)
        track = rtc.LocalAudioTrack.create_audio_track(track_name, source)
        pub = await room.local_participant.publish_track(
            track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
        )
        audio = rtc.AudioStream.from_participant(
            participant=participant, track_source=rtc.TrackSource.SOURCE_MICROPHONE,
            sample_rate=input_sample_rate, num_channels=1,
        )

        def user_track_sid() -> str:
            # The microphone publication may arrive after we start: look it up when a transcript goes out.
            for p in participant.track_publications.values():
                if p.source == rtc.TrackSource.SOURCE_MICROPHONE:
                    return p.sid
            return ""

        return cls(
            source=source, audio=audio, link=room.local_participant, user_identity=participant.identity,
            user_track_sid=user_track_sid, agent_track_sid=pub.sid,
        )

    # --- the Transport protocol -----------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    async def audio_in(self) -> AsyncIterator[AudioFrame]:
        if self._pump is None:
            self._pump = asyncio.create_task(self._read_audio(), name="rejoinder-livekit-audio-in")
        while True:
            item = await self._in.get()
            if item is _EOF:
                return
            yield item

    async def _read_audio(self) -> None:
        try:
            async for ev in self._audio:
                frame = ev.frame if isinstance(ev, rtc.AudioFrameEvent) else ev
                self._put_in(from_rtc_frame(frame))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("LiveKit audio stream failed")
        self._put_in(_EOF)

    def _put_in(self, item: Any) -> None:
        if self._in.full():
            # The session stalled for seconds: old audio is worth less than the newest (and EOF must land).
            with contextlib.suppress(asyncio.QueueEmpty):
                self._in.get_nowait()
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 500 == 0:
                log.warning("session not reading audio: dropped %d frame(s)", self._dropped)
        self._in.put_nowait(item)
        if item is not _EOF:
            self.frames_in += 1

    async def send_audio(self, frame: AudioFrame) -> None:
        if self._closed:
            raise TransportClosed("LiveKit transport closed")
        out = self._to_output(frame)
        if out is None:
            return
        await self._source.capture_frame(out)
        self.frames_out += 1

    def recall_audio(self) -> float:
        """Drop what the source still queues (a barge-in under review stops at once); its seconds."""
        seconds = float(self._source.queued_duration)
        self._source.clear_queue()
        self._resampler = None
        return seconds

    def _to_output(self, frame: AudioFrame) -> rtc.AudioFrame | None:
        rate = self.output_sample_rate
        if frame.sample_rate == rate and frame.channels == 1:
            return to_rtc_frame(frame)
        if self._resampler is None or self._resampler.from_rate != frame.sample_rate:
            self._resampler = StreamResampler(frame.sample_rate, rate)
        y = self._resampler.process(frame.to_float_mono())
        if y.size == 0:
            return None
        return to_rtc_frame(AudioFrame(y, rate, 1, frame.timestamp))

    async def send_event(self, event: Mapping[str, Any]) -> None:
        ev = dict(event)
        kind = ev.get("type")
        interrupted = (kind == "barge_in" and ev.get("outcome") == "interruption") or (
            kind == "agent_speech" and not ev.get("started") and ev.get("interrupted")
        )
        if interrupted:
            self._source.clear_queue()
            self._resampler = None  # its filter holds the tail of the interrupted answer
        if self._link is None or self._closed:
            return
        # Publishing waits on the network; the session must not. One task publishes in order.
        self._events.put_nowait(ev)
        if self._publisher is None:
            self._publisher = asyncio.create_task(self._publish(), name="rejoinder-livekit-events")

    async def _publish(self) -> None:
        assert self._link is not None
        while True:
            ev = await self._events.get()
            if ev is _EOF:
                return
            try:
                await self._publish_one(self._link, ev)
            except Exception as exc:  # noqa: BLE001 - one lost event must not end the call
                log.warning("could not publish a %s event to the room: %s", ev.get("type"), exc)

    async def _publish_one(self, link: RoomLink, ev: dict[str, Any]) -> None:
        kind = ev.get("type")
        await link.publish_data(event_json(ev).encode(), reliable=True, topic=TOPIC_EVENTS)
        if kind == "transcript":
            sid = self._user_track_sid() if callable(self._user_track_sid) else self._user_track_sid
            await self._transcription(
                link, str(ev.get("text", "")), f"user-{ev.get('utterance_id')}", bool(ev.get("final")), sid,
                self._user_identity or None,
            )
        elif kind == "agent_text":
            await self._transcription(
                link, str(ev.get("text", "")), f"agent-{ev.get('turn')}", bool(ev.get("final")),
                self._agent_track_sid, None,
            )
        elif kind == "state" and ev.get("new") in _AGENT_STATES:
            await link.set_attributes({"lk.agent.state": _AGENT_STATES[ev["new"]]})

    @staticmethod
    async def _transcription(
        link: RoomLink, text: str, segment: str, final: bool, track_sid: str, sender: str | None
    ) -> None:
        attributes = {"lk.segment_id": segment, "lk.transcription_final": "true" if final else "false"}
        if track_sid:
            attributes["lk.transcribed_track_id"] = track_sid
        # A whole-text update per stream, as livekit-agents' own non-delta transcription output does.
        writer = await link.stream_text(topic=TOPIC_TRANSCRIPTION, attributes=attributes, sender_identity=sender)
        await writer.write(text)
        await writer.aclose()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._put_in(_EOF)
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
        aclose = getattr(self._audio, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
        if self._publisher is not None:
            self._events.put_nowait(_EOF)
            try:
                await asyncio.wait_for(self._publisher, 2.0)  # the last transcripts are worth a moment
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001
                self._publisher.cancel()
        with contextlib.suppress(Exception):
            await self._source.aclose()
