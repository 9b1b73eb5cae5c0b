"""`rejoinder livekit`: Rejoinder's own full-duplex session as a LiveKit agent worker.

The worker registers with a LiveKit server (livekit-agents conventions: `dev`/`start`, LIVEKIT_URL,
LIVEKIT_API_KEY, LIVEKIT_API_SECRET), is dispatched into rooms, waits for a participant, and runs a
`rejoinder.agent.session.Session` on that participant's microphone through
`rejoinder.streaming.livekit_plugins.LiveKitTransport`: our VAD, streaming ASR, barge-in, engine and
Piper, with the agent's voice published as an audio track and transcripts/state the LiveKit way.

Models load once per job process (`prewarm`), before a job is assigned, so a room is answered as soon
as someone speaks. Model choices travel to job processes as REJOINDER_* environment variables.

    livekit-server --dev &
    rejoinder livekit dev          # ws://localhost:7880, devkey/secret unless told otherwise
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from typing import Any, Callable, Sequence

log = logging.getLogger("rejoinder.livekit")

MODES = ("dev", "start")
# What `livekit-server --dev` accepts: `rejoinder livekit dev` works against it with no configuration.
DEV_URL, DEV_KEY, DEV_SECRET = "ws://localhost:7880", "devkey", "secret"
CONTROL_TOPIC = "rejoinder.control"
CONTROL_REPLY_TOPIC = "rejoinder.control.reply"

# Flags the lead's `_add_model_flags` defines; forwarded to job processes through the environment.
_CONFIG_FLAGS = ("llm_model", "asr_model", "tts_model", "vad_model", "persona", "max_new_tokens", "temperature",
                 "top_k", "top_p", "seed", "device", "threads", "llm_backend", "asr_full_window")


def add_livekit_parser(
    subparsers: Any, *, add_model_flags: Callable[[argparse.ArgumentParser], None] | None = None
) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "livekit",
        help="run Rejoinder as a LiveKit agent worker: join rooms and talk to the participant",
        description="Register with a LiveKit server and answer participants in rooms with Rejoinder's "
        "full-duplex session. In dev mode the server defaults to livekit-server --dev on localhost.",
    )
    p.add_argument("mode", choices=MODES, help="dev: development (verbose, no warm processes); start: production")
    p.add_argument("--url", help=f"LiveKit server URL (env LIVEKIT_URL; dev default {DEV_URL})")
    p.add_argument("--api-key", help="API key (env LIVEKIT_API_KEY)")
    p.add_argument("--api-secret", help="API secret (env LIVEKIT_API_SECRET)")
    p.add_argument("--agent-name", default=os.environ.get("LIVEKIT_AGENT_NAME", ""),
                   help="explicit-dispatch name (empty: join every new room)")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper,
                   help="worker log level (default: DEBUG in dev, INFO in start)")
    p.add_argument("--idle-processes", type=int,
                   help="job processes kept warm with the models loaded (default: 0 in dev, 1 in start)")
    if add_model_flags is not None:
        add_model_flags(p)
    p.set_defaults(func=main_livekit)
    return p


def _credentials(args: argparse.Namespace) -> tuple[str, str, str]:
    dev = args.mode == "dev"
    url = args.url or os.environ.get("LIVEKIT_URL") or (DEV_URL if dev else "")
    key = args.api_key or os.environ.get("LIVEKIT_API_KEY") or (DEV_KEY if dev and url == DEV_URL else "")
    secret = args.api_secret or os.environ.get("LIVEKIT_API_SECRET") or (DEV_SECRET if dev and url == DEV_URL else "")
    missing = [n for n, v in (("LIVEKIT_URL", url), ("LIVEKIT_API_KEY", key), ("LIVEKIT_API_SECRET", secret)) if not v]
    if missing:
        raise ValueError(f"set {', '.join(missing)} (or the matching --url/--api-key/--api-secret flags)")
    return url, key, secret


def _export_config(args: argparse.Namespace) -> None:
    # Job processes are forked from a fresh server process: the environment is the one channel that
    # reaches them, and AgentConfig.from_env already reads it.
    for name in _CONFIG_FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            os.environ[f"REJOINDER_{name.upper()}"] = str(value)


def main_livekit(args: argparse.Namespace) -> int:
    try:
        from livekit.agents import AgentServer
        from livekit.agents.cli import proto
        from livekit.agents.cli.cli import _run_worker
    except ImportError:
        print("rejoinder: error: LiveKit support is not installed: pip install 'rejoinder[livekit]'", file=sys.stderr)
        return 2
    try:
        url, key, secret = _credentials(args)
        _export_config(args)
        from .config import AgentConfig

        AgentConfig.from_env()  # a bad REJOINDER_* value fails here, not in every job process
    except ValueError as exc:
        print(f"rejoinder: error: {exc}", file=sys.stderr)
        return 2
    dev = args.mode == "dev"
    idle = args.idle_processes if args.idle_processes is not None else (0 if dev else 1)
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
    server.rtc_session(entrypoint, agent_name=args.agent_name)
    log_level = args.log_level or ("DEBUG" if dev else "INFO")
    # The same path `python -m livekit.agents start` takes (signals, drain, logging), minus module discovery.
    _run_worker(server, proto.CliArgs(log_level=log_level, url=url, api_key=key, api_secret=secret, dev=dev))
    return 0


def prewarm(proc: Any) -> None:
    """Load the models into a job process before it is given a room."""
    from .config import AgentConfig
    from .reply import Models

    proc.userdata["models"] = Models(AgentConfig.from_env())


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

    from .config import AgentConfig
    from .session import Session  # imported here: the session module is heavy and LiveKit-agnostic

    cfg = AgentConfig.from_env()
    models = ctx.proc.userdata.get("models")
    if models is None:  # a process that skipped prewarm (thread executor, tests)
        from .reply import Models

        models = await asyncio.to_thread(Models, cfg)
        ctx.proc.userdata["models"] = models

    await ctx.connect(auto_subscribe=AutoSubscribe.AUDIO_ONLY)
    participant = await ctx.wait_for_participant()
    transport = await LiveKitTransport.join(ctx.room, participant)
    log.info("talking to %s in room %s", participant.identity, ctx.room.name)

    def on_left(p: rtc.RemoteParticipant) -> None:
        if p.identity == participant.identity:
            asyncio.ensure_future(transport.close())

    ctx.room.on("participant_disconnected", on_left)
    ctx.add_shutdown_callback(transport.close)

    session = Session(models, cfg, transport, listeners=[_log_event])
    control = getattr(session, "control", None)
    if control is not None:
        def on_data(packet: rtc.DataPacket) -> None:
            if packet.topic == CONTROL_TOPIC:
                asyncio.ensure_future(_answer_control(ctx.room, control, packet))

        ctx.room.on("data_received", on_data)
    try:
        await session.run()
    finally:
        await transport.close()


async def _answer_control(room: Any, control: Callable[..., Any], packet: Any) -> None:
    """A remote-control command (SessionControl) sent as JSON {"command", "args"} on rejoinder.control."""
    try:
        msg = json.loads(bytes(packet.data).decode())
        result = await control(str(msg["command"]), msg.get("args") or {})
    except (ValueError, KeyError, TypeError) as exc:
        result = {"ok": False, "error": f"bad control message: {exc}"}
    sender = packet.participant.identity if packet.participant is not None else None
    await room.local_participant.publish_data(
        json.dumps(result, default=str).encode(), reliable=True, topic=CONTROL_REPLY_TOPIC,
        destination_identities=[sender] if sender else [],
    )


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m rejoinder.agent.livekit_worker dev|start` until the main CLI carries the subcommand."""
    parser = argparse.ArgumentParser(prog="rejoinder")
    sub = parser.add_subparsers(dest="command", required=True)
    add_livekit_parser(sub)
    args = parser.parse_args(["livekit", *(sys.argv[1:] if argv is None else argv)])
    return main_livekit(args)


if __name__ == "__main__":
    # Re-enter through the package so job processes pickle `entrypoint` by its importable name,
    # not as `__main__.entrypoint`.
    from rejoinder.agent.livekit_worker import main as _main

    sys.exit(_main())
