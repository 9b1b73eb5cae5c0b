"""`rejoinder talk`: a whole session over a recorded conversation, paced like a live microphone.

The input WAV is fed in 20 ms frames in real time (or faster with --speed, for quick checks; the
latency figures are only meaningful at 1.0), followed by silence until the agent has finished. The
agent's output is written on the input's timeline (so the two line up; `--stereo` puts the caller
on the left and the agent on the right), and the per-turn metrics are printed and optionally
written as JSON.
"""
from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from rejoinder.streaming.audio import read_wav, resample, write_wav
from rejoinder.streaming.frames import AudioFrame
from rejoinder.streaming.transport import InProcessTransport

from .config import AgentConfig

FEED_RATE = 16_000
FRAME = FEED_RATE // 50


async def talk(models: Any, cfg: AgentConfig, samples: np.ndarray, rate: int, *, speed: float = 1.0,
               greeting: str = "", tail_s: float = 30.0, listeners=()) -> tuple[Any, np.ndarray, InProcessTransport]:
    """Run one session over `samples`; returns (session, agent audio on the input timeline, transport)."""
    from .session import Session

    x = resample(samples, rate, FEED_RATE).astype(np.float32)
    transport = InProcessTransport(output_sample_rate=models.tts.sample_rate)
    session = Session(models, cfg, transport, greeting=greeting, listeners=listeners)
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
        idle = session._idle.is_set() and not session.listener.detector.in_speech
        idle_since = (idle_since or time.monotonic()) if idle else None
        if idle_since is not None and time.monotonic() - idle_since > 1.0:
            break
    transport.end_input()
    await run
    agent = transport.output_audio(origin=t0, sample_rate=models.tts.sample_rate)
    return session, agent, transport


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return float(np.percentile(values, q))


def summary(session: Any) -> dict[str, Any]:
    v2v = [t.voice_to_voice_s for t in session.turns if t.voice_to_voice_s is not None]
    react = [b.reaction_s for b in session.barge_ins if b.reaction_s is not None]
    return {
        "turns": len(session.turns),
        "voice_to_voice_p50_s": _pct(v2v, 50),
        "voice_to_voice_p95_s": _pct(v2v, 95),
        "barge_in_reaction_p50_s": _pct(react, 50),
        "barge_in_reaction_p95_s": _pct(react, 95),
    }


def print_table(session: Any, out: TextIO = sys.stdout) -> None:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.0f}"

    print(f"{'turn':>4}  {'v2v ms':>7}  {'asr':>5}  {'eot':>5}  {'tok1':>5}  {'clause':>6}  {'tts1':>5}  "
          f"{'P(end)':>6}  user -> agent", file=out)
    for t in session.turns:
        s = t.stage_latencies()
        p = "-" if t.end_of_turn_prob is None else f"{t.end_of_turn_prob:.3f}"
        mark = " [interrupted]" if t.interrupted else ""
        print(f"{t.turn:>4}  {ms(t.voice_to_voice_s):>7}  {ms(s['asr_final_s']):>5}  {ms(s['end_of_turn_s']):>5}  "
              f"{ms(s['llm_first_token_s']):>5}  {ms(s['first_clause_s']):>6}  {ms(s['first_tts_audio_s']):>5}  {p:>6}  "
              f"{t.user_text!r} -> {t.agent_text[:70]!r}{mark}", file=out)
    for b in session.barge_ins:
        if b.outcome == "echo":
            continue
        print(f"barge-in at {b.at_s:6.2f} s: {b.outcome:12s} reaction {ms(b.reaction_s)} ms  "
              f"{'resumed' if b.resumed else 'yielded'}  heard {b.text!r}", file=out)
    s = summary(session)
    print(f"voice-to-voice p50 {ms(s['voice_to_voice_p50_s'])} ms, p95 {ms(s['voice_to_voice_p95_s'])} ms; "
          f"barge-in reaction p50 {ms(s['barge_in_reaction_p50_s'])} ms, p95 {ms(s['barge_in_reaction_p95_s'])} ms "
          f"({s['turns']} turns)", file=out)


def metrics_document(session: Any) -> dict[str, Any]:
    """{"turns": [...], "barge_ins": [...], "summary": {...}} as --metrics-json writes it."""
    doc = session.metrics_json()
    doc["summary"] = summary(session)
    return doc


def write_outputs(agent: np.ndarray, agent_rate: int, caller: np.ndarray, caller_rate: int, out: Path,
                  stereo: bool) -> None:
    n_caller = int(round(caller.size * agent_rate / caller_rate))
    length = max(agent.size, n_caller)
    a = np.zeros(length, np.float32)
    a[: agent.size] = agent.astype(np.float32) / 32768.0
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
