"""A caller's session behind a server: one agent `Session` per WebRTC peer or LiveKit participant.

The signalling server (`streaming.signalling`) and the LiveKit worker only know transports; this
module puts the agent behind them:

- `agent_session_factory(models, cfg, mqtt=...)` makes, for each peer, a `Session` on its transport,
  published on the MQTT bridge while it runs (attached in `run()`, not at creation: a peer that never
  connects never runs, and would otherwise stay listed in the agent's presence and routable for
  control forever).
- In-call control: `{"type": "control", "command", "args", "id"}` on the WebRTC data channel, and
  `{"command", "args", "id"}` on a LiveKit room's `rejoinder.control` topic, are validated and run
  through the one command table (`agent.control`) with that channel's permissions, and answered with
  `{"type": "control_result", "id", "command", "ok", ...}`.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rejoinder.streaming.signalling import SERVER_KEY, PeerSession, Route, SessionFactory
from rejoinder.streaming.transport import Transport

from .config import AgentConfig
from .control import Channel, CommandRefused, dispatch, parse_command
from .events import EventListener
from .mcp_tools import MCPTools
from .metrics import CONTENT_TYPE, AgentMetrics
from .models import Models
from .mqtt import MQTTBridge
from .session import Session

log = logging.getLogger("rejoinder.agent.serving")

__all__ = ["AgentPeer", "agent_session_factory", "answer_control", "metrics_route"]


async def answer_control(session: Session, msg: Mapping[str, Any] | bytes | str, channel: Channel) -> dict[str, Any]:
    """Validate and run one in-call control message (an object, or its JSON); the `control_result` reply."""
    try:
        cmd = parse_command(msg, channel, extra_fields=frozenset({"type"}))
    except CommandRefused as exc:
        return {"type": "control_result", "id": exc.id, "command": exc.command, "ok": False, "error": exc.message}
    result = await dispatch(session, cmd)
    return {"type": "control_result", "id": cmd.id, "command": cmd.command, **result}


class AgentPeer:
    """The agent's session behind one WebRTC peer (a `streaming.signalling.PeerSession`)."""

    def __init__(self, session: Session, mqtt: MQTTBridge | None = None,
                 on_ended: Callable[[], None] | None = None) -> None:
        self.session = session
        self.mqtt = mqtt
        self.on_ended = on_ended  # after the session has run (the server's heap trimmer)

    @property
    def session_id(self) -> str:
        return self.session.session_id

    async def run(self) -> None:
        detach = self.mqtt.attach(self.session) if self.mqtt is not None else None
        try:
            await self.session.run()
        finally:
            if detach is not None:
                detach()
            if self.on_ended is not None:
                self.on_ended()

    async def end(self, reason: str) -> None:
        await self.session.end(reason)

    async def on_message(self, msg: dict[str, Any]) -> Mapping[str, Any] | None:
        if msg.get("type") != "control":
            return {"type": "error", "where": "data_channel", "message": f"unknown message type {msg.get('type')!r}"}
        return await answer_control(self.session, msg, "data_channel")


def metrics_route(metrics: AgentMetrics) -> Route:
    """GET /metrics in the Prometheus text format (behind the server's --token when one is set)."""
    from aiohttp import web

    async def scrape(request: web.Request) -> web.Response:
        request.app[SERVER_KEY].check_token(request)
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    return ("GET", "/metrics", scrape)


def agent_session_factory(models: Models, cfg: AgentConfig, *, mqtt: MQTTBridge | None = None,
                          listeners: Sequence[EventListener] = (), mcp: MCPTools | None = None,
                          on_call_ended: Callable[[], None] | None = None) -> SessionFactory:
    """Sessions of the real agent, all sharing one loaded `Models`; published on `mqtt` if given, their
    events to `listeners` (metrics), with the tools of the process's MCP servers (`mcp`) if any, and
    `on_call_ended()` called after each has run (`agent.heap.HeapTrimmer.call_ended`)."""

    def make(transport: Transport, peer_id: str) -> PeerSession:
        session = Session(models, cfg, transport, listeners=listeners, tools=mcp.tools() if mcp else None)
        if mcp:
            mcp.attach(session)
        return AgentPeer(session, mqtt, on_call_ended)

    return make
