"""What runs beside the sessions of one process: the MQTT bridge, the trace exporter, the MCP tools.

`rejoinder talk` and `rejoinder serve` start the same three from the one configuration and close them
in the reverse order when the sessions are done (the LiveKit worker starts them per job process).
"""
from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from .config import AgentConfig
from .events import EventListener
from .mcp_tools import MCPTools
from .mqtt import MQTTBridge, start_bridge
from .tracing import TurnTracer, start_tracing

__all__ = ["Services", "running_services"]


@dataclass
class Services:
    bridge: MQTTBridge | None  # None unless --mqtt / REJOINDER_MQTT_URL
    tracer: TurnTracer | None  # None unless --otlp-endpoint
    mcp: MCPTools  # empty unless --mcp-server; shared by every session
    extra_listeners: list[EventListener] = field(default_factory=list)

    @property
    def listeners(self) -> list[EventListener]:
        """Session event listeners: the given ones, then the tracer's."""
        return [*self.extra_listeners, *([self.tracer.listener] if self.tracer else [])]


@contextlib.asynccontextmanager
async def running_services(cfg: AgentConfig, *listeners: EventListener) -> AsyncIterator[Services]:
    bridge = await start_bridge(cfg.mqtt)
    tracer = start_tracing(cfg.telemetry.otlp_endpoint)
    mcp = MCPTools.from_settings(cfg.call)
    try:
        await mcp.ready()
        if mcp:
            print(f"MCP servers: {mcp.summary()}", file=sys.stderr)
        yield Services(bridge, tracer, mcp, list(listeners))
    finally:
        await mcp.aclose()
        if bridge is not None:
            await bridge.close()
        if tracer is not None:
            await asyncio.to_thread(tracer.close)  # flushes the last traces
