"""`rejoinder monitor`: a supervisor's live view of agents and their conversations, over MQTT.

Subscribes to `rejoinder/{agent}/status` and `rejoinder/{agent}/sessions/+/events/#` (agent `+`:
all agents) and shows, per session, the caller's latest words (interim dim, final plain), what the
agent said, per-turn voice-to-voice latency and barge-ins. `--plain` prints one line per event
instead of the live table (logs, pipes, tests); `--duration` stops after that many seconds.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import random
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from rejoinder.errors import ConfigError

from ..config import load as load_config

if TYPE_CHECKING:
    from rich.console import Group

    from rejoinder.agent.mqtt_client import MQTTConfig

# rich and the MQTT client are imported where used: `rejoinder --help` builds this parser and
# should not pay for them.

log = logging.getLogger("rejoinder.monitor")

__all__ = ["AgentView", "MonitorState", "SessionView", "add_parser", "run", "run_monitor"]

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
KEEP_ENDED = 10  # ended sessions kept on screen, newest first, so a supervisor sees how calls finished


@dataclass
class AgentView:
    agent_id: str
    state: str = "unknown"
    sessions: list[str] = field(default_factory=list)
    since: float | None = None
    protocol: str = ""
    updated: float = 0.0  # wall time of the last status


@dataclass
class SessionView:
    agent_id: str
    session_id: str
    state: str = "listening"
    started: float | None = None  # wall time
    ended_reason: str | None = None
    ended_at: float | None = None
    muted: bool = False
    user_text: str = ""
    user_final: bool = True
    agent_text: str = ""
    agent_final: bool = True
    agent_interrupted: bool = False
    turns: int = 0
    latencies: list[float] = field(default_factory=list)  # voice-to-voice, seconds, per turn
    barge_ins: int = 0
    last_barge_in: str = ""
    errors: int = 0
    last_error: str = ""
    updated: float = 0.0

    @property
    def live(self) -> bool:
        return self.ended_reason is None


def _ms(s: float | None) -> str:
    return "–" if s is None else f"{s * 1000:.0f} ms"


def _clip(text: str, n: int = 70) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else "…" + text[-(n - 1):]


class MonitorState:
    """What the monitor knows, built only from MQTT messages (so it can be tested without a screen)."""

    def __init__(self) -> None:
        self.agents: dict[str, AgentView] = {}
        self.sessions: dict[tuple[str, str], SessionView] = {}
        self.messages = 0
        self.connected = False
        self.stopped = False

    def apply(self, topic: str, payload: bytes) -> str | None:
        """Take one message; returns a one-line description for --plain (None: nothing worth a line).

        Never raises for what is in the message: anyone allowed to publish under rejoinder/ could
        send anything, and a retained status the monitor choked on would fail every reconnect.
        """
        try:
            return self._apply(topic, payload)
        except (ValueError, TypeError, AttributeError, KeyError, RecursionError) as exc:
            log.debug("unreadable message on %s: %s", topic, exc)
            return f"unreadable message on {topic}"

    def _apply(self, topic: str, payload: bytes) -> str | None:
        parts = topic.split("/")
        if len(parts) < 3 or parts[0] != "rejoinder":
            return None
        agent = parts[1]
        self.messages += 1
        if len(parts) == 3 and parts[2] == "status":
            return self._status(agent, payload)
        if len(parts) == 6 and parts[2] == "sessions" and parts[4] == "events":
            try:
                body = json.loads(payload)
            except (ValueError, RecursionError):  # RecursionError: "[[[[..." deeper than the decoder goes
                return f"{agent}/{parts[3]} unreadable {parts[5]} event"
            if not isinstance(body, dict):
                return None
            return self._event(agent, parts[3], parts[5], body)
        return None

    def _status(self, agent: str, payload: bytes) -> str | None:
        if not payload:  # retained status cleared: the agent is gone for good
            self.agents.pop(agent, None)
            return f"{agent} status cleared"
        try:
            body = json.loads(payload)
        except (ValueError, RecursionError):
            return None
        a = self.agents.setdefault(agent, AgentView(agent))
        a.state = str(body.get("state", "unknown"))
        a.sessions = [str(s) for s in body.get("sessions") or []]
        a.since = body.get("since")
        a.protocol = str(body.get("protocol", ""))
        a.updated = time.time()
        extra = f" ({body['reason']})" if body.get("reason") else ""
        return f"{agent} is {a.state}{extra}, sessions: {', '.join(a.sessions) or 'none'}"

    def _event(self, agent: str, sid: str, type_: str, ev: dict[str, Any]) -> str | None:
        s = self.sessions.get((agent, sid))
        if s is None:
            s = self.sessions[(agent, sid)] = SessionView(agent, sid)
        s.updated = time.time()
        who = f"{agent}/{sid}"
        if type_ == "session_started":
            s.started = ev.get("wall_time") or time.time()
            return f"{who} started"
        if type_ == "state":
            s.state = str(ev.get("new", s.state))
            return None  # the table shows it; a line per state change drowns the transcript
        if type_ == "transcript":
            s.user_text, s.user_final = str(ev.get("text", "")), bool(ev.get("final"))
            return f"{who} caller{'' if s.user_final else ' (interim)'}: {s.user_text}"
        if type_ == "agent_text":
            s.agent_text, s.agent_final = str(ev.get("text", "")), bool(ev.get("final"))
            s.agent_interrupted = bool(ev.get("interrupted"))
            if not s.agent_final:
                return None
            return f"{who} agent{' (interrupted)' if s.agent_interrupted else ''}: {s.agent_text}"
        if type_ == "metrics":
            s.turns = max(s.turns, int(ev.get("turn") or 0))
            v2v = ev.get("voice_to_voice_s")
            if isinstance(v2v, (int, float)):
                s.latencies.append(float(v2v))
            return f"{who} turn {ev.get('turn')}: voice-to-voice {_ms(v2v if isinstance(v2v, (int, float)) else None)}"
        if type_ == "barge_in":
            if ev.get("outcome") == "echo":
                return None  # the agent heard itself and never paused: nothing a supervisor should see
            s.barge_ins += 1
            r = ev.get("reaction_s")
            s.last_barge_in = f"{ev.get('outcome', '?')} {_ms(r) if isinstance(r, (int, float)) else ''}".strip()
            if ev.get("resumed"):
                s.last_barge_in += ", resumed"
            return f"{who} barge-in: {s.last_barge_in}"
        if type_ == "session_ended":
            s.ended_reason = str(ev.get("reason") or "ended")
            s.ended_at = ev.get("wall_time") or time.time()
            s.state = "ended"
            return f"{who} ended ({s.ended_reason}, {ev.get('turns', s.turns)} turns)"
        if type_ == "error":
            s.errors += 1
            s.last_error = str(ev.get("message", ""))
            return f"{who} error in {ev.get('where', '?')}: {s.last_error}"
        if type_ == "ack":
            cmd = ev.get("command")
            if cmd in ("mute", "unmute"):
                s.muted = cmd == "mute"
            return f"{who} {cmd} acknowledged"
        if type_ == "tool_call":
            return f"{who} tool {ev.get('name')}({json.dumps(ev.get('arguments'), ensure_ascii=False)})"
        return None

    def visible_sessions(self) -> list[SessionView]:
        live = sorted((s for s in self.sessions.values() if s.live), key=lambda s: (s.agent_id, s.started or 0))
        ended = sorted((s for s in self.sessions.values() if not s.live), key=lambda s: -(s.ended_at or 0))
        return live + ended[:KEEP_ENDED]

    def render(self) -> Group:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        agents = Table(title="agents", expand=True, title_justify="left")
        for col in ("agent", "presence", "sessions", "protocol", "since"):
            agents.add_column(col)
        for a in sorted(self.agents.values(), key=lambda a: a.agent_id):
            style = "green" if a.state == "online" else "red"
            since = time.strftime("%H:%M:%S", time.localtime(a.since)) if isinstance(a.since, (int, float)) else ""
            agents.add_row(a.agent_id, Text(a.state, style=style), str(len(a.sessions)), a.protocol, since)

        # Three columns with several lines each, so the words stay readable in an 80-column terminal.
        sessions = Table(title="sessions", expand=True, title_justify="left", show_lines=True)
        sessions.add_column("session", max_width=30, overflow="fold")
        sessions.add_column("conversation", ratio=1, min_width=24)
        sessions.add_column("turns · latency · barge-ins", no_wrap=True)
        for s in self.visible_sessions():
            state = (s.state + (" (muted)" if s.muted else "")) if s.live else f"ended: {s.ended_reason}"
            who = Text(f"{s.agent_id}/{s.session_id}\n")
            who.append(state, style="cyan" if s.live else "")
            talk = Text("caller: ", style="bold")
            talk.append(_clip(s.user_text), style="" if s.user_final else "dim italic")
            talk.append("\nagent:  ", style="bold")
            talk.append(_clip(s.agent_text), style="" if s.agent_final else "dim")
            if s.agent_interrupted:
                talk.append(" ✂ interrupted", style="yellow")
            median = sorted(s.latencies)[len(s.latencies) // 2] if s.latencies else None
            numbers = (f"{s.turns} turn{'' if s.turns == 1 else 's'}\n"
                       f"v2v {_ms(s.latencies[-1] if s.latencies else None)} (p50 {_ms(median)})\n"
                       f"barge-ins {s.barge_ins}" + (f": {s.last_barge_in}" if s.last_barge_in else ""))
            sessions.add_row(who, talk, numbers, style=None if s.live else "dim")
        link = "stopped" if self.stopped else "connected" if self.connected else "connecting…"
        footer = Text(f"{link} · {self.messages} messages",
                      style="dim")
        return Group(agents, sessions, footer)


# --- running it -------------------------------------------------------------------------------------


def topics_for(agent_id: str) -> list[str]:
    return [f"rejoinder/{agent_id}/status", f"rejoinder/{agent_id}/sessions/+/events/#"]


async def run_monitor(cfg: MQTTConfig, agent_id: str, on_message: Callable[[str, bytes], None],
                      stop: asyncio.Event, on_connect: Callable[[bool, str | None], None] | None = None) -> None:
    """Subscribe and feed `on_message(topic, payload)` until `stop`, reconnecting with backoff.

    `on_connect(up, error)` hears of every connection and every failed or lost one.
    """
    from aiomqtt import ProtocolVersion

    from rejoinder.agent.mqtt_client import is_protocol_refusal, open_client

    protocol = None
    delay = cfg.backoff_min_s
    while not stop.is_set():
        error: str | None = None
        client = open_client(cfg, protocol=protocol, client_id=f"rejoinder-monitor-{uuid.uuid4().hex[:8]}")
        try:
            async with client:
                for t in topics_for(agent_id):
                    await client.subscribe(t, qos=1)
                delay = cfg.backoff_min_s
                if on_connect:
                    on_connect(True, None)
                reader = asyncio.ensure_future(_pump(client, on_message))
                stopper = asyncio.ensure_future(stop.wait())
                try:
                    await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for t in (reader, stopper):
                        t.cancel()
                    await asyncio.gather(reader, stopper, return_exceptions=True)
                if reader.done() and not reader.cancelled() and reader.exception() is not None:
                    raise reader.exception()  # type: ignore[misc]
        except Exception as exc:  # noqa: BLE001 - MqttError, refused TLS...: retry like the agent does
            if protocol is None and cfg.protocol == "auto" and is_protocol_refusal(exc):
                protocol = ProtocolVersion.V311
                continue
            log.debug("monitor connection: %s", exc)
            error = str(exc) or type(exc).__name__
        if on_connect:
            on_connect(False, error)
        if stop.is_set():
            return
        try:
            await asyncio.wait_for(stop.wait(), delay * random.uniform(0.8, 1.2))
        except asyncio.TimeoutError:
            pass
        delay = min(delay * 2, cfg.backoff_max_s)


async def _pump(client: Any, on_message: Callable[[str, bytes], None]) -> None:
    async for msg in client.messages:
        payload = msg.payload if isinstance(msg.payload, (bytes, bytearray)) else str(msg.payload or "").encode()
        on_message(msg.topic.value, bytes(payload))


async def _monitor(args: argparse.Namespace, out: TextIO) -> int:
    from rich.console import Console

    from rejoinder.agent.mqtt_client import MQTTConfig

    # The same REJOINDER_MQTT_* credentials and TLS settings as the agents use.
    settings = dataclasses.replace(load_config().mqtt, url=args.broker or DEFAULT_BROKER, agent_id="monitor")
    cfg = MQTTConfig.from_settings(settings, ca_file=args.ca_file, tls_insecure=args.insecure or None)
    assert cfg is not None  # a URL was given
    state = MonitorState()
    stop = asyncio.Event()
    plain = args.plain
    console = Console(file=out)

    def stamp() -> str:
        return time.strftime("%H:%M:%S")

    def on_message(topic: str, payload: bytes) -> None:
        line = state.apply(topic, payload)
        if plain and line:
            print(f"{stamp()} {line}", file=out, flush=True)

    warned = False

    def on_connect(up: bool, error: str | None) -> None:
        nonlocal warned
        if up != state.connected and plain:
            word = "connected to" if up else "disconnected from"
            print(f"{stamp()} {word} {cfg.display_url} (agents: {args.agent_id})", file=out, flush=True)
        if error and not state.connected and not up and not warned:
            # Once, so a wrong URL is visible; later failures are the broker's ordinary absence.
            warned = True
            print(f"rejoinder monitor: cannot reach {cfg.display_url} ({error}); retrying", file=sys.stderr, flush=True)
        state.connected = up

    if args.duration:
        asyncio.get_running_loop().call_later(args.duration, stop.set)
    task = asyncio.create_task(run_monitor(cfg, args.agent_id, on_message, stop, on_connect))
    if plain:
        await task
        return 0
    from rich.live import Live

    with Live(get_renderable=state.render, console=console, refresh_per_second=4, screen=False):
        try:
            await task
        finally:
            state.stopped = True
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("monitor", help="watch live sessions, transcripts and latencies over MQTT")
    p.add_argument("--broker", help="mqtt://[user:pass@]host:port or mqtts://… (env REJOINDER_MQTT_URL; "
                   f"default {DEFAULT_BROKER})")
    p.add_argument("--agent-id", default="+", help="the agent to watch (default +: all agents)")
    p.add_argument("--plain", action="store_true", help="print one line per event instead of a live table")
    p.add_argument("--duration", type=float, default=0.0, metavar="SECONDS",
                   help="stop after this many seconds (default: until Ctrl-C)")
    p.add_argument("--ca-file", help="TLS: trust this CA certificate")
    p.add_argument("--insecure", action="store_true", help="TLS: do not verify the broker's certificate")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    if args.agent_id != "+" and (not args.agent_id or any(c in args.agent_id for c in "/#+")):
        raise ConfigError(f"--agent-id must be one agent id or +, got {args.agent_id!r}")
    if not args.broker:
        args.broker = load_config().mqtt.url or DEFAULT_BROKER
    try:
        return asyncio.run(_monitor(args, out or sys.stdout))
    except KeyboardInterrupt:
        return 130


