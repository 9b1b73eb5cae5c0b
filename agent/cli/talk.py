"""`rejoinder talk`: a whole session over a recorded conversation, paced like a live microphone.

The input WAV is fed in 20 ms frames in real time (or faster with --speed, for quick checks; the
latency figures are only meaningful at 1.0), followed by silence until the agent has finished. The
agent's output is written on the input's timeline (so the two line up; `--stereo` puts the caller
on the left and the agent on the right), and the per-turn metrics are printed and optionally
written as JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from rejoinder.errors import BadInputError
from rejoinder.streaming.audio import read_wav, resample, write_wav
from rejoinder.streaming.frames import AudioFrame
from rejoinder.streaming.transport import InProcessTransport

from .. import config
from ..config import AgentConfig
from .outputs import check_writable, write_text

if TYPE_CHECKING:
    from ..events import EventListener
    from ..mcp_tools import MCPTools
    from ..models import Models
    from ..mqtt import MQTTBridge
    from ..session import Session

FEED_RATE = 16_000
FRAME = FEED_RATE // 50


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("talk", help="run a full-duplex session over a recorded conversation (real time)")
    p.add_argument("--in", dest="in_path", required=True, help="the caller's side: a WAV (any common format)")
    p.add_argument("--out", dest="out_path", required=True, help="the agent's side, on the input's timeline")
    p.add_argument("--metrics-json", help="write per-turn metrics and barge-ins as JSON here")
    p.add_argument("--stereo", action="store_true", help="write caller (left) and agent (right) together")
    p.add_argument("--greeting", help="say this when the session starts (default: nothing)")
    p.add_argument("--speed", type=float, default=1.0, help="feed faster than real time (latencies then mean little)")
    config.add_flags(p, ("models", "generation", "turns", "echo", "call", "mqtt", "telemetry"))
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """A whole session over a recorded conversation, in real time; per-turn metrics out."""
    cfg = config.from_args(args)
    in_path, out_path = Path(args.in_path), Path(args.out_path)
    if not in_path.exists():
        raise BadInputError(f"input file not found: {in_path}")
    samples, rate = load_input(in_path, cfg)  # bad input and unwritable outputs fail before any model loads
    check_writable(out_path, "--out")
    if args.metrics_json:
        check_writable(Path(args.metrics_json), "--metrics-json")
    if not 0.25 <= args.speed <= 8:
        raise BadInputError("--speed must be within 0.25-8")
    print(f"loading models… ({len(samples) / rate:.1f} s of input, played in real time)", file=sys.stderr)
    from ..models import Models  # imported only now: torch alone takes seconds to import
    from ..services import running_services

    models = Models(cfg)

    async def main() -> tuple[Session, np.ndarray, InProcessTransport]:
        async with running_services(cfg) as svc:
            return await talk(models, cfg, samples, rate, speed=args.speed, greeting=args.greeting or "",
                              bridge=svc.bridge, listeners=svc.listeners, mcp=svc.mcp)

    try:
        session, agent, _ = asyncio.run(main())
    finally:
        models.close()
    print_table(session)  # first: a failed write below still leaves the figures on the screen
    write_outputs(agent, models.tts.sample_rate, samples, rate, out_path, args.stereo)
    if args.metrics_json:
        write_text(Path(args.metrics_json), dumps(metrics_document(session)), "--metrics-json")
    print(f"wrote {out_path}" + (f" and {args.metrics_json}" if args.metrics_json else ""), file=sys.stderr)
    return 0


async def talk(models: Models, cfg: AgentConfig, samples: np.ndarray, rate: int, *, speed: float = 1.0,
               greeting: str = "", tail_s: float = 30.0, bridge: MQTTBridge | None = None,
               listeners: Sequence[EventListener] = (), mcp: MCPTools | None = None,
               ) -> tuple[Session, np.ndarray, InProcessTransport]:
    """Run one session over `samples`; returns (session, agent audio on the input timeline, transport).

    With `bridge`, the session's events go out on MQTT and its control topic steers it; with `mcp`,
    the LLM has the tools of those MCP servers.
    """
    from ..session import Session

    x = resample(samples, rate, FEED_RATE).astype(np.float32)
    transport = InProcessTransport(output_sample_rate=models.tts.sample_rate)
    session = Session(models, cfg, transport, greeting=greeting, listeners=listeners,
                      tools=mcp.tools() if mcp else None)
    if mcp:
        mcp.attach(session)
    detach = bridge.attach(session) if bridge is not None else None
    run = asyncio.create_task(session.run())
    t0 = time.monotonic()
    step = 0.02 / speed
    k = 0

    def push(chunk: np.ndarray) -> None:
        transport.push_audio(AudioFrame(chunk, FEED_RATE, 1, t0 + k * step))

    for i in range(0, x.size, FRAME):
        delay = t0 + k * step - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        push(x[i : i + FRAME])
        k += 1
    # Keep the microphone open (silence) until the agent is done, as a live caller would.
    quiet = np.zeros(FRAME, np.float32)
    deadline = time.monotonic() + tail_s
    idle_since: float | None = None
    while time.monotonic() < deadline and not run.done():
        delay = t0 + k * step - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        push(quiet)
        k += 1
        idle = session.idle
        idle_since = (idle_since or time.monotonic()) if idle else None
        if idle_since is not None and time.monotonic() - idle_since > 1.0:
            break
    transport.end_input()
    try:
        await run
    finally:
        if detach is not None:
            detach()
    agent = transport.output_audio(origin=t0, sample_rate=models.tts.sample_rate)
    return session, agent, transport


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return float(np.percentile(values, q))


def summary(session: Session) -> dict[str, Any]:
    v2v = [t.voice_to_voice_s for t in session.turns if t.voice_to_voice_s is not None]
    react = [b.reaction_s for b in session.barge_ins if b.reaction_s is not None]
    return {
        "turns": len(session.turns),
        "voice_to_voice_p50_s": _pct(v2v, 50),
        "voice_to_voice_p95_s": _pct(v2v, 95),
        "barge_in_reaction_p50_s": _pct(react, 50),
        "barge_in_reaction_p95_s": _pct(react, 95),
    }


def print_table(session: Session, out: TextIO = sys.stdout) -> None:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.0f}"

    print(f"{'turn':>4}  {'v2v ms':>7}  {'asr':>5}  {'eot':>5}  {'tok1':>5}  {'clause':>6}  {'tts1':>5}  "
          f"{'P(end)':>6}  user -> agent", file=out)
    for t in session.turns:
        s = t.stage_latencies()
        p = "-" if t.end_of_turn_prob is None else f"{t.end_of_turn_prob:.3f}"
        mark = " [interrupted]" if t.interrupted else ""
        print(f"{t.turn:>4}  {ms(t.voice_to_voice_s):>7}  {ms(s['asr_final_s']):>5}  {ms(s['end_of_turn_s']):>5}  "
              f"{ms(s['llm_first_token_s']):>5}  {ms(s['first_clause_s']):>6}  {ms(s['first_tts_audio_s']):>5}  "
              f"{p:>6}  {t.user_text!r} -> {t.agent_text[:70]!r}{mark}", file=out)
    for b in session.barge_ins:
        if b.outcome == "echo":
            continue
        print(f"barge-in at {b.at_s:6.2f} s: {b.outcome:12s} reaction {ms(b.reaction_s)} ms  "
              f"{'resumed' if b.resumed else 'yielded'}  heard {b.text!r}", file=out)
    s = summary(session)
    print(f"voice-to-voice p50 {ms(s['voice_to_voice_p50_s'])} ms, p95 {ms(s['voice_to_voice_p95_s'])} ms; "
          f"barge-in reaction p50 {ms(s['barge_in_reaction_p50_s'])} ms, p95 {ms(s['barge_in_reaction_p95_s'])} ms "
          f"({s['turns']} turns)", file=out)


def metrics_document(session: Session) -> dict[str, Any]:
    """{"turns": [...], "barge_ins": [...], "speculation": {...}, "summary": {...}} as --metrics-json writes it."""
    spec = session.turn_taker.speculation
    return {
        "session_id": session.session_id,
        "turns": [t.to_dict() for t in session.turns],
        "barge_ins": [b.to_dict() for b in session.barge_ins if b.outcome != "echo"],
        "echo_suppressed": sum(b.outcome == "echo" for b in session.barge_ins),
        "speculation": {**dataclasses.asdict(spec), "hit_rate": spec.hit_rate},
        "summary": summary(session),
    }


def write_outputs(agent: np.ndarray, agent_rate: int, caller: np.ndarray, caller_rate: int, out: Path,
                  stereo: bool) -> None:
    n_caller = int(round(caller.size * agent_rate / caller_rate))
    length = max(agent.size, n_caller)
    a = np.zeros(length, np.float32)
    a[: agent.size] = AudioFrame(agent, agent_rate).to_float_mono()
    if stereo:
        c = np.zeros(length, np.float32)
        cc = resample(caller, caller_rate, agent_rate)
        c[: cc.size] = cc[:length]
        write_wav(out, np.stack([c, a], axis=1), agent_rate)
    else:
        write_wav(out, a, agent_rate)


def load_input(path: Path, cfg: AgentConfig) -> tuple[np.ndarray, int]:
    return read_wav(path, max_seconds=max(cfg.max_input_seconds, 3600.0))


def dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False, default=str)
