"""`rejoinder livekit`: Rejoinder's own full-duplex session as a LiveKit agent worker.

The worker registers with a LiveKit server (livekit-agents conventions: `dev`/`start`, LIVEKIT_URL,
LIVEKIT_API_KEY, LIVEKIT_API_SECRET), is dispatched into rooms, waits for a participant, and runs a
`rejoinder.agent.session.Session` on that participant's microphone through
`rejoinder.streaming.livekit.LiveKitTransport`: our VAD, streaming ASR, barge-in, engine and Piper,
with the agent's voice published as an audio track and transcripts/state the LiveKit way.

It runs on livekit-agents' public API (`AgentServer`, `rtc_session`, `run`, `drain`, `aclose`).
Models load once per job process (`prewarm`), before a job is assigned, so a room is answered as
soon as someone speaks. The configuration travels to job processes as REJOINDER_* environment
variables (`agent.config.env_for`), read there by the same loader. With `--mqtt`, each job's
session publishes its events and takes commands on MQTT as agent `<agent-id>-lk<pid>` (one job
process, one presence), and commands on the room's `rejoinder.control` data topic are answered on
`rejoinder.control.reply`.

    livekit-server --dev &
    rejoinder livekit dev          # ws://localhost:7880, devkey/secret unless told otherwise
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
from typing import Any

from rejoinder.errors import ConfigError

from .. import config
from ..config import AgentConfig

log = logging.getLogger("rejoinder.agent.livekit")

MODES = ("dev", "start")
# What `livekit-server --dev` accepts: `rejoinder livekit dev` works against it with no configuration.
DEV_URL, DEV_KEY, DEV_SECRET = "ws://localhost:7880", "devkey", "secret"
CONTROL_TOPIC = "rejoinder.control"
CONTROL_REPLY_TOPIC = "rejoinder.control.reply"
CHAT_TOPIC = "lk.chat"  # livekit-agents' convention for typed chat in a room
_JOB_GROUPS: tuple[config.Group, ...] = ("models", "generation", "turns", "echo", "call", "mqtt", "telemetry")


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "livekit",
        help="run Rejoinder as a LiveKit agent worker: join rooms and talk to the participant",
        description="Register with a LiveKit server and answer participants in rooms with Rejoinder's "
        "full-duplex session. In dev mode the server defaults to livekit-server --dev on localhost.",
    )
    p.add_argument("mode", choices=MODES, help="dev: development (verbose, no warm processes); start: production")
    config.add_flags(p, ("livekit", *_JOB_GROUPS))
    p.set_defaults(func=run)
    return p


def credentials(cfg: AgentConfig, dev: bool) -> tuple[str, str, str]:
    lk = cfg.livekit
    url = lk.url or (DEV_URL if dev else "")
    key = lk.api_key or (DEV_KEY if dev and url == DEV_URL else "")
    secret = lk.api_secret or (DEV_SECRET if dev and url == DEV_URL else "")
    missing = [n for n, v in (("LIVEKIT_URL", url), ("LIVEKIT_API_KEY", key), ("LIVEKIT_API_SECRET", secret)) if not v]
    if missing:
        raise ConfigError(f"set {', '.join(missing)} (or the matching --url/--api-key/--api-secret flags)")
    return url, key, secret


def export_config(cfg: AgentConfig) -> None:
    """Job processes start from this process's environment: the one channel that reaches them."""
    os.environ.update(config.env_for(cfg, _JOB_GROUPS))


def run(args: argparse.Namespace) -> int:
    try:
        from livekit.agents import AgentServer
    except ImportError:
        raise ConfigError("LiveKit support is not installed: pip install 'rejoinder[livekit]'") from None
    cfg = config.from_args(args)
    dev = args.mode == "dev"
    url, key, secret = credentials(cfg, dev)
    export_config(cfg)
    idle = cfg.livekit.idle_processes if cfg.livekit.idle_processes >= 0 else (0 if dev else 1)
    server = AgentServer(
        setup_fnc=prewarm,
        # Loading Whisper, the engine and Piper takes seconds on a small CPU; the default 10 s is too tight.
        initialize_process_timeout=180.0,
        num_idle_processes=idle,
        job_memory_warn_mb=3000,
        ws_url=url,
        api_key=key,
        api_secret=secret,
    )
    server.rtc_session(entrypoint, agent_name=cfg.livekit.agent_name)
    if cfg.telemetry.metrics_port:
        serve_metrics(cfg.telemetry.metrics_host, cfg.telemetry.metrics_port)
    level = cfg.livekit.log_level or ("DEBUG" if dev else "INFO")
    logging.getLogger("livekit").setLevel(level)
    log.setLevel(level)
    try:
        asyncio.run(run_server(server, dev))
    except KeyboardInterrupt:
        pass
    return 0


async def run_server(server: Any, dev: bool) -> None:
    """Run the worker until SIGINT/SIGTERM, then drain: running calls finish, no new ones come."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    worker = asyncio.create_task(server.run(devmode=dev), name="rejoinder-livekit-worker")
    stopper = asyncio.create_task(stop.wait(), name="rejoinder-livekit-stop")
    try:
        await asyncio.wait({worker, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if worker.done():
            worker.result()  # the worker failed on its own: show why
            return
        log.info("stopping: draining running calls")
        try:
            await server.drain(timeout=None if dev else 600)
        except asyncio.TimeoutError:
            log.warning("calls still running after the drain timeout; closing anyway")
    finally:
        stopper.cancel()
        await server.aclose()
        if not worker.done():
            worker.cancel()
        await asyncio.gather(worker, stopper, return_exceptions=True)


def serve_metrics(host: str, port: int) -> None:
    """Prometheus metrics of every job process, summed, on host:port (multiprocess mode).

    PROMETHEUS_MULTIPROC_DIR must be set before any job process starts: they inherit it, and
    prometheus-client then records their metrics in files this process reads at each scrape.
    """
    import tempfile

    from prometheus_client import start_http_server

    from ..metrics import multiprocess_registry

    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="rejoinder-metrics-"))
    start_http_server(port, addr=host, registry=multiprocess_registry())
    log.info("metrics on http://%s:%d/metrics", host, port)


def prewarm(proc: Any) -> None:
    """Load the models into a job process before it is given a room."""
    from .. import heap
    from ..models import Models

    models = Models(config.load())
    heap.settle()  # the process serves job after job: as `serve` does (agent.heap)
    proc.userdata["models"] = models


def _log_event(event: Any) -> None:
    if getattr(event, "type", "") == "metrics":
        v2v = getattr(event, "voice_to_voice_s", None)
        log.info("turn %s: voice-to-voice %s, user %r -> agent %r", getattr(event, "turn", "?"),
                 f"{v2v * 1000:.0f} ms" if v2v is not None else "n/a", getattr(event, "user_text", ""),
                 getattr(event, "agent_text", ""))


async def entrypoint(ctx: Any) -> None:
    """One room: wait for a participant, talk to them until they leave."""
    from livekit import rtc
    from livekit.agents import AutoSubscribe

    from rejoinder.streaming.livekit import LiveKitTransport

    from ..mcp_tools import MCPTools
    from ..mqtt import start_bridge
    from ..session import Session

    cfg = config.load()
    models = ctx.proc.userdata.get("models")
    if models is None:  # a process that skipped prewarm (thread executor, tests)
        from ..models import Models

        models = await asyncio.to_thread(Models, cfg)
        ctx.proc.userdata["models"] = models

    # The MCP servers' tools: one set per job process (a job is one call), connecting while the
    # room is joined and the participant awaited; closed when the call ends, or the job fails.
    mcp = MCPTools.from_settings(cfg.call)
    mcp.start()
    ctx.add_shutdown_callback(mcp.aclose)
    await ctx.connect(auto_subscribe=AutoSubscribe.AUDIO_ONLY)
    participant = await ctx.wait_for_participant()
    transport = await LiveKitTransport.join(ctx.room, participant)
    log.info("talking to %s in room %s", participant.identity, ctx.room.name)
    tasks: set[asyncio.Task[Any]] = set()

    def spawn(coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def on_left(p: rtc.RemoteParticipant) -> None:
        if p.identity == participant.identity:
            spawn(transport.close())

    ctx.room.on("participant_disconnected", on_left)
    ctx.add_shutdown_callback(transport.close)

    from ..metrics import AgentMetrics
    from ..tracing import start_tracing

    listeners: list[Any] = [_log_event]
    if cfg.telemetry.metrics_port:  # recorded in the worker's multiprocess files (serve_metrics)
        listeners.append(AgentMetrics().listener)
    tracer = start_tracing(cfg.telemetry.otlp_endpoint)
    if tracer is not None:
        listeners.append(tracer.listener)
    await mcp.ready()
    session = Session(models, cfg, transport, listeners=listeners, tools=mcp.tools())
    mcp.attach(session)

    def on_data(packet: rtc.DataPacket) -> None:
        if packet.topic == CONTROL_TOPIC:
            spawn(_answer_control(ctx.room, session, packet))

    ctx.room.on("data_received", on_data)

    def on_chat(reader: Any, sender: str) -> None:
        # Typed messages, the LiveKit way (the `lk.chat` text stream): a user turn like a spoken one.
        if sender == participant.identity:
            spawn(_typed(session, reader))

    ctx.room.register_text_stream_handler(CHAT_TOPIC, on_chat)
    mqtt = None
    if cfg.mqtt.url:
        base = cfg.mqtt.agent_id or "rejoinder"
        mqtt = await start_bridge(dataclasses.replace(cfg.mqtt, agent_id=f"{base}-lk{os.getpid()}"))
    detach = mqtt.attach(session) if mqtt is not None else None
    try:
        await session.run()
    finally:
        if detach is not None:
            detach()
        ctx.room.off("data_received", on_data)
        ctx.room.unregister_text_stream_handler(CHAT_TOPIC)
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await transport.close()
        await mcp.aclose()
        if mqtt is not None:
            await mqtt.close()
        if tracer is not None:
            await asyncio.to_thread(tracer.close)
        if cfg.heap_trim_s > 0:  # the next job in this process starts from a trimmed heap (agent.heap)
            from .. import heap

            await asyncio.to_thread(heap.trim)


async def _typed(session: Any, reader: Any) -> None:
    from rejoinder.errors import ControlError

    text = (await reader.read_all()).strip()
    if text:
        try:
            session.user_text(text[:2000])
        except ControlError as exc:  # on hold: said in the log, the room gets no answer
            log.info("typed message not taken: %s", exc)


async def _answer_control(room: Any, session: Any, packet: Any) -> None:
    """A command sent as JSON {"command", "args", "id"} on rejoinder.control (agent.control, channel "livekit")."""
    from rejoinder.streaming.transport import event_json

    from ..serving import answer_control

    result = await answer_control(session, bytes(packet.data), "livekit")
    sender = packet.participant.identity if packet.participant is not None else None
    await room.local_participant.publish_data(
        event_json(result).encode(), reliable=True, topic=CONTROL_REPLY_TOPIC,
        destination_identities=[sender] if sender else [],
    )
