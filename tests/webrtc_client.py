"""A Python WebRTC peer for tests and benchmarks: a microphone you feed from arrays, an ear that records.

    client = RTCClient(base_url)                 # or RTCClient(base_url, token="…", use_whip=True)
    await client.connect()
    spoken_until = await client.say(samples, 16000)   # real-time paced, returns when the last sample left
    await client.wait_event(lambda e: e["type"] == "metrics", 30)
    audio = client.received_audio()              # 48 kHz int16 mono timeline since connect
    await client.close()

It talks to `rejoinder serve` exactly as the web page does (JSON offer or WHIP, an `events` data
channel, Opus both ways) and records, for every frame and event, the monotonic time it arrived,
so latencies measured here include everything a real caller experiences: encoding, the jitter
buffers on both ends, the network stack.

Run as a script it is a caller that talks and then just stays (tests kill it to simulate a client
that vanishes without hanging up):
    python tests/webrtc_client.py http://127.0.0.1:8080 question.wav
"""
from __future__ import annotations

import asyncio
import fractions
import functools
import json
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import av
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

RATE = 48_000
FRAME = 960  # 20 ms
LOOPBACK = ("127.0.0.1",)


class MicTrack(MediaStreamTrack):
    """A microphone that plays what `say()` queued, silence otherwise, at real-time pace."""

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

    def queue(self, pcm48: np.ndarray) -> asyncio.Future[Said]:
        """Queue int16 48 kHz mono; the future gets when its first and last frames were sent."""
        fut: asyncio.Future[Said] = asyncio.get_running_loop().create_future()
        self._pending.append((pcm48, fut))
        return fut

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            wait = self._start + self._n * FRAME / RATE - time.monotonic()
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
        self._n += 1
        return frame


@dataclass(frozen=True)
class Said:
    start: float  # monotonic time the first sample went into the encoder
    end: float  # ... and the last one


@dataclass
class Received:
    at: float
    pcm: np.ndarray  # int16 mono 48 kHz


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
                self.frames.append(Received(time.monotonic(), x))
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

    def received_audio(self, since: float | None = None) -> np.ndarray:
        frames = [f.pcm for f in self.frames if since is None or f.at >= since]
        return np.concatenate(frames) if frames else np.zeros(0, np.int16)

    def speech_frames(self, threshold: float = 300.0) -> list[Received]:
        """Received frames with speech-level energy (RMS over `threshold` in int16 units)."""
        return [f for f in self.frames if float(np.sqrt(np.mean(f.pcm.astype(np.float64) ** 2))) > threshold]

    def first_speech_after(self, t: float, threshold: float = 300.0) -> float | None:
        for f in self.speech_frames(threshold):
            if f.at > t:
                return f.at
        return None

    def last_speech_before(self, t: float, threshold: float = 300.0) -> float | None:
        last = None
        for f in self.speech_frames(threshold):
            if f.at <= t:
                last = f.at
        return last

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
        rid = ev.get("id")
        if ev.get("type") == "control_result" and isinstance(rid, (str, int)) and rid in self._replies:
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


class ServerThread:
    """`rejoinder serve`'s app on its own event loop in a thread, on a free loopback port.

    Its own loop, as in production, so the test's client and the server do not share a scheduler
    (a stall in one does not distort the other's timestamps); the same process, so both read one
    monotonic clock and the server's event times compare directly with the client's.
    """

    def __init__(self, cfg: Any, factory: Any, **app_options: Any) -> None:
        import dataclasses
        import threading

        self.app_options = app_options  # create_app's routes= and on_refused=
        # Loopback only: the port, and the ICE host candidates the server offers (DESIGN.md,
        # "Network in tests"); a config that names other ICE hosts keeps them (the test asked).
        self.cfg = dataclasses.replace(cfg, host="127.0.0.1", port=_free_port(), ice_hosts=cfg.ice_hosts or LOOPBACK)
        self.factory = factory
        self.url = f"http://127.0.0.1:{self.cfg.port}"
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="rejoinder-test-server", daemon=True)
        self.server = None  # rejoinder.streaming.signalling.Server
        self._runner = None

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self._ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        from aiohttp import web

        from rejoinder.streaming.signalling import SERVER_KEY, create_app

        app = create_app(self.cfg, self.factory, **self.app_options)
        self.server = app[SERVER_KEY]
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.cfg.host, self.cfg.port).start()

    def start(self) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("test server did not start")
        return self

    def call(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run `fn` on the server's loop (its state is not thread-safe) and return its result."""
        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        """Await `coro` on the server's loop (e.g. starting something the server's sessions use)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def active(self) -> int:
        return self.call(lambda: self.server.active)

    def ended(self) -> list[tuple[str, str]]:
        return self.call(lambda: list(self.server.ended))

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@functools.lru_cache(maxsize=1)
def shared_agent() -> tuple[Any, Any]:
    """(Models, AgentConfig) of the embedded models, loaded once for every WebRTC/browser test."""
    from rejoinder.agent.config import AgentConfig
    from rejoinder.agent.models import Models

    cfg = AgentConfig.from_env({})
    return Models(cfg), cfg


class EchoSession:
    """A stand-in agent for transport tests: it replays each utterance it hears, paced like playout.

    It exercises everything the transport must do for a real session (audio in, 16 kHz audio out
    through the transport's resampler, events before and after the data channel opens, control
    messages) with no language model in the way, so a transport fault cannot hide behind, or be
    blamed on, the agent.
    """

    def __init__(self, transport: Any, peer_id: str) -> None:
        self.transport = transport
        self.session_id = f"echo-{peer_id[:6]}"
        self.controls: list[tuple[str, dict]] = []

    async def on_message(self, msg: dict[str, Any]) -> dict[str, Any]:
        command = str(msg.get("command"))
        self.controls.append((command, dict(msg.get("args") or {})))
        if command == "end":
            await self.end("ended by control")
        return {"type": "control_result", "id": msg.get("id"), "command": command, "ok": True, "echoed": command}

    async def end(self, reason: str) -> None:
        await self.transport.close(reason)  # audio_in() ends, and so does run()

    async def run(self) -> None:
        from rejoinder.streaming.frames import AudioFrame, FrameChunker

        # Sent at once: the client's data channel is usually not open yet, so this checks the buffering.
        await self.transport.send_event({"type": "session_started", "session_id": self.session_id})
        chunker = FrameChunker(16_000)
        utterance: list[np.ndarray] = []
        quiet = 0
        playing: set[asyncio.Task] = set()
        async for frame in self.transport.audio_in():
            for f in chunker.push(frame):
                loud = float(np.sqrt(np.mean(f.samples**2))) > 0.01
                if loud or utterance:
                    utterance.append(f.samples)
                    quiet = 0 if loud else quiet + 1
                if utterance and quiet >= 25:  # 0.5 s of silence ends the utterance
                    audio = np.concatenate(utterance)
                    utterance = []
                    task = asyncio.ensure_future(self._play(audio, AudioFrame))
                    playing.add(task)
                    task.add_done_callback(playing.discard)
        for t in playing:
            t.cancel()

    async def _play(self, audio: np.ndarray, frame_type: Any) -> None:
        await self.transport.send_event({"type": "echo_started", "seconds": audio.size / 16_000})
        t0 = time.monotonic()
        for k, i in enumerate(range(0, audio.size, 320)):
            due = t0 + k * 0.02
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            pcm = (np.clip(audio[i : i + 320], -1, 1) * 32767).astype(np.int16)
            await self.transport.send_audio(frame_type(pcm, 16_000, 1, due))
        await self.transport.send_event({"type": "echo_done", "seconds": audio.size / 16_000})


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
