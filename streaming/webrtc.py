"""One browser (or any WebRTC peer) as a `Transport`: Opus audio both ways and an `events` data channel.

The signalling (offer/answer over HTTP) lives with the server; this module takes an
`RTCPeerConnection` whose remote offer is being applied and turns it into the four calls a session
makes. What WebRTC asks of us that a plain socket would not:

- Outgoing audio must be a continuous, real-time stream. aiortc pulls frames from a track as fast
  as `recv()` returns them, so `AgentAudioTrack` paces itself at 20 ms and fills the gaps between
  answers with silence. The session's playout already paces speech; the track keeps at most a few
  frames queued, so a barge-in flush in the playout is heard within ~one frame, not after a backlog.
- A speech frame that arrives a little late must not be replaced by silence (a click mid-word):
  while speaking, the track waits a short grace past each frame's slot before giving up.
- The data channel is opened by the client, possibly after the session has already sent events:
  those are held in a small bounded buffer and delivered when it opens.
- A peer can vanish without a goodbye. Connection state `failed`/`closed`, or no inbound audio for
  `media_timeout_s`, ends `audio_in()`, which ends the session.

This module never imports `rejoinder.agent`: control messages from the data channel are handed to
whatever callback the server installs.
"""
from __future__ import annotations

import asyncio
import fractions
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import av
import numpy as np
from aiortc import MediaStreamTrack, RTCDataChannel, RTCPeerConnection
from aiortc.mediastreams import MediaStreamError

from .frames import AudioFrame, to_pcm16
from .resample import StreamResampler
from .transport import TransportClosed, event_json

log = logging.getLogger("rejoinder.streaming.webrtc")

__all__ = ["AgentAudioTrack", "WebRTCOptions", "WebRTCStats", "WebRTCTransport", "av_to_audio_frame",
           "restrict_ice_hosts"]

RTC_RATE = 48_000  # Opus always runs at 48 kHz; handing it anything else costs a second resampling
FRAME_MS = 20
FRAME_SAMPLES = RTC_RATE * FRAME_MS // 1000
EVENTS_LABEL = "events"

def restrict_ice_hosts(hosts: Sequence[str] | None) -> None:
    """Use only `hosts` for ICE, for every peer connection of this process.

    Both ends of every candidate pair: only these addresses are offered as host candidates, and
    connectivity checks (STUN) arriving from any other address are ignored, so a peer on the same
    machine that also gathers its other interface addresses (a browser) can only pair over these.
    aioice gathers host candidates from every interface address except 127.0.0.1 and has no
    per-connection setting for it, so the choice is process-wide: tests, benchmarks and load suites
    give ("127.0.0.1",) to keep all media on the loopback; `None` or () restores aioice's defaults.
    """
    import aioice.ice

    state = aioice.ice.__dict__.setdefault("_rejoinder_originals", {
        "hosts": aioice.ice.get_host_addresses, "received": aioice.ice.StunProtocol.datagram_received})
    if not hosts:
        aioice.ice.get_host_addresses = state["hosts"]
        aioice.ice.StunProtocol.datagram_received = state["received"]
        return
    chosen = [h for h in dict.fromkeys(hosts) if h]
    allowed = frozenset(chosen)
    received = state["received"]

    def host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [h for h in chosen if (":" in h and use_ipv6) or (":" not in h and use_ipv4)]

    def datagram_received(self: Any, data: bytes | str, addr: tuple[Any, ...]) -> None:
        if addr[0] in allowed:
            received(self, data, addr)

    aioice.ice.get_host_addresses = host_addresses
    aioice.ice.StunProtocol.datagram_received = datagram_received
    log.info("ICE restricted to %s", ", ".join(chosen))


ControlHandler = Callable[[dict[str, Any]], "Awaitable[Mapping[str, Any] | None] | Mapping[str, Any] | None"]


@dataclass(frozen=True)
class WebRTCOptions:
    # Inbound audio silent for this long (after the first frame) means the peer vanished.
    media_timeout_s: float = 20.0
    # How long audio_in() waits for the first inbound frame (ICE + DTLS + first RTP).
    first_media_timeout_s: float = 30.0
    # Speech frames held in the outgoing track; send_audio waits for room beyond that.
    max_queued_frames: int = 3
    # While speaking, how long past its slot a frame may arrive before silence is sent instead.
    # A full frame: the playout's wake-ups on a busy 2-core box run late by more than 12 ms about
    # once every 8 s (an audible gap each time); at 20 ms none were seen.
    late_frame_grace_s: float = 0.02
    # Events kept while the data channel is not open yet (oldest dropped beyond that).
    max_pending_events: int = 256
    # A peer that stops reading its data channel must not make us buffer without end.
    max_channel_buffered_bytes: int = 1 << 20
    # Data channel messages larger than this are ignored (a control message is tiny).
    max_message_bytes: int = 16 << 10


@dataclass
class WebRTCStats:
    frames_in: int = 0
    frames_out_speech: int = 0
    frames_out_silence: int = 0
    late_frames: int = 0  # speech frames that arrived after their slot but within the grace
    speech_runs: int = 0  # silence -> speech transitions: one per answer when pacing holds up
    dropped_out_frames: int = 0  # send_audio found the track not being consumed
    events_sent: int = 0
    events_dropped: int = 0
    messages_in: int = 0
    first_audio_in_at: float | None = None
    first_speech_out_at: float | None = None  # the track handed the first speech frame to the encoder


def av_to_audio_frame(frame: av.AudioFrame, received_at: float | None = None) -> AudioFrame:
    """An aiortc/PyAV frame as our AudioFrame (int16 or float32, shape (n,) or (n, channels)).

    Timestamp: the receive time minus the frame's duration, i.e. the latest its first sample can
    have been captured (WebRTC does not carry capture times to us).
    """
    received_at = time.monotonic() if received_at is None else received_at
    channels = len(frame.layout.channels)
    fmt = frame.format
    if fmt.name not in ("s16", "s16p", "flt", "fltp"):
        # Opus decodes to s16; anything else (a future codec) is normalised once here.
        frame = av.AudioResampler(format="s16", layout=frame.layout.name, rate=frame.sample_rate).resample(frame)[0]
        fmt = frame.format
    x = frame.to_ndarray()
    if fmt.is_planar:
        x = x.T  # (channels, n) -> (n, channels)
    else:
        x = x.reshape(-1, channels)
    x = np.ascontiguousarray(x[:, 0] if channels == 1 else x)
    rate = int(frame.sample_rate)
    n = x.shape[0]
    return AudioFrame(x, rate, channels, received_at - n / rate)


class AgentAudioTrack(MediaStreamTrack):
    """The agent's voice as an aiortc audio track: queued 20 ms 48 kHz mono frames, silence between."""

    kind = "audio"

    def __init__(self, options: WebRTCOptions | None = None, stats: WebRTCStats | None = None) -> None:
        super().__init__()
        self.options = options or WebRTCOptions()
        self.stats = stats or WebRTCStats()
        self._queue: deque[np.ndarray] = deque()
        self._has_frame = asyncio.Event()
        self._has_room = asyncio.Event()
        self._has_room.set()
        self._due: float | None = None  # monotonic time the next frame is due
        self._speaking = False
        self._pts = 0
        self._last_pull: float | None = None  # the encoder's last recv(); None: not started yet
        self._time_base = fractions.Fraction(1, RTC_RATE)
        self._silence = np.zeros(FRAME_SAMPLES, dtype=np.int16)

    @property
    def queued_frames(self) -> int:
        return len(self._queue)

    def clear(self) -> int:
        """Drop queued speech (hang-up); returns how many frames were dropped."""
        n = len(self._queue)
        self._queue.clear()
        self._has_room.set()
        return n

    async def put(self, pcm: np.ndarray) -> None:
        """Queue one 20 ms int16 frame; waits while the queue is full and the encoder is pulling."""
        if self.readyState != "live":
            raise TransportClosed("outgoing audio track stopped")
        while len(self._queue) >= self.options.max_queued_frames:
            self._has_room.clear()
            try:
                # Two frame periods is plenty for a consumer that is running; past that it is not
                # (not connected yet, or stalled), and blocking the playout would only delay the
                # session's own clock, so the oldest frame makes room instead.
                await asyncio.wait_for(self._has_room.wait(), 2 * FRAME_MS / 1000)
            except asyncio.TimeoutError:
                self._queue.popleft()
                self.stats.dropped_out_frames += 1
                if self.stats.dropped_out_frames in (1, 100) or self.stats.dropped_out_frames % 1000 == 0:
                    log.info("outgoing audio not consumed; dropped %d frames so far", self.stats.dropped_out_frames)
            if self.readyState != "live":
                raise TransportClosed("outgoing audio track stopped")
        self._queue.append(pcm)
        self._has_frame.set()

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        frame_s = FRAME_MS / 1000
        now = time.monotonic()
        self._last_pull = now
        if self._due is None or now - self._due > 0.2:
            # First pull, or the loop stalled: restart the clock rather than burst stale slots.
            self._due = now
        pcm: np.ndarray | None = self._queue.popleft() if self._queue else None
        if pcm is None:
            deadline = self._due + (self.options.late_frame_grace_s if self._speaking else 0.0)
            while not self._queue and deadline > (now := time.monotonic()):
                self._has_frame.clear()
                try:
                    await asyncio.wait_for(self._has_frame.wait(), deadline - now)
                except asyncio.TimeoutError:
                    break
            if self._queue:
                pcm = self._queue.popleft()
                if self._speaking and time.monotonic() > self._due:
                    self.stats.late_frames += 1
        now = time.monotonic()
        if pcm is not None:
            if not self._speaking:
                # Speech starting after silence goes out now, and the slot clock restarts on it, so
                # the playout's frames (paced on the same monotonic clock) land in phase.
                self._due = now
                self.stats.speech_runs += 1
            elif self._due > now:
                await asyncio.sleep(self._due - now)
            if self.stats.first_speech_out_at is None:
                self.stats.first_speech_out_at = time.monotonic()
            self._speaking = True
            self.stats.frames_out_speech += 1
        else:
            if self._due > now:
                await asyncio.sleep(self._due - now)
            self._speaking = False
            self.stats.frames_out_silence += 1
            pcm = self._silence
        self._due += frame_s
        self._has_room.set()
        if self.readyState != "live":
            raise MediaStreamError
        out = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        out.sample_rate = RTC_RATE
        out.pts = self._pts
        out.time_base = self._time_base
        self._pts += FRAME_SAMPLES
        return out


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
        self._resampler: StreamResampler | None = None
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
        while not self.closed:
            try:
                got = await self._race(track.recv(), timeout)
            except MediaStreamError:
                await self.close("peer's audio track ended")
                return
            if got is None:
                if not self.closed:
                    reason = "no media" if self.stats.first_audio_in_at is None else "media timeout"
                    log.info("%s: %s after %.0f s; closing", self.name, reason, timeout)
                    await self.close(reason)
                return
            now = time.monotonic()
            if self.stats.first_audio_in_at is None:
                self.stats.first_audio_in_at = now
                timeout = self.options.media_timeout_s
            self.stats.frames_in += 1
            yield av_to_audio_frame(got, now)

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

    async def send_audio(self, frame: AudioFrame) -> None:
        if self.closed:
            raise TransportClosed(f"WebRTC peer gone ({self.close_reason})")
        now = time.monotonic()
        if self._last_send_audio is not None and now - self._last_send_audio > 0.25 and self._out_buf.size:
            # A new answer after a pause: a few ms left over from the last one would otherwise be
            # glued to its start.
            self._out_buf = np.zeros(0, dtype=np.float32)
            if self._resampler is not None:
                self._resampler.reset()
        self._last_send_audio = now
        if frame.sample_rate == RTC_RATE and frame.samples_per_channel == FRAME_SAMPLES and not self._out_buf.size:
            await self.output_track.put(_to_int16_mono(frame))
            return
        if self._resampler is None or self._resampler.from_rate != frame.sample_rate:
            self._resampler = StreamResampler(frame.sample_rate, RTC_RATE)
        y = self._resampler.process(frame.to_float_mono())
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


def _to_int16_mono(frame: AudioFrame) -> np.ndarray:
    x = frame.samples
    if x.ndim == 2:
        x = x[:, 0] if x.shape[1] == 1 else frame.to_float_mono()
    return np.ascontiguousarray(to_pcm16(x))
