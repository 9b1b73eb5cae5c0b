"""`rejoinder serve`: the web page and WebRTC sessions (talk from a browser); the server is
`rejoinder.streaming.signalling`, the agent behind each peer `rejoinder.agent.serving`."""
from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from .. import config


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="serve the web page and WebRTC sessions (talk from a browser)")
    config.add_flags(p, ("serve", "models", "generation", "turns", "echo", "call", "mqtt", "telemetry"))
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from rejoinder.streaming.signalling import serve

    from .. import heap
    from ..metrics import AgentMetrics
    from ..models import Models
    from ..services import running_services
    from ..serving import agent_session_factory, metrics_route

    cfg = config.from_args(args)
    scfg = cfg.serve
    print("loading the models…", file=sys.stderr)
    models = Models(cfg)
    heap.settle()  # calls' garbage is collected soon, in short passes (agent.heap)

    def ready(url: str) -> None:
        print(f"Rejoinder is listening: open {url} in a browser (Ctrl-C stops)", file=sys.stderr)
        if scfg.host not in ("127.0.0.1", "localhost", "::1"):
            print("note: browsers only allow the microphone on https:// or http://localhost pages; "
                  "put a TLS proxy in front for other hosts", file=sys.stderr)

    metrics = AgentMetrics()

    async def main() -> None:
        async with running_services(cfg, metrics.listener) as svc, heap.trimmer(cfg.heap_trim_s) as trim:
            factory = agent_session_factory(models, cfg, mqtt=svc.bridge, listeners=svc.listeners, mcp=svc.mcp,
                                            on_call_ended=trim.call_ended)
            await serve(scfg, factory, ready=ready, routes=[metrics_route(metrics)], on_refused=metrics.on_refused)

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    finally:
        models.close()
    return 0
