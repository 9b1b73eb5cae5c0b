"""One browser (or any WebRTC peer) as a `Transport`: Opus audio both ways and an `events` data channel.

The signalling (offer/answer over HTTP) lives with the server; this module takes an
`RTCPeerConnection` whose remote offer is being applied and turns it into the four calls a session
makes. What WebRTC asks of us that a plain socket would not:

- Outgoing audio must be a continuous, real-time stream. aiortc pulls frames from a track as fast
  as `recv()` returns them, so `AgentAudioTrack` (rtc_track.py) paces itself at 20 ms and fills the gaps between
  answers with silence. The session's playout already paces speech; the track keeps at most a few
  frames queued, so a barge-in flush in the playout is heard within ~one frame, not after a backlog.
- A speech frame that arrives a little late must not be replaced by silence (a click mid-word):
  while speaking, the track waits a short grace past each frame's slot before giving up.
- Nothing waits that need not: received packets go to the decoder the moment they arrive in order
  (`rtc_jitter`: aiortc's buffer would hold four), and audio at another rate is resampled with a
  few samples of delay (libswresample) and its first frame sent at once, not when a second arrives.
- The data channel is opened by the client, possibly after the session has already sent events:
  those are held in a small bounded buffer and delivered when it opens.
- A peer can vanish without a goodbye. Connection state `failed`/`closed`, or no inbound audio for
  `media_timeout_s`, ends `audio_in()`, which ends the session.

Every stage of both directions is timed (`rtc_stats.WebRTCStats`, on the transport as `stats`;
`stats_snapshot()` is what a peer gets for `{"type": "transport_stats"}` on the data channel).

This module never imports `rejoinder.agent`: control messages from the data channel are handed to
whatever callback the server installs.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from typing import Any

import av
import numpy as np
from aiortc import MediaStreamTrack, RTCDataChannel, RTCPeerConnection
from aiortc.mediastreams import MediaStreamError

from .frames import AudioFrame, to_pcm16
from .rtc_audio import RTC_RATE, Resampler, av_to_audio_frame, to_int16_mono
from .rtc_ice import restrict_ice_hosts
from .rtc_jitter import AudioJitterBuffer, install_jitter_buffer
from .rtc_options import FRAME_MS, FRAME_SAMPLES, WebRTCOptions
from .rtc_stats import InboundFrame, WebRTCStats
from .rtc_track import AgentAudioTrack
from .transport import TransportClosed, event_json

log = logging.getLogger("rejoinder.streaming.webrtc")

__all__ = ["FRAME_MS", "FRAME_SAMPLES", "AgentAudioTrack", "WebRTCOptions", "WebRTCStats", "WebRTCTransport",
           "av_to_audio_frame", "restrict_ice_hosts"]

EVENTS_LABEL = "events"

ControlHandler = Callable[[dict[str, Any]], "Awaitable[Mapping[str, Any] | None] | Mapping[str, Any] | None"]


class WebRTCTransport:
    """A `Transport` over one RTCPeerConnection.

    Create it before `setRemoteDescription(offer)` so the peer's track and data channel are caught;
    add `output_track` to the connection before creating the answer. `on_control` receives every
    JSON object the peer sends on the data channel (the server maps them to session commands); what
    it returns, if anything, is sent back as an event.
    """

    output_sample_rate: int = RTC_RATE

    def __init__(
        self,
        pc: RTCPeerConnection,
        *,
        options: WebRTCOptions | None = None,
        on_control: ControlHandler | None = None,
        name: str = "",
    ) -> None:
        self.pc = pc
        self.options = options or WebRTCOptions()
        self.stats = WebRTCStats()
        self.name = name or hex(id(self))
        self.on_control = on_control
        self.output_track = AgentAudioTrack(self.options, self.stats)
        self.closed = False
        self.close_reason = ""
        self._closed_event = asyncio.Event()
        self._input_track: MediaStreamTrack | None = None
        self._input_ready = asyncio.Event()
        self._channel: RTCDataChannel | None = None
        self._pending: deque[str] = deque(maxlen=self.options.max_pending_events)
        self._jitter: AudioJitterBuffer | None = None
        self._resampler: Resampler | None = None
        self._out_buf = np.zeros(0, dtype=np.float32)
        self._last_send_audio: float | None = None
        self.connected = asyncio.Event()  # ICE + DTLS up: media can flow
        self._tasks: set[asyncio.Task[Any]] = set()  # control replies, closing: cancelled at close()
        pc.on("track", self._on_track)
        pc.on("datachannel", self._on_datachannel)
        pc.on("connectionstatechange", self._on_connection_state)

    # --- peer connection callbacks ----------------------------------------------------------------

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind != "audio" or self._input_track is not None:
            log.info("%s: ignoring extra %s track", self.name, track.kind)
            return
        self._input_track = track
        # Before any packet: the track event comes while the offer is applied, media after DTLS.
        self._jitter = install_jitter_buffer(self.pc, track, self.options.receive_jitter_packets)
        self._input_ready.set()

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if channel.label != EVENTS_LABEL or self._channel is not None:
            log.info("%s: ignoring data channel %r", self.name, channel.label)
            return
        self._channel = channel
        channel.on("message", self._on_message)
        if channel.readyState == "open":
            self._flush_pending()
        else:
            channel.on("open", self._flush_pending)

    def _on_connection_state(self) -> None:
        state = self.pc.connectionState
        log.debug("%s: connection %s", self.name, state)
        if state == "connected":
            self.connected.set()
        elif state in ("failed", "closed") and not self.closed:
            self._spawn(self.close(f"connection {state}"))

    def _on_message(self, message: str | bytes) -> None:
        self.stats.messages_in += 1
        if self.on_control is None:
            return
        if isinstance(message, bytes) or len(message) > self.options.max_message_bytes:
            self._send_text(event_json({"type": "error", "where": "data_channel",
                                        "message": "message too large or binary"}))
            return
        try:
            data = json.loads(message)
        except ValueError:
            self._send_text(event_json({"type": "error", "where": "data_channel", "message": "message is not JSON"}))
            return
        if not isinstance(data, dict):
            self._send_text(event_json({"type": "error", "where": "data_channel",
                                        "message": "message is not an object"}))
            return
        self._spawn(self._run_control(data))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_control(self, data: dict[str, Any]) -> None:
        assert self.on_control is not None
        try:
            result = self.on_control(data)
            if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                result = await result
        except Exception as exc:  # noqa: BLE001 - a bad command must not take the session down
            log.warning("%s: control message failed: %s", self.name, exc)
            result = {"type": "control_result", "ok": False, "error": str(exc), "id": data.get("id")}
        if result is not None:
            await self.send_event(result)

    # --- events -------------------------------------------------------------------------------------

    def _flush_pending(self) -> None:
        while self._pending and self._channel is not None and self._channel.readyState == "open":
            self._send_text(self._pending.popleft())

    def _send_text(self, text: str) -> bool:
        ch = self._channel
        if ch is None or ch.readyState != "open":
            return False
        if ch.bufferedAmount > self.options.max_channel_buffered_bytes:
            self.stats.events_dropped += 1
            if self.stats.events_dropped == 1:
                log.warning("%s: peer is not reading its data channel; dropping events", self.name)
            return True
        try:
            ch.send(text)
        except Exception as exc:  # noqa: BLE001 - the SCTP association may be tearing down under us
            log.debug("%s: data channel send failed: %s", self.name, exc)
            return False
        self.stats.events_sent += 1
        return True

    async def send_event(self, event: Mapping[str, Any]) -> None:
        if self.closed:
            return  # late events of an ended session are harmless; raising would only add noise
        text = event_json(event)
        if self._send_text(text):
            return
        if len(self._pending) == self._pending.maxlen:
            self.stats.events_dropped += 1
        self._pending.append(text)

    # --- audio ------------------------------------------------------------------------------------

    async def audio_in(self) -> AsyncIterator[AudioFrame]:  # type: ignore[override]
        if not await self._race(self._input_ready.wait(), self.options.first_media_timeout_s):
            if not self.closed:
                await self.close("no audio track from the peer")
            return
        track = self._input_track
        assert track is not None
        timeout = self.options.first_media_timeout_s
        stats = self.stats
        queue = getattr(track, "_queue", None)  # aiortc's decoded-frame queue: how far behind we are
        last: InboundFrame | None = None
        while not self.closed:
            pulled = time.monotonic()
            if last is not None:
                last.done_at = pulled
                stats.stage("in_session", pulled - (last.received_at or pulled))
            try:
                got = await self._race(track.recv(), timeout)
            except MediaStreamError:
                await self.close("peer's audio track ended")
                return
            if got is None:
                if not self.closed:
                    reason = "no media" if stats.first_audio_in_at is None else "media timeout"
                    log.info("%s: %s after %.0f s; closing", self.name, reason, timeout)
                    await self.close(reason)
                return
            now = time.monotonic()
            if stats.first_audio_in_at is None:
                stats.first_audio_in_at = now
                timeout = self.options.media_timeout_s
            stats.frames_in += 1
            if queue is not None:
                stats.max_in_queue = max(stats.max_in_queue, queue.qsize())
            last = self._stamp_inbound(got, now)
            # Dated by the packet's arrival when known: the tightest bound on when it was captured.
            yield av_to_audio_frame(got, last.arrived_at if last.arrived_at is not None else now)

    def _stamp_inbound(self, got: av.AudioFrame, now: float) -> InboundFrame:
        stats, buf = self.stats, self._jitter
        ts = int(got.pts or 0) & 0xFFFFFFFF
        rec = InboundFrame(ts, received_at=now)
        stamps = buf.stamps(ts) if buf is not None else None
        if stamps is not None:
            rec.arrived_at, rec.released_at = stamps
            stats.stage("in_jitter", rec.released_at - rec.arrived_at)
            stats.stage("in_decode", now - rec.released_at)
        if buf is not None:
            stats.packets_in, stats.packets_late, stats.packets_lost = buf.packets, buf.late, buf.lost
        stats.inbound.put(ts, rec)
        return rec

    def stats_snapshot(self, request: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """`stats.snapshot()` for a data-channel request `{"frames_in": [ts…], "frames_out": [ts…]}`."""
        request = request or {}

        def stamps(key: str) -> list[int]:
            v = request.get(key)
            return [int(x) for x in v if isinstance(x, (int, float))] if isinstance(v, list) else []

        out = self.stats.snapshot(stamps("frames_in"), stamps("frames_out"))
        out["now"] = time.monotonic()
        out["out_queued_frames"] = self.output_track.queued_frames
        out["receive_jitter_packets"] = self.options.receive_jitter_packets
        return out

    async def _race(self, aw: Awaitable[Any], timeout: float) -> Any:
        """`aw`'s result, or None on timeout or when the transport closes first."""
        task = asyncio.ensure_future(aw)
        closed = asyncio.ensure_future(self._closed_event.wait())
        try:
            done, _ = await asyncio.wait({task, closed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
        if task in done:
            return task.result()
        task.cancel()
        return None

    @property
    def audio_lead_s(self) -> float:
        """The send reserve: how far ahead of its slot the session hands speech over."""
        return self.options.send_reserve_s

    def recall_audio(self) -> float:
        """Take back the speech queued and not sent yet (the reserve); returns its seconds."""
        seconds = self.output_track.clear() * FRAME_MS / 1000 + self._out_buf.size / RTC_RATE
        self._out_buf = np.zeros(0, dtype=np.float32)
        self._resampler = None  # its filter holds the tail of what was taken back
        return seconds

    async def send_audio(self, frame: AudioFrame) -> None:
        if self.closed:
            raise TransportClosed(f"WebRTC peer gone ({self.close_reason})")
        now = time.monotonic()
        if self._last_send_audio is not None and now - self._last_send_audio > 0.25:
            # A new answer after a pause: a few ms left over from the last one would otherwise be
            # glued to its start.
            self._out_buf = np.zeros(0, dtype=np.float32)
            self._resampler = None
        self._last_send_audio = now
        if frame.sample_rate == RTC_RATE and frame.samples_per_channel == FRAME_SAMPLES and not self._out_buf.size:
            await self.output_track.put(to_int16_mono(frame))
            return
        starting = self._resampler is None
        if starting or self._resampler.from_rate != frame.sample_rate:
            self._resampler = Resampler(frame.sample_rate)
        y = self._resampler.process(frame.to_float_mono())
        if starting and 0 < y.size < FRAME_SAMPLES and not self._out_buf.size:
            # The first frame of an answer goes out now, not when the next call completes it: the
            # resampler's delay (a few samples) becomes silence before the speech instead.
            y = np.concatenate([np.zeros(FRAME_SAMPLES - y.size, np.float32), y])
        self._out_buf = np.concatenate([self._out_buf, y]) if self._out_buf.size else y
        while self._out_buf.size >= FRAME_SAMPLES:
            chunk, self._out_buf = self._out_buf[:FRAME_SAMPLES], self._out_buf[FRAME_SAMPLES:]
            await self.output_track.put(to_pcm16(chunk))

    # --- lifecycle --------------------------------------------------------------------------------

    async def wait_closed(self) -> None:
        await self._closed_event.wait()

    async def close(self, reason: str = "closed") -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        self._closed_event.set()
        log.info(
            "%s: closed (%s); frames in %d, speech out %d, events sent %d dropped %d",
            self.name, reason, self.stats.frames_in, self.stats.frames_out_speech,
            self.stats.events_sent, self.stats.events_dropped,
        )
        self.output_track.clear()
        self.output_track.stop()
        me = asyncio.current_task()
        for t in list(self._tasks):
            if t is not me:
                t.cancel()
        try:
            await self.pc.close()
        except Exception as exc:  # noqa: BLE001 - closing a half-built connection may fail; we are done anyway
            log.debug("%s: pc.close failed: %s", self.name, exc)
