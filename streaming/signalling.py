"""The WebRTC signalling server: the web page, offers in (JSON or WHIP), one session per peer.

Routes:
  GET  /                 the web client (static files from web/)
  GET  /api/health       {"ok", "sessions", "max_sessions"}
  POST /api/offer        JSON {"sdp", "type": "offer"} -> {"sdp", "type": "answer", "session_id", "resource"}
  POST /whip             application/sdp offer -> 201, answer SDP, Location: /whip/<id>   (WHIP)
  DELETE /whip/<id>      hang up
  OPTIONS …              CORS preflight for the allowed origins

One agent session per peer connection. The session starts only once ICE and DTLS are up, so the
greeting is not spoken into a connection that cannot carry it yet; it ends when the peer hangs up,
its connection fails, its audio stops arriving for `media_timeout_s` (a vanished client), or it
reaches `max_session_s`. Every path ends in the same cleanup, so a slot is never leaked.

Request checks, in order, each with a JSON error: origin (403), token (401), body size (413),
capacity (503), SDP shape (400). The static page itself needs no token: it is where the user types it.

What runs behind each peer comes from a `SessionFactory` (the agent supplies one; tests supply stand-ins):
this module never imports `rejoinder.agent`. Data-channel messages other than `ping` go to the
session's `on_message`, which answers them.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import secrets
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.rtcrtpsender import RTCRtpSender
from aiortc.sdp import SessionDescription

from rejoinder.errors import ConfigError, RejoinderError

from .transport import Transport
from .webrtc import WebRTCOptions, WebRTCTransport, restrict_ice_hosts

log = logging.getLogger("rejoinder.streaming.signalling")

__all__ = [
    "OfferError",
    "PeerSession",
    "Route",
    "ServeConfig",
    "SessionFactory",
    "create_app",
    "default_web_dir",
    "serve",
    "validate_offer",
]


def default_web_dir() -> Path:
    """The bundled web client: package data of the installed wheel, or the checkout's web/ folder."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("rejoinder.web")  # a namespace package: data files only
    except ModuleNotFoundError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parent.parent / "web"


class PeerSession(Protocol):
    """What the server needs of whatever runs behind one peer (the agent's session, a test stand-in)."""

    session_id: str

    async def run(self) -> Any: ...

    async def end(self, reason: str) -> None: ...

    async def on_message(self, msg: dict[str, Any]) -> Mapping[str, Any] | None:
        """A JSON object the peer sent on its data channel (not a ping); the reply, if any, is sent back."""
        ...


SessionFactory = Callable[[Transport, str], PeerSession]


def _m(help: str, **meta: Any) -> dict[str, Any]:
    return {"help": help, **meta}


@dataclass(frozen=True)
class ServeConfig:
    """The server's settings; `agent.config` generates `rejoinder serve`'s flags from these fields."""

    host: str = field(default="127.0.0.1", metadata=_m("address to bind"))
    port: int = field(default=8080, metadata=_m("TCP port"))
    max_sessions: int = field(default=2, metadata=_m("concurrent conversations; more get HTTP 503"))
    token: str = field(default="", metadata=_m(  # empty: no token needed
        "shared secret clients must send (Bearer or ?token=); prefer the environment variable"))
    # Origins (scheme://host[:port]) a browser page may call the API from, besides the server's own.
    # "*" allows any. Requests without an Origin header (non-browser clients) are not origin-checked.
    allow_origins: tuple[str, ...] = field(default=(), metadata=_m(
        "extra origin allowed to call the API, e.g. https://app.example.com ('*': any); repeatable; "
        "comma-separated in the environment", flag="--allow-origin", metavar="ORIGIN"))
    max_body_bytes: int = field(default=64 * 1024, metadata=_m("largest accepted request body"))  # offers: 2-8 KB
    connect_timeout_s: float = field(default=20.0, metadata=_m(
        "seconds for a peer to connect after the answer", flag="--connect-timeout", env="REJOINDER_CONNECT_TIMEOUT"))
    media_timeout_s: float = field(default=20.0, metadata=_m(
        "seconds without audio from a peer before its session ends", flag="--media-timeout",
        env="REJOINDER_MEDIA_TIMEOUT"))
    max_session_minutes: float = field(default=60.0, metadata=_m("longest conversation"))
    web_dir: Path = field(default_factory=default_web_dir, metadata=_m("folder of the web client"))
    # ICE host candidates: empty offers every interface address (aioice's default, what real
    # deployments need); tests and benchmarks give 127.0.0.1 to keep media on the loopback.
    ice_hosts: tuple[str, ...] = field(default=(), metadata=_m(
        "only offer these addresses as ICE host candidates (default: every interface); repeatable",
        flag="--ice-host", metavar="ADDRESS"))
    # Inbound RTP packets held back before decoding. 0: each in-order packet is decoded the moment
    # it arrives (the VAD and recogniser need no smoothed timeline); 4 is aiortc's own buffer
    # (80-100 ms later), for comparison or a network that truly reorders packets.
    receive_jitter_packets: int = field(default=0, metadata=_m(
        "received audio packets held before decoding (0: none; 4: aiortc's default)"))

    def __post_init__(self) -> None:
        if self.max_sessions < 1:
            raise ConfigError("--max-sessions must be at least 1")
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port {self.port} is not a TCP port")
        if self.max_body_bytes < 1024:
            raise ConfigError("--max-body-bytes must be at least 1024")
        if not 0 <= self.receive_jitter_packets <= 15:
            raise ConfigError("--receive-jitter-packets must be between 0 and 15")

    @property
    def max_session_s(self) -> float:
        return self.max_session_minutes * 60.0


class OfferError(RejoinderError):
    """A request the server refuses, with its HTTP status and a message for the client."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass
class Peer:
    id: str
    pc: RTCPeerConnection
    transport: WebRTCTransport
    session: PeerSession | None = None
    task: asyncio.Task[None] | None = None
    created_at: float = field(default_factory=time.monotonic)
    end_reason: str = ""


def _error(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message, "code": code}, status=status, headers=headers)


class Server:
    """The peers of one app: admission, signalling, and each session's lifecycle."""

    def __init__(self, cfg: ServeConfig, factory: SessionFactory) -> None:
        self.cfg = cfg
        self.factory = factory
        self.peers: dict[str, Peer] = {}
        self._admitted = 0  # peers negotiating or running; counted before any await, so no race
        self.ended: list[tuple[str, str]] = []  # (peer id, reason) of recent ends, for tests and health
        self.on_refused: Callable[[str], None] | None = None  # told the code of every refused request
        self.rtc_options = WebRTCOptions(
            media_timeout_s=cfg.media_timeout_s, first_media_timeout_s=cfg.connect_timeout_s + 5.0,
            receive_jitter_packets=cfg.receive_jitter_packets,
        )

    # --- admission ---------------------------------------------------------------------------------

    def check_origin(self, request: web.Request) -> str | None:
        """The Origin to echo in CORS headers (None: no Origin); raises OfferError when not allowed."""
        origin = request.headers.get("Origin")
        if origin is None:
            return None
        if "*" in self.cfg.allow_origins or origin in self.cfg.allow_origins:
            return origin
        parts = urlsplit(origin)
        if parts.netloc and parts.netloc == request.host:
            return origin  # the server's own page
        raise OfferError(403, "origin_not_allowed", f"origin {origin} is not allowed (see --allow-origin)")

    def check_token(self, request: web.Request) -> None:
        if not self.cfg.token:
            return
        given = ""
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        elif "token" in request.query:
            given = request.query["token"]
        if not given or not hmac.compare_digest(given.encode(), self.cfg.token.encode()):
            raise OfferError(401, "unauthorized", "missing or wrong access token")

    async def read_body(self, request: web.Request) -> str:
        limit = self.cfg.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise OfferError(413, "body_too_large", f"request body over {limit} bytes")
        # Chunked bodies carry no length: read at most limit + 1 bytes and refuse if there is more.
        parts: list[bytes] = []
        size = 0
        while chunk := await request.content.read(limit + 1 - size):
            parts.append(chunk)
            size += len(chunk)
            if size > limit:
                raise OfferError(413, "body_too_large", f"request body over {limit} bytes")
        data = b"".join(parts)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise OfferError(400, "bad_encoding", "request body is not UTF-8") from None

    def admit(self) -> None:
        if self._admitted >= self.cfg.max_sessions:
            raise OfferError(503, "busy", f"all {self.cfg.max_sessions} session slots are in use; try again later")
        self._admitted += 1

    # --- signalling ----------------------------------------------------------------------------------

    async def answer(self, offer_sdp: str) -> Peer:
        """Validate the offer, build the peer connection and session, return the peer (answer set)."""
        validate_offer(offer_sdp)
        peer_id = secrets.token_urlsafe(12)
        # No STUN/TURN: aiortc would otherwise query a public STUN server, which an offline,
        # self-hosted box cannot reach (and should not need for LAN or loopback use).
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        transport = WebRTCTransport(pc, options=self.rtc_options, name=f"peer {peer_id}")
        peer = Peer(peer_id, pc, transport)
        try:
            try:
                await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
            except Exception as exc:  # noqa: BLE001 - aiortc raises many types for bad SDP
                raise OfferError(400, "bad_sdp", f"the offer could not be applied: {exc}") from None
            audio = [t for t in pc.getTransceivers() if t.kind == "audio"]
            if len(audio) != 1:
                raise OfferError(400, "no_audio", "the offer must contain exactly one audio section")
            transceiver = audio[0]
            opus = [c for c in RTCRtpSender.getCapabilities("audio").codecs if c.mimeType.lower() == "audio/opus"]
            transceiver.setCodecPreferences(opus)
            pc.addTrack(transport.output_track)
            await pc.setLocalDescription(await pc.createAnswer())
            try:
                peer.session = self.factory(transport, peer_id)
            except Exception as exc:
                log.exception("peer %s: could not create a session", peer_id)
                raise OfferError(500, "session_failed", f"could not start a session: {type(exc).__name__}") from None
            transport.on_control = lambda msg, p=peer: self.on_channel_message(p, msg)
        except BaseException:
            await transport.close("offer rejected")
            raise
        self.peers[peer_id] = peer
        peer.task = asyncio.create_task(self._run(peer), name=f"rejoinder-peer-{peer_id}")
        log.info("peer %s: answered; %d/%d sessions", peer_id, self._admitted, self.cfg.max_sessions)
        return peer

    async def _run(self, peer: Peer) -> None:
        reason = "session ended"
        t = peer.transport
        try:
            connected = asyncio.ensure_future(t.connected.wait())
            closed = asyncio.ensure_future(t.wait_closed())
            done, _ = await asyncio.wait({connected, closed}, timeout=self.cfg.connect_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            connected.cancel()
            closed.cancel()
            if not t.connected.is_set():
                reason = t.close_reason or f"not connected within {self.cfg.connect_timeout_s:.0f} s"
                return
            assert peer.session is not None
            run = asyncio.ensure_future(peer.session.run())
            done, _ = await asyncio.wait({run}, timeout=self.cfg.max_session_s)
            if run in done:
                run.result()
                reason = t.close_reason or "session ended"
            else:
                reason = f"session reached its {self.cfg.max_session_s:.0f} s limit"
                # Ask it to end (so it says goodbye through its events and keeps its history
                # consistent); cancel only if it does not.
                await peer.session.end("time limit")
                done, _ = await asyncio.wait({run}, timeout=5.0)
                if not done:
                    run.cancel()
                    await asyncio.gather(run, return_exceptions=True)
        except asyncio.CancelledError:
            reason = "server shutting down"
            raise
        except Exception as exc:  # noqa: BLE001 - one failed session must not affect the others
            reason = f"session failed: {type(exc).__name__}: {exc}"
            log.exception("peer %s: session failed", peer.id)
        finally:
            peer.end_reason = reason
            await t.close(reason)
            self.peers.pop(peer.id, None)
            self._admitted -= 1
            self.ended.append((peer.id, reason))
            del self.ended[:-64]
            log.info("peer %s: ended (%s) after %.1f s; %d/%d sessions", peer.id, reason,
                     time.monotonic() - peer.created_at, self._admitted, self.cfg.max_sessions)

    async def on_channel_message(self, peer: Peer, msg: dict[str, Any]) -> Mapping[str, Any] | None:
        if msg.get("type") == "ping":  # round-trip probe: answered here, the session never sees it
            return {"type": "pong", "id": msg.get("id"), "t": msg.get("t")}
        if msg.get("type") == "transport_stats":  # this connection's per-stage timings (rtc_stats)
            return {**peer.transport.stats_snapshot(msg), "type": "transport_stats", "id": msg.get("id")}
        if peer.session is None:
            return None
        return await peer.session.on_message(msg)

    async def hang_up(self, peer_id: str) -> bool:
        peer = self.peers.get(peer_id)
        if peer is None:
            return False
        await peer.transport.close("hung up")
        if peer.task is not None:
            # Give the session a moment to finish (history, events) so the slot is free on return.
            await asyncio.wait({peer.task}, timeout=5.0)
        return True

    async def close_all(self) -> None:
        peers = list(self.peers.values())
        for p in peers:
            await p.transport.close("server shutting down")
        tasks = [p.task for p in peers if p.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)

    @property
    def active(self) -> int:
        return self._admitted


_SDP_LINE = re.compile(r"^[a-z]=\S.*$|^$")


def validate_offer(sdp: str) -> None:
    """Refuse, with a message a person can act on, what is not a usable audio offer."""
    text = sdp.strip()
    if not text:
        raise OfferError(400, "bad_sdp", "empty SDP offer")
    if not text.startswith("v=0"):
        raise OfferError(400, "bad_sdp", "malformed SDP: it must start with 'v=0'")
    # aiortc's parser skips lines it does not understand, so shape is checked here first.
    for n, line in enumerate(text.splitlines(), 1):
        if not _SDP_LINE.match(line):
            raise OfferError(400, "bad_sdp", f"malformed SDP: line {n} is not '<letter>=<value>': {line[:60]!r}")
    if not any(line.startswith("o=") for line in text.splitlines()):
        raise OfferError(400, "bad_sdp", "malformed SDP: the origin line (o=) is missing")
    try:
        desc = SessionDescription.parse(sdp)
    except Exception as exc:  # noqa: BLE001 - the parser raises whatever the bad line provokes
        raise OfferError(400, "bad_sdp", f"malformed SDP: {type(exc).__name__}: {exc}") from None
    kinds = [m.kind for m in desc.media]
    audio = [m for m in desc.media if m.kind == "audio"]
    if not audio:
        raise OfferError(400, "no_audio", "the offer has no audio section: add a microphone track")
    if len(audio) > 1 or any(k not in ("audio", "application") for k in kinds):
        raise OfferError(400, "unsupported_media", f"expected one audio section (and a data channel), got {kinds}")
    m = audio[0]
    if m.direction not in (None, "sendrecv"):
        raise OfferError(400, "bad_direction",
                         f"audio must be sendrecv (the agent listens and talks), got {m.direction}")
    if not any(c.mimeType.lower() == "audio/opus" for c in m.rtp.codecs):
        raise OfferError(400, "no_opus", "the offer does not include the Opus codec")
    if not m.ice.usernameFragment or not m.ice.password or not m.dtls or not m.dtls.fingerprints:
        raise OfferError(400, "bad_sdp", "malformed SDP: ICE credentials or DTLS fingerprint missing")


# --- the aiohttp app -------------------------------------------------------------------------------

SERVER_KEY: web.AppKey[Server] = web.AppKey("rejoinder_server", Server)


Route = tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]


def create_app(cfg: ServeConfig, factory: SessionFactory, *, routes: Sequence[Route] = (),
               on_refused: Callable[[str], None] | None = None) -> web.Application:
    """The aiohttp app; `routes` are extra (method, path, handler) routes (the agent's /metrics),
    `on_refused(code)` hears every refused request (metrics)."""
    if cfg.ice_hosts:
        restrict_ice_hosts(cfg.ice_hosts)
    server = Server(cfg, factory)
    server.on_refused = on_refused
    # aiohttp's own limit backs ours up for bodies read any other way.
    app = web.Application(client_max_size=cfg.max_body_bytes, middlewares=[_errors_middleware])
    app[SERVER_KEY] = server

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "sessions": server.active, "max_sessions": cfg.max_sessions,
                                  "token_required": bool(cfg.token)})

    async def preflight(request: web.Request) -> web.Response:
        origin = server.check_origin(request)
        return web.Response(status=204, headers=_cors(origin, preflight=True))

    async def offer(request: web.Request) -> web.Response:
        origin = server.check_origin(request)
        server.check_token(request)
        body = await server.read_body(request)
        try:
            msg = json.loads(body)
        except ValueError:
            raise OfferError(400, "bad_json", "body must be JSON: {\"sdp\": ..., \"type\": \"offer\"}") from None
        if not isinstance(msg, dict) or not isinstance(msg.get("sdp"), str) or msg.get("type") != "offer":
            raise OfferError(400, "bad_json", "body must be JSON: {\"sdp\": ..., \"type\": \"offer\"}")
        server.admit()
        try:
            peer = await server.answer(msg["sdp"])
        except BaseException:
            server._admitted -= 1
            raise
        local = peer.pc.localDescription
        return web.json_response(
            {"sdp": local.sdp, "type": local.type, "session_id": _session_id(peer), "resource": f"/whip/{peer.id}"},
            headers=_cors(origin),
        )

    async def whip(request: web.Request) -> web.Response:
        origin = server.check_origin(request)
        server.check_token(request)
        ctype = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/sdp":
            raise OfferError(415, "bad_content_type", "WHIP offers must be sent as application/sdp")
        body = await server.read_body(request)
        server.admit()
        try:
            peer = await server.answer(body)
        except BaseException:
            server._admitted -= 1
            raise
        headers = {**_cors(origin), "Location": f"/whip/{peer.id}", "Content-Type": "application/sdp",
                   "X-Session-Id": _session_id(peer)}
        return web.Response(status=201, text=peer.pc.localDescription.sdp, headers=headers)

    async def whip_delete(request: web.Request) -> web.Response:
        origin = server.check_origin(request)
        server.check_token(request)
        if not await server.hang_up(request.match_info["peer_id"]):
            raise OfferError(404, "no_such_session", "no such session (it may have ended already)")
        return web.Response(status=200, headers=_cors(origin))

    async def on_shutdown(app: web.Application) -> None:
        await server.close_all()

    app.router.add_get("/api/health", health)
    app.router.add_post("/api/offer", offer)
    app.router.add_route("OPTIONS", "/api/offer", preflight)
    app.router.add_post("/whip", whip)
    app.router.add_route("OPTIONS", "/whip", preflight)
    app.router.add_delete("/whip/{peer_id}", whip_delete)
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
    app.router.add_route("OPTIONS", "/whip/{peer_id}", preflight)
    if cfg.web_dir.is_dir():
        async def index(request: web.Request) -> web.FileResponse:
            return web.FileResponse(cfg.web_dir / "index.html", headers={"Cache-Control": "no-cache"})

        app.router.add_get("/", index)
        app.router.add_static("/", cfg.web_dir, show_index=False, append_version=False)
    else:
        log.warning("web folder %s not found: serving the API only", cfg.web_dir)
    app.on_shutdown.append(on_shutdown)
    return app


@web.middleware
async def _errors_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    try:
        return await handler(request)
    except OfferError as exc:
        log.info("%s %s -> %d %s", request.method, request.path, exc.status, exc.message)
        hook = request.app[SERVER_KEY].on_refused
        if hook is not None:
            hook(exc.code)
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return _error(exc.status, exc.code, exc.message, headers)
    except web.HTTPRequestEntityTooLarge:
        return _error(413, "body_too_large", f"request body over {request.app[SERVER_KEY].cfg.max_body_bytes} bytes")


def _cors(origin: str | None, *, preflight: bool = False) -> dict[str, str]:
    if origin is None:
        return {}
    headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin", "Access-Control-Expose-Headers": "Location"}
    if preflight:
        headers.update({"Access-Control-Allow-Methods": "POST, DELETE, OPTIONS",
                        "Access-Control-Allow-Headers": "Authorization, Content-Type",
                        "Access-Control-Max-Age": "600"})
    return headers


def _session_id(peer: Peer) -> str:
    return (peer.session.session_id if peer.session is not None else "") or peer.id


async def serve(cfg: ServeConfig, factory: SessionFactory, *, ready: Callable[[str], None] | None = None,
                routes: Sequence[Route] = (), on_refused: Callable[[str], None] | None = None) -> None:
    """Run the server until SIGINT/SIGTERM (or cancelled); see `create_app` for the rest."""
    app = create_app(cfg, factory, routes=routes, on_refused=on_refused)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port)
    await site.start()
    host = "localhost" if cfg.host in ("0.0.0.0", "::", "127.0.0.1") else cfg.host
    url = f"http://{host}:{cfg.port}/"
    log.info("serving on %s", url)
    if ready is not None:
        ready(url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            # A service manager stops us with SIGTERM: hang up every peer cleanly rather than vanish.
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread, or no signals here
            pass
    try:
        await stop.wait()
        log.info("stopping: closing %d session(s)", runner.app[SERVER_KEY].active if runner.app else 0)
    finally:
        await runner.cleanup()
