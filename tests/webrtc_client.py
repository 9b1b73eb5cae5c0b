"""A Python WebRTC peer for tests and benchmarks: a microphone you feed from arrays, an ear that records.

    client = RTCClient(base_url)                 # or RTCClient(base_url, token="…", use_whip=True)
    await client.connect()
    spoken_until = await client.say(samples, 16000)   # real-time paced, returns when the last sample left
    await client.wait_event(lambda e: e["type"] == "metrics", 30)
    audio = client.received_audio()              # 48 kHz int16 mono timeline since connect
    heard = client.received_audio(heard=True)    # ... as the page lets a person hear it (muted on barge-in)
    server = await client.server_stats(frames_in=[ts])   # the server's stamps of one of our frames
    await client.close()

It talks to `rejoinder serve` exactly as the web page does (JSON offer or WHIP, an `events` data
channel, Opus both ways) and records, for every frame and event, the monotonic time it arrived,
so latencies measured here include everything a real caller experiences: encoding, the network
stack, the server's receive path, and its own receive path.

Timing, both ways, on the one monotonic clock of the machine (also across processes):
- every microphone frame: its slot (when its first sample was spoken; the frame leaves 20 ms later,
  complete, as from a real microphone), when aiortc's encoder took it, and when the encoder came
  back for the next (so it was encoded and sent); named by its RTP timestamp `ts` (48 kHz samples
  since the first frame), as the server names it;
- every received frame: packet arrival, jitter-buffer release, decoded frame taken, `ts` (the
  server's outgoing track pts), and whether the page-equivalent mute had it silenced.
Its receive jitter buffer releases packets as they arrive (`jitter_packets=0`, like the server):
what it records is what a zero-depth buffer would play; a browser's adaptive buffer (NetEq) adds
its own few tens of ms on top. `jitter_packets=None` keeps aiortc's 4-packet buffer.

The mute: the web page stops playing the agent the moment the session says it paused for a
barge-in, and plays again for what comes next (`AgentAudioGate`, the same rule as web/app.js);
`heard=True` gives the audio through that gate, and `mutes` says when it closed and opened.

Run as a script it is a caller that talks and then just stays (tests kill it to simulate a client
that vanishes without hanging up):
    python tests/webrtc_client.py http://127.0.0.1:8080 question.wav
"""
from __future__ import annotations

import asyncio
import fractions
import json
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import av
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from webrtc_server import LOOPBACK, EchoSession, ServerThread, _free_port, shared_agent  # noqa: F401 - re-exported

from rejoinder.streaming.rtc_jitter import AudioJitterBuffer, install_jitter_buffer
from rejoinder.streaming.rtc_stats import StageStats

RATE = 48_000
FRAME = 960  # 20 ms


class MicTrack(MediaStreamTrack):
    """A microphone that plays what `say()` queued, silence otherwise, at real-time pace.

    Like a real one, it hands over each 20 ms frame when its last sample has been captured: frame n
    holds what was "spoken" during [start + 20n ms, start + 20(n+1) ms) and leaves at the end of it.
    """

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._pending: deque[tuple[np.ndarray, asyncio.Future[Said]]] = deque()
        self._cur: np.ndarray | None = None
        self._cur_pos = 0
        self._cur_done: asyncio.Future[Said] | None = None
        self._cur_start = 0.0
        self._start: float | None = None
        self._n = 0
        self.sent: deque[MicFrame] = deque(maxlen=30_000)  # 10 minutes of 20 ms frames
        self.stages = {"mic_late": StageStats(), "mic_encode_send": StageStats()}

    def slot(self, ts: int) -> float | None:
        """When the first sample of the frame of RTP timestamp `ts` was spoken (None before the first frame)."""
        return None if self._start is None else self._start + ts / RATE

    def ts_at(self, t: float) -> int:
        """RTP timestamp of the frame holding what was spoken at time `t`."""
        assert self._start is not None, "the microphone has not started"
        return int((t - self._start) * RATE // FRAME) * FRAME

    def queue(self, pcm48: np.ndarray) -> asyncio.Future[Said]:
        """Queue int16 48 kHz mono; the future gets when its first and last frames were sent."""
        fut: asyncio.Future[Said] = asyncio.get_running_loop().create_future()
        self._pending.append((pcm48, fut))
        return fut

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        entered = time.monotonic()
        if self.sent and self.sent[-1].sent_at is None:
            self.sent[-1].sent_at = entered  # the encoder is back: the last frame was encoded and sent
            self.stages["mic_encode_send"].add(entered - self.sent[-1].handed_at)
        if self._start is None:
            self._start = entered - FRAME / RATE  # frame 0 was being captured until now
        else:
            wait = self._start + (self._n + 1) * FRAME / RATE - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        out = np.zeros(FRAME, np.int16)
        filled = 0
        while filled < FRAME:
            if self._cur is None:
                if not self._pending:
                    break
                self._cur, self._cur_done = self._pending.popleft()
                self._cur_pos = 0
                # The frame's slot time, not now: the encoder may pull a few ms late.
                self._cur_start = self._start + (self._n * FRAME + filled) / RATE
            k = min(FRAME - filled, self._cur.shape[0] - self._cur_pos)
            out[filled : filled + k] = self._cur[self._cur_pos : self._cur_pos + k]
            filled += k
            self._cur_pos += k
            if self._cur_pos >= self._cur.shape[0]:
                if self._cur_done is not None and not self._cur_done.done():
                    end = self._start + (self._n * FRAME + filled) / RATE
                    self._cur_done.set_result(Said(self._cur_start, max(end, self._cur_start)))
                self._cur = None
        frame = av.AudioFrame.from_ndarray(out.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = self._n * FRAME
        frame.time_base = fractions.Fraction(1, RATE)
        slot = self._start + self._n * FRAME / RATE
        handed = time.monotonic()
        self.stages["mic_late"].add(handed - slot - FRAME / RATE)
        self.sent.append(MicFrame(self._n * FRAME, slot, handed, loud=bool(np.any(out))))
        self._n += 1
        return frame


@dataclass
class MicFrame:
    ts: int  # RTP timestamp (48 kHz samples since the first frame): the server's name for it
    slot_at: float  # when its first sample was spoken (captured); it can leave 20 ms later
    handed_at: float  # aiortc's encoder took it
    loud: bool  # not silence
    sent_at: float | None = None  # the encoder's next pull: encoded and sent


@dataclass(frozen=True)
class Said:
    start: float  # monotonic time its first sample was spoken (captured by the microphone)
    end: float  # ... and its last one


@dataclass
class Received:
    at: float  # the decoded frame was taken from aiortc (what a zero-depth buffer plays now)
    pcm: np.ndarray  # int16 mono 48 kHz
    ts: int = 0  # RTP timestamp since the first packet: the pts the server's track gave it
    muted: bool = False  # the page-equivalent mute was closed: a person would not hear this frame
    arrived_at: float | None = None  # its packet arrived
    released_at: float | None = None  # the jitter buffer released it


class AgentAudioGate:
    """When does the page stop playing the agent, and when does it play again? (web/app.js, the same rule)

    Closed: the session paused the agent's audio for a possible interruption (`state` to
    `user_speaking` with reason "barge-in"), or confirmed one (`barge_in`, outcome "interruption"):
    audio already on its way is not played. Open again: a false interruption (`barge_in` outcome
    "noise", "backchannel" or "echo": the answer resumes), a new answer (`agent_speech` started), or
    any state the agent reaches after the interruption (`thinking`, `speaking`, `listening`).
    """

    def __init__(self) -> None:
        self.muted = False

    def update(self, ev: Mapping[str, Any]) -> tuple[bool, str] | None:
        """The new (muted, reason) if `ev` changes the gate, else None."""
        kind = ev.get("type")
        want: bool | None = None
        if kind == "state":
            if ev.get("new") == "user_speaking":
                if ev.get("reason") == "barge-in":
                    want = True
            else:
                want = False
        elif kind == "barge_in":
            want = ev.get("outcome") == "interruption"
        elif kind == "agent_speech" and ev.get("started"):
            want = False
        if want is None or want == self.muted:
            return None
        self.muted = want
        reason = f"{kind}:{ev.get('outcome') or ev.get('new') or ev.get('reason') or ''}"
        return want, reason


@dataclass
class SignallingError(Exception):
    status: int
    body: Any

    def __str__(self) -> str:
        return f"HTTP {self.status}: {self.body}"


@dataclass
class RTCClient:
    base_url: str
    token: str | None = None
    use_whip: bool = False
    origin: str | None = None
    frames: list[Received] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    ice_hosts: tuple[str, ...] = LOOPBACK  # the ICE host candidates this caller offers
    jitter_packets: int | None = 0  # receive buffer depth (None: aiortc's own, 4 packets)
    honour_mute: bool = True  # record `muted` on frames the page would not play (`heard=True` zeroes them)
    source_address: str | None = None  # signal from this local address (e.g. 127.0.0.2: another client)

    def __post_init__(self) -> None:
        from rejoinder.streaming.webrtc import restrict_ice_hosts

        restrict_ice_hosts(self.ice_hosts)  # aioice's setting is per process: the server's is the same
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.mic = MicTrack()
        self.channel = None
        self.session_id: str | None = None
        self.resource: str | None = None
        self.connected_at: float | None = None
        self.offer_sdp = ""
        self.answer_sdp = ""
        self._reader: asyncio.Task | None = None
        self._waiters: list[tuple[Callable[[dict], bool], asyncio.Future]] = []
        self._channel_open = asyncio.Event()
        self._next_id = 0
        self._replies: dict[int, asyncio.Future] = {}
        self.gate = AgentAudioGate()
        self.mutes: list[tuple[float, bool, str]] = []  # (monotonic time, muted, the event that did it)
        self.jitter: AudioJitterBuffer | None = None
        self.stages = {**self.mic.stages, "in_jitter": StageStats(), "in_decode": StageStats()}

    # --- connection ---------------------------------------------------------------------------------

    def _headers(self, content_type: str) -> dict[str, str]:
        h = {"Content-Type": content_type}
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        if self.origin:
            h["Origin"] = self.origin
        return h

    async def connect(self, timeout: float = 20.0) -> None:
        self.pc.addTrack(self.mic)
        self.channel = self.pc.createDataChannel("events")
        self.channel.on("open", self._channel_open.set)
        self.channel.on("message", self._on_message)

        @self.pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            self.jitter = install_jitter_buffer(self.pc, track, self.jitter_packets)
            self._reader = asyncio.ensure_future(self._read(track))

        await self.pc.setLocalDescription(await self.pc.createOffer())
        offer = self.pc.localDescription
        self.offer_sdp = offer.sdp
        async with self._http() as http:
            if self.use_whip:
                async with http.post(f"{self.base_url}/whip", data=offer.sdp,
                                     headers=self._headers("application/sdp")) as r:
                    body = await r.text()
                    if r.status != 201:
                        raise SignallingError(r.status, _maybe_json(body))
                    self.resource = r.headers["Location"]
                    self.session_id = r.headers.get("X-Session-Id")
                    answer = RTCSessionDescription(sdp=body, type="answer")
            else:
                async with http.post(f"{self.base_url}/api/offer",
                                     data=json.dumps({"sdp": offer.sdp, "type": offer.type}),
                                     headers=self._headers("application/json")) as r:
                    body = await r.json(content_type=None)
                    if r.status != 200:
                        raise SignallingError(r.status, body)
                    self.session_id = body["session_id"]
                    self.resource = body.get("resource")
                    answer = RTCSessionDescription(sdp=body["sdp"], type=body["type"])
        self.answer_sdp = answer.sdp
        await self.pc.setRemoteDescription(answer)
        deadline = time.monotonic() + timeout
        while self.pc.connectionState != "connected":
            if time.monotonic() > deadline or self.pc.connectionState in ("failed", "closed"):
                raise TimeoutError(f"WebRTC connection state {self.pc.connectionState}")
            await asyncio.sleep(0.02)
        self.connected_at = time.monotonic()
        await asyncio.wait_for(self._channel_open.wait(), max(0.1, deadline - time.monotonic()))

    def _http(self) -> aiohttp.ClientSession:
        local = (self.source_address, 0) if self.source_address else None
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=local))

    async def hang_up(self) -> int:
        """WHIP-style DELETE of the session resource; returns the HTTP status."""
        assert self.resource is not None
        async with self._http() as http:
            async with http.delete(f"{self.base_url}{self.resource}", headers=self._headers("application/json")) as r:
                return r.status

    async def close(self) -> None:
        self.mic.stop()
        await self.pc.close()
        if self._reader is not None:
            self._reader.cancel()

    # --- audio --------------------------------------------------------------------------------------

    async def _read(self, track: MediaStreamTrack) -> None:
        try:
            while True:
                frame = await track.recv()
                x = frame.to_ndarray().reshape(-1, len(frame.layout.channels))[:, 0].astype(np.int16)
                if frame.sample_rate != RATE:
                    raise AssertionError(f"unexpected rate {frame.sample_rate}")
                now = time.monotonic()
                ts = int(frame.pts or 0) & 0xFFFFFFFF
                got = Received(now, x, ts, self.honour_mute and self.gate.muted)
                stamps = self.jitter.stamps(ts) if self.jitter is not None else None
                if stamps is not None:
                    got.arrived_at, got.released_at = stamps
                    self.stages["in_jitter"].add(got.released_at - got.arrived_at)
                    self.stages["in_decode"].add(now - got.released_at)
                self.frames.append(got)
        except (MediaStreamError, asyncio.CancelledError):
            pass

    async def say(self, samples: np.ndarray, rate: int) -> Said:
        """Speak `samples` (float in [-1, 1] or int16) into the mic; returns once its last frame was sent."""
        from rejoinder.streaming.audio import resample

        x = np.asarray(samples)
        if x.dtype == np.int16:
            x = x.astype(np.float32) / 32768.0
        y = resample(x.astype(np.float32), rate, RATE) if rate != RATE else x
        pcm = (np.clip(y, -1, 1) * 32767).astype(np.int16)
        return await self.mic.queue(pcm)

    def received_audio(self, since: float | None = None, *, heard: bool = False) -> np.ndarray:
        """What arrived since `since`; `heard=True`: with the frames the page would mute as silence."""
        frames = [np.zeros_like(f.pcm) if heard and f.muted else f.pcm
                  for f in self.frames if since is None or f.at >= since]
        return np.concatenate(frames) if frames else np.zeros(0, np.int16)

    def speech_frames(self, threshold: float = 300.0, *, heard: bool = False) -> list[Received]:
        """Received frames with speech-level energy (RMS over `threshold` in int16 units)."""
        return [f for f in self.frames if not (heard and f.muted)
                and float(np.sqrt(np.mean(f.pcm.astype(np.float64) ** 2))) > threshold]

    def first_speech_after(self, t: float, threshold: float = 300.0, *, heard: bool = False) -> float | None:
        for f in self.speech_frames(threshold, heard=heard):
            if f.at > t:
                return f.at
        return None

    def last_speech_before(self, t: float, threshold: float = 300.0, *, heard: bool = False) -> float | None:
        last = None
        for f in self.speech_frames(threshold, heard=heard):
            if f.at <= t:
                last = f.at
        return last

    def frame_at(self, ts: int) -> Received | None:
        """The received frame of RTP timestamp `ts` (the server track's pts)."""
        for f in reversed(self.frames):
            if f.ts == ts:
                return f
            if f.ts < ts:
                return None
        return None

    def stage_summary(self) -> dict[str, dict[str, Any]]:
        return {k: v.to_dict() for k, v in self.stages.items()}

    # --- events -------------------------------------------------------------------------------------

    def _on_message(self, message: str | bytes) -> None:
        # Whatever the server sends must not break the caller: abuse tests make it echo odd ids.
        try:
            ev = json.loads(message)
        except (ValueError, UnicodeDecodeError):
            ev = {"type": "_unparsable", "raw": message[:200]}
        if not isinstance(ev, dict):
            ev = {"type": "_not_an_object", "value": ev}
        ev["_received_at"] = time.monotonic()
        self.events.append(ev)
        change = self.gate.update(ev)
        if change is not None:
            self.mutes.append((ev["_received_at"], *change))
        rid = ev.get("id")
        if ev.get("type") in ("control_result", "transport_stats") and isinstance(rid, (str, int)) \
                and rid in self._replies:
            fut = self._replies.pop(rid)
            if not fut.done():
                fut.set_result(ev)
        for pair in list(self._waiters):
            pred, fut = pair
            try:
                hit = not fut.done() and pred(ev)
            except Exception as exc:  # noqa: BLE001 - a predicate that chokes on an odd event fails its waiter
                if not fut.done():
                    fut.set_exception(exc)
                self._waiters.remove(pair)
                continue
            if hit:
                fut.set_result(ev)
                self._waiters.remove(pair)

    async def wait_event(self, predicate: Callable[[dict], bool], timeout: float, *, after: float = 0.0) -> dict:
        for ev in self.events:
            if ev["_received_at"] >= after and predicate(ev):
                return ev
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._waiters.append((lambda e: e["_received_at"] >= after and predicate(e), fut))
        return await asyncio.wait_for(fut, timeout)

    def events_of(self, type_: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("type") == type_]

    async def control(self, command: str, args: dict[str, Any] | None = None, timeout: float = 10.0) -> dict:
        self._next_id += 1
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._replies[self._next_id] = fut
        self.channel.send(json.dumps({"type": "control", "id": self._next_id, "command": command, "args": args or {}}))
        return await asyncio.wait_for(fut, timeout)

    async def server_stats(self, frames_in: list[int] | tuple[int, ...] = (),
                           frames_out: list[int] | tuple[int, ...] = (), timeout: float = 10.0) -> dict:
        """The server's `WebRTCStats` snapshot of this connection, with its stamps of the frames named."""
        self._next_id += 1
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._replies[self._next_id] = fut
        self.channel.send(json.dumps({"type": "transport_stats", "id": self._next_id,
                                      "frames_in": [int(t) for t in frames_in],
                                      "frames_out": [int(t) for t in frames_out]}))
        return await asyncio.wait_for(fut, timeout)

    def media_pairs(self) -> list[tuple[str, str]]:
        """(local, remote) addresses of the ICE pairs in use (aioice's nominated pairs)."""
        out = []
        for t in self.pc.getTransceivers():
            conn = t.receiver.transport.transport._connection  # aioice.Connection: no public accessor
            out += [(p.local_candidate.host, p.remote_candidate.host) for p in conn._nominated.values()]
        return out

    def send_raw(self, text: str) -> None:
        self.channel.send(text)


async def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return predicate()


async def post(url: str, body: bytes | str, content_type: str = "application/json", headers: dict | None = None,
               source_address: str | None = None) -> tuple[int, str, dict[str, str]]:
    """POST `body`; (status, text, headers). `source_address`: send from this local address."""
    connector = aiohttp.TCPConnector(local_addr=(source_address, 0) if source_address else None)
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.post(url, data=body, headers={"Content-Type": content_type, **(headers or {})}) as r:
            return r.status, await r.text(), dict(r.headers)


async def audio_offer(**kw: Any) -> str:
    """A valid offer (audio + data channel) from a peer that is closed at once: it never connects."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("audio", **kw)
    pc.createDataChannel("events")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp
def _maybe_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


async def _main(url: str, wav: str) -> None:
    from rejoinder.streaming.audio import read_wav

    samples, rate = read_wav(wav, max_seconds=None)
    client = RTCClient(url)
    await client.connect()
    print(f"connected {client.session_id}", flush=True)
    await client.wait_event(lambda e: e["type"] == "agent_speech" and not e["started"], 60)  # the greeting
    await client.say(samples, rate)
    print("said", flush=True)
    while True:  # a caller that never hangs up; killed from outside
        await asyncio.sleep(0.5)
        speech = client.speech_frames()
        print(f"speech_frames {len(speech)}", flush=True)


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1], sys.argv[2]))
