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
SDP shape (400), the client's unconnected offers (429), capacity (503); who may call, and the slot
rules, are in `admission.py`, what makes an SDP offer usable in `offer_sdp.py`. Whatever aiortc
raises while applying or answering an offer is the offer's fault and a 400 too; anything else that
fails in a handler is a bug of ours: logged with its traceback, answered with a JSON 500. The static
page itself needs no token: it is where the user types it.

Its settings are `ServeConfig` (serve_config.py). What runs behind each peer comes from a
`SessionFactory` (the agent supplies one; tests supply stand-ins): this module never imports
`rejoinder.agent`. Data-channel messages other than `ping` go to the
session's `on_message`, which answers them.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import signal
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.rtcrtpsender import RTCRtpSender

from .admission import OfferError, OriginPolicy, Slots, Ticket, check_token, read_body
from .offer_sdp import validate_offer
from .serve_config import ServeConfig, default_web_dir
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


class PeerSession(Protocol):
    """What the server needs of whatever runs behind one peer (the agent's session, a test stand-in)."""

    session_id: str

    async def run(self) -> Any: ...

    async def end(self, reason: str) -> None: ...

    async def on_message(self, msg: dict[str, Any]) -> Mapping[str, Any] | None:
        """A JSON object the peer sent on its data channel (not a ping); the reply, if any, is sent back."""
        ...


SessionFactory = Callable[[Transport, str], PeerSession]


@dataclass
class Peer:
    id: str
    pc: RTCPeerConnection
    transport: WebRTCTransport
    ticket: Ticket
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
        self.origins = OriginPolicy(cfg.host, cfg.port, cfg.allow_origins)
        # Counted before any await, so concurrent offers cannot overbook.
        self.slots = Slots(cfg.max_sessions, cfg.max_pending_per_client, cfg.connect_timeout_s)
        self.ended: list[tuple[str, str]] = []  # (peer id, reason) of recent ends, for tests and health
        self.on_refused: Callable[[str], None] | None = None  # told the code of every refused request
        self.rtc_options = WebRTCOptions(
            media_timeout_s=cfg.media_timeout_s, first_media_timeout_s=cfg.connect_timeout_s + 5.0,
            receive_jitter_packets=cfg.receive_jitter_packets, send_reserve_s=cfg.send_reserve_ms / 1000,
            max_queued_frames=max(WebRTCOptions.max_queued_frames, cfg.send_reserve_ms // 20 + 3),
        )

    # --- admission ---------------------------------------------------------------------------------

    def check_origin(self, request: web.Request) -> str | None:
        """The Origin to echo in CORS headers (None: no Origin); raises OfferError when not allowed.

        Checked against --allow-origin and the listen address (admission.py), never the Host header."""
        origin = request.headers.get("Origin")
        if origin is None:
            return None
        if self.origins.allows(origin):
            return origin
        raise OfferError(403, "origin_not_allowed", f"origin {origin[:200]} is not allowed (see --allow-origin)")

    def check_token(self, request: web.Request) -> None:
        check_token(request, self.cfg.token)

    async def read_body(self, request: web.Request) -> str:
        return await read_body(request, self.cfg.max_body_bytes)

    async def admit(self, client: str) -> Ticket:
        """A slot for an offer from `client`; when all are taken, an offer that has stayed unconnected
        for longer than a real caller needs gives its slot up (the oldest first)."""
        try:
            return self.slots.take(client)
        except OfferError as exc:
            if exc.code != "busy":
                raise
            victim = next((p for t in self.slots.stale() for p in self.peers.values() if p.ticket is t), None)
            if victim is None:
                raise
            self.slots.release(victim.ticket)
            ticket = self.slots.take(client)
        age = time.monotonic() - victim.created_at
        log.info("peer %s: not connected after %.1f s; its slot goes to a new offer", victim.id, age)
        await victim.transport.close(f"not connected after {age:.0f} s; slot given to a new offer")
        return ticket

    # --- signalling ----------------------------------------------------------------------------------

    async def answer(self, offer_sdp: str, ticket: Ticket) -> Peer:
        """Build the peer connection and session for a validated offer, return the peer (answer set)."""
        peer_id = secrets.token_urlsafe(12)
        # No STUN/TURN: aiortc would otherwise query a public STUN server, which an offline,
        # self-hosted box cannot reach (and should not need for LAN or loopback use).
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        transport = WebRTCTransport(pc, options=self.rtc_options, name=f"peer {peer_id}")
        peer = Peer(peer_id, pc, transport, ticket)
        try:
            with _offer_fault("applied"):
                await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
            audio = [t for t in pc.getTransceivers() if t.kind == "audio"]
            if len(audio) != 1:
                raise OfferError(400, "no_audio", "the offer must contain exactly one audio section")
            opus = [c for c in RTCRtpSender.getCapabilities("audio").codecs if c.mimeType.lower() == "audio/opus"]
            with _offer_fault("answered"):
                audio[0].setCodecPreferences(opus)
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
        log.info("peer %s: answered (%s); %d/%d sessions", peer_id, ticket.client, self.slots.admitted,
                 self.cfg.max_sessions)
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
                reason = t.close_reason or f"not connected within {self.cfg.connect_timeout_s:g} s"
                return
            self.slots.connected(peer.ticket)
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
            self.slots.release(peer.ticket)
            self.ended.append((peer.id, reason))
            del self.ended[:-64]
            log.info("peer %s: ended (%s) after %.1f s; %d/%d sessions", peer.id, reason,
                     time.monotonic() - peer.created_at, self.slots.admitted, self.cfg.max_sessions)

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
        return self.slots.admitted


@contextlib.contextmanager
def _offer_fault(step: str) -> Iterator[None]:
    """What aiortc raises while it applies or answers an offer is the offer's fault: a 400 that says so."""
    try:
        yield
    except OfferError:
        raise
    except Exception as exc:  # noqa: BLE001 - aiortc raises many types (ValueError, AssertionError, KeyError…)
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        log.info("offer could not be %s: %s", step, detail, exc_info=log.isEnabledFor(logging.DEBUG))
        raise OfferError(400, "bad_sdp", f"the offer could not be {step}: {detail[:200]}") from None


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

    async def start(request: web.Request, sdp: str) -> Peer:
        validate_offer(sdp)
        ticket = await server.admit(request.remote or "unknown")
        try:
            return await server.answer(sdp, ticket)
        except BaseException:
            server.slots.release(ticket)
            raise

    async def offer(request: web.Request) -> web.Response:
        origin = server.check_origin(request)
        server.check_token(request)
        body = await server.read_body(request)
        usage = "body must be JSON: {\"sdp\": ..., \"type\": \"offer\"}"
        try:
            msg = json.loads(body)
        except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser goes
            where = f" (line {exc.lineno} column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
            raise OfferError(400, "bad_json", f"{usage}; it is not JSON{where}") from None
        if not isinstance(msg, dict) or not isinstance(msg.get("sdp"), str) or msg.get("type") != "offer":
            raise OfferError(400, "bad_json", usage)
        peer = await start(request, msg["sdp"])
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
        peer = await start(request, await server.read_body(request))
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
        _add_web_page(app, cfg.web_dir)
    else:
        log.warning("web folder %s not found: serving the API only", cfg.web_dir)
    app.on_shutdown.append(on_shutdown)
    return app


def _add_web_page(app: web.Application, folder: Path) -> None:
    """GET / and the page's files. Not aiohttp's static route: its 404 for a missing file is an empty
    body decided after the handler returns, where the middleware cannot make it a JSON error."""
    root = folder.resolve()

    async def index(request: web.Request) -> web.FileResponse:
        return web.FileResponse(root / "index.html", headers={"Cache-Control": "no-cache"})

    async def file(request: web.Request) -> web.FileResponse:
        try:
            path = (root / request.match_info["name"]).resolve()
            inside = path.is_relative_to(root) and path.is_file()
        except (OSError, ValueError):  # a name the file system cannot take (NUL, too long)
            inside = False
        if not inside:
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    app.router.add_get("/", index)
    app.router.add_get("/{name:.+}", file)  # last: every API route above takes precedence


@web.middleware
async def _errors_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    """Every refusal as a JSON error; a bug of ours as a logged traceback and a JSON 500, never HTML."""
    try:
        return await handler(request)
    except OfferError as exc:
        log.info("%s %s -> %d %s", request.method, request.path, exc.status, exc.message)
        hook = request.app[SERVER_KEY].on_refused
        if hook is not None:
            hook(exc.code)
        return _error(exc.status, exc.code, exc.message, exc.headers)
    except web.HTTPRequestEntityTooLarge:
        return _error(413, "body_too_large", f"request body over {request.app[SERVER_KEY].cfg.max_body_bytes} bytes")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # Routing refusals (404, 405 with its Allow header): JSON like the rest of the API.
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        code = exc.reason.lower().replace(" ", "_")
        return _error(exc.status, code, exc.reason, headers)
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return _error(500, "internal_error", "the server failed on this request (a bug: see its log)")


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
