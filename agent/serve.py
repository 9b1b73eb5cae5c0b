"""`rejoinder serve`: the web page and WebRTC sessions over HTTP signalling.

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
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import re
import secrets
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping, Protocol
from urllib.parse import urlsplit

from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.rtcrtpsender import RTCRtpSender
from aiortc.sdp import SessionDescription

from rejoinder.streaming.transport import Transport
from rejoinder.streaming.webrtc import WebRTCOptions, WebRTCTransport

log = logging.getLogger("rejoinder.agent.serve")

__all__ = [
    "OfferError",
    "ServeConfig",
    "SessionFactory",
    "SessionLike",
    "add_serve_parser",
    "agent_session_factory",
    "create_app",
    "main_serve",
    "serve",
]

DEFAULT_WEB_DIR = Path(__file__).resolve().parent.parent / "web"

# What a browser may ask of its own session over the data channel. "tool" and "set_persona" are
# operator powers (MQTT, the CLI), not something a page visitor should reach.
DEFAULT_CHANNEL_COMMANDS = frozenset({"say", "interrupt", "end", "mute", "unmute", "status"})


class SessionLike(Protocol):
    """What the server needs of an agent session (rejoinder.agent.session.Session fits)."""

    session_id: str

    async def run(self) -> Any: ...

    async def control(self, command: str, args: dict[str, Any] | None = None) -> dict[str, Any]: ...


SessionFactory = Callable[[Transport, str], SessionLike]


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_sessions: int = 2
    token: str = ""  # empty: no token needed
    # Origins (scheme://host[:port]) a browser page may call the API from, besides the server's own.
    # "*" allows any. Requests without an Origin header (non-browser clients) are not origin-checked.
    allow_origins: tuple[str, ...] = ()
    max_body_bytes: int = 64 * 1024  # a real offer is 2-8 KB
    connect_timeout_s: float = 20.0
    media_timeout_s: float = 20.0
    max_session_s: float = 3600.0
    web_dir: Path = DEFAULT_WEB_DIR
    channel_commands: frozenset[str] = DEFAULT_CHANNEL_COMMANDS


class OfferError(Exception):
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
    session: SessionLike | None = None
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
        self.rtc_options = WebRTCOptions(
            media_timeout_s=cfg.media_timeout_s, first_media_timeout_s=cfg.connect_timeout_s + 5.0
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
                await peer.session.control("end", {"reason": "time limit"})
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

    async def on_channel_message(self, peer: Peer, msg: dict[str, Any]) -> dict[str, Any] | None:
        kind = msg.get("type")
        if kind == "ping":
            return {"type": "pong", "id": msg.get("id"), "t": msg.get("t")}
        if kind != "control":
            return {"type": "error", "where": "data_channel", "message": f"unknown message type {kind!r}"}
        command = str(msg.get("command", ""))
        reply: dict[str, Any] = {"type": "control_result", "id": msg.get("id"), "command": command}
        if command not in self.cfg.channel_commands:
            return {**reply, "ok": False, "error": f"command {command!r} is not allowed here"}
        args = msg.get("args") or {}
        if not isinstance(args, dict) or peer.session is None:
            return {**reply, "ok": False, "error": "args must be an object"}
        result = await peer.session.control(command, args)
        return {**reply, **dict(result)}

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
        raise OfferError(400, "bad_direction", f"audio must be sendrecv (the agent listens and talks), got {m.direction}")
    if not any(c.mimeType.lower() == "audio/opus" for c in m.rtp.codecs):
        raise OfferError(400, "no_opus", "the offer does not include the Opus codec")
    if not m.ice.usernameFragment or not m.ice.password or not m.dtls or not m.dtls.fingerprints:
        raise OfferError(400, "bad_sdp", "malformed SDP: ICE credentials or DTLS fingerprint missing")


# --- the aiohttp app -------------------------------------------------------------------------------

SERVER_KEY: web.AppKey[Server] = web.AppKey("rejoinder_server", Server)


def create_app(cfg: ServeConfig, factory: SessionFactory) -> web.Application:
    server = Server(cfg, factory)
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
    return str(getattr(peer.session, "session_id", "") or peer.id)


# --- the agent behind it ---------------------------------------------------------------------------


def agent_session_factory(models: Any, cfg: Any, *, mqtt: Any = None) -> SessionFactory:
    """Sessions of the real agent, all sharing one loaded `Models`; published on `mqtt` if given."""
    from .session import Session  # imported late: serve must import even where the session cannot

    def make(transport: Transport, peer_id: str) -> SessionLike:
        session = Session(models, cfg, transport)
        return session if mqtt is None else _OnMQTT(session, mqtt)

    return make


class _OnMQTT:
    """A session published on the MQTT bridge only while it runs.

    Attached in run(), not at creation: a peer that never connects never runs, and would otherwise
    stay listed in the agent's presence and routable for control forever.
    """

    def __init__(self, session: Any, bridge: Any) -> None:
        self.session = session
        self.bridge = bridge

    @property
    def session_id(self) -> str:
        return self.session.session_id

    async def run(self) -> Any:
        detach = self.bridge.attach(self.session)
        try:
            return await self.session.run()
        finally:
            detach()

    async def control(self, command: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.session.control(command, args)


async def serve(cfg: ServeConfig, factory: SessionFactory, *, ready: Callable[[str], None] | None = None) -> None:
    """Run the server until cancelled."""
    app = create_app(cfg, factory)
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


# --- command line ----------------------------------------------------------------------------------


def _env(name: str, default: str = "") -> str:
    # Returned as text: argparse converts string defaults with the option's type, so a bad value in
    # the environment is reported like a bad flag, and only by `serve`, not by every subcommand.
    return os.environ.get(f"REJOINDER_{name}", default)


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from .cli import _add_model_flags, _add_mqtt_flags

    p = subparsers.add_parser("serve", help="serve the web page and WebRTC sessions (talk from a browser)")
    g = p.add_argument_group("server (env REJOINDER_<NAME>)")
    g.add_argument("--host", default=_env("HOST", "127.0.0.1"), help="address to bind (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=_env("PORT", "8080"), help="TCP port (default 8080)")
    g.add_argument("--max-sessions", type=int, default=_env("MAX_SESSIONS", "2"),
                   help="concurrent conversations; more get HTTP 503 (default 2)")
    g.add_argument("--token", default=_env("TOKEN"),
                   help="shared secret clients must send (Bearer or ?token=); prefer env REJOINDER_TOKEN")
    g.add_argument("--allow-origin", action="append", default=None, metavar="ORIGIN",
                   help="extra origin allowed to call the API, e.g. https://app.example.com ('*': any); repeatable; "
                        "env REJOINDER_ALLOW_ORIGINS (comma-separated)")
    g.add_argument("--max-body-bytes", type=int, default=_env("MAX_BODY_BYTES", "65536"),
                   help="largest accepted request body (default 65536)")
    g.add_argument("--connect-timeout", type=float, default=_env("CONNECT_TIMEOUT", "20"),
                   help="seconds for a peer to connect after the answer (default 20)")
    g.add_argument("--media-timeout", type=float, default=_env("MEDIA_TIMEOUT", "20"),
                   help="seconds without audio from a peer before its session ends (default 20)")
    g.add_argument("--max-session-minutes", type=float, default=_env("MAX_SESSION_MINUTES", "60"),
                   help="longest conversation (default 60)")
    g.add_argument("--web-dir", default=_env("WEB_DIR", str(DEFAULT_WEB_DIR)), help="folder of the web client")
    _add_model_flags(p)
    _add_mqtt_flags(p)
    p.set_defaults(func=main_serve)
    return p


def serve_config_from_args(args: argparse.Namespace) -> ServeConfig:
    origins = args.allow_origin if args.allow_origin else [o for o in _env("ALLOW_ORIGINS").split(",")]
    origins = tuple(o.strip().rstrip("/") for o in origins if o.strip())
    if args.max_sessions < 1:
        raise ValueError("--max-sessions must be at least 1")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port} is not a TCP port")
    return ServeConfig(
        host=args.host, port=args.port, max_sessions=args.max_sessions, token=args.token or "",
        allow_origins=origins, max_body_bytes=args.max_body_bytes, connect_timeout_s=args.connect_timeout,
        media_timeout_s=args.media_timeout, max_session_s=args.max_session_minutes * 60, web_dir=Path(args.web_dir),
    )


def main_serve(args: argparse.Namespace) -> int:
    import sys

    from .cli import _config, start_mqtt
    from .reply import Models

    scfg = serve_config_from_args(args)
    agent_cfg = _config(args)
    print("loading the models…", file=sys.stderr)
    models = Models(agent_cfg)

    def ready(url: str) -> None:
        print(f"Rejoinder is listening: open {url} in a browser (Ctrl-C stops)", file=sys.stderr)
        if scfg.host not in ("127.0.0.1", "localhost", "::1"):
            print("note: browsers only allow the microphone on https:// or http://localhost pages; "
                  "put a TLS proxy in front for other hosts", file=sys.stderr)

    async def run() -> None:
        bridge = await start_mqtt(args)  # None unless --mqtt / REJOINDER_MQTT_URL
        try:
            await serve(scfg, agent_session_factory(models, agent_cfg, mqtt=bridge), ready=ready)
        finally:
            if bridge is not None:
                await bridge.close()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    finally:
        models.close()
    return 0

