"""Voice-to-voice latency and barge-in reaction of the full-duplex session, against a batch cascade.

Ours: each question is spoken (espeak-ng voice) into a live Session on the in-process transport in
real time; voice-to-voice = first answer frame sent - end of the user's speech (as captured).
Peer, measured in the same run on the same audio and models: the batch cascade most voice bots
start as (and `rejoinder reply` is): wait for 0.5 s of silence, transcribe the whole utterance, generate
the whole answer, synthesise it, then play. Its voice-to-voice = 0.5 s + ASR + LLM + TTS time. It
runs Whisper as faster-whisper does out of the box (30 s window).
Also in the same run, our session with that 30 s window instead of the short encoder context
(streaming/asr.py), to show what the short context alone is worth.
Barge-in: the user interrupts a long answer; reaction = agent audio stopped - user speech onset.

    python bench/agent_latency.py [--json bench/results/agent_latency.json] [--rounds 1]
Writes a PNG next to the JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from agent_harness import Mic, wait_for  # noqa: E402
from speech import espeak_say, silence  # noqa: E402

from rejoinder.agent.config import AgentConfig  # noqa: E402
from rejoinder.agent.events import SessionState  # noqa: E402
from rejoinder.agent.models import Models  # noqa: E402
from rejoinder.agent.reply import reply_to_audio  # noqa: E402
from rejoinder.agent.session import Session  # noqa: E402
from rejoinder.streaming.transport import InProcessTransport  # noqa: E402

QUESTIONS = [
    "What is the capital of France?",
    "How far away is the moon?",
    "Tell me a joke about cats.",
    "What is the tallest mountain in the world?",
    "Can you recommend a good book?",
    "Where is the nearest train station?",
]
INTERRUPTIONS = ["Wait, what is two plus two?", "Hold on, stop please.", "No, tell me about rivers instead.",
                 "Sorry, what time is it?"]
LONG = "Tell me a long story about a brave knight and a dragon."
BATCH_SILENCE_S = 0.5


def pct(v: list[float], q: float) -> float | None:
    return float(np.percentile(v, q)) if v else None


@contextlib.contextmanager
def asr_window(models: Models, full: bool):
    saved = models.asr.context_pad_s
    models.asr.context_pad_s = None if full else saved
    try:
        yield
    finally:
        models.asr.context_pad_s = saved


async def ours(models: Models, cfg: AgentConfig, rounds: int, label: str = "ours",
               questions_only: bool = False) -> tuple[list[float], list[float], list[dict]]:
    v2v, react, rows = [], [], []
    for _r in range(rounds):
        for q in QUESTIONS + ([] if questions_only else INTERRUPTIONS):
            transport = InProcessTransport(output_sample_rate=models.tts.sample_rate)
            mic = Mic(transport)
            session = Session(models, cfg, transport, greeting="")
            task = asyncio.create_task(session.run())
            mic.start()
            if q in INTERRUPTIONS:
                await mic.speak(espeak_say(LONG))
                await wait_for(lambda: session.state == SessionState.SPEAKING
                               and session.playout.played_seconds > 1.0, 30)
                await mic.speak(espeak_say(q))
                await wait_for(lambda: any(b.outcome == "interruption" for b in session.barge_ins), 10)
            else:
                await mic.speak(espeak_say(q))
            await wait_for(lambda: len(session.turns) >= 1 and session.state == SessionState.LISTENING, 40)
            await mic.stop()
            await task
            for t in session.turns[:1]:
                if q not in INTERRUPTIONS and t.voice_to_voice_s is not None:
                    v2v.append(t.voice_to_voice_s)
                    rows.append({"question": q, "heard": t.user_text, "voice_to_voice_s": t.voice_to_voice_s,
                                 **t.stage_latencies()})
            for b in session.barge_ins:
                if b.outcome == "interruption" and b.reaction_s is not None:
                    react.append(b.reaction_s)
            print(f"  {label:6s} {q[:40]:40s} v2v {v2v[-1] if v2v and q not in INTERRUPTIONS else float('nan'):.3f} s"
                  + (f"  barge-in reaction {react[-1]:.3f} s" if q in INTERRUPTIONS and react else ""), flush=True)
    return v2v, react, rows


def batch(models: Models, cfg: AgentConfig, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        for q in QUESTIONS:
            audio = np.concatenate([silence(0.3), espeak_say(q), silence(0.3)])
            t0 = time.perf_counter()
            reply_to_audio(models, cfg, audio, 16_000)
            out.append(BATCH_SILENCE_S + time.perf_counter() - t0)
            print(f"  batch  {q[:40]:40s} v2v {out[-1]:.3f} s", flush=True)
    return out


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].boxplot([doc["ours"]["voice_to_voice_s"], doc["ours_full_asr_window"]["voice_to_voice_s"],
                   doc["batch_cascade"]["voice_to_voice_s"]])
    ax[0].set_xticks([1, 2, 3], ["Rejoinder session", "session,\n30 s ASR window", "batch cascade"])
    ax[0].axhline(0.6, color="r", ls="--", label="target p50 0.6 s")
    ax[0].legend()
    ax[0].set_ylabel("voice-to-voice latency (s)")
    ax[0].set_title(f"p50 ratio batch/ours = {doc['ratio_p50_batch_over_ours']:.2f}x")
    ax[1].bar(range(len(doc["ours"]["barge_in_reaction_s"])), doc["ours"]["barge_in_reaction_s"])
    ax[1].axhline(0.25, color="r", ls="--", label="target p95 0.25 s")
    ax[1].set_ylabel("barge-in reaction (s)")
    ax[1].legend()
    fig.suptitle("bench/agent_latency.py (2-core CPU, embedded models)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="bench/results/agent_latency.json")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    cfg = AgentConfig.from_env(max_new_tokens=60)
    print("loading models…", flush=True)
    models = Models(cfg)
    try:
        v2v, react, rows = asyncio.run(ours(models, cfg, args.rounds))
        with asr_window(models, full=True):
            v2v_full, _, rows_full = asyncio.run(ours(models, cfg, args.rounds, "30s-win", questions_only=True))
            peer = batch(models, cfg, args.rounds)
    finally:
        models.close()
    doc = {
        "ours": {"voice_to_voice_s": v2v, "p50": pct(v2v, 50), "p95": pct(v2v, 95), "barge_in_reaction_s": react,
                 "barge_in_p50": pct(react, 50), "barge_in_p95": pct(react, 95), "turns": rows},
        "ours_full_asr_window": {"voice_to_voice_s": v2v_full, "p50": pct(v2v_full, 50), "p95": pct(v2v_full, 95),
                                 "turns": rows_full},
        "batch_cascade": {"voice_to_voice_s": peer, "p50": pct(peer, 50), "p95": pct(peer, 95)},
    }
    doc["ratio_p50_batch_over_ours"] = doc["batch_cascade"]["p50"] / doc["ours"]["p50"]
    doc["ratio_p50_full_window_over_ours"] = doc["ours_full_asr_window"]["p50"] / doc["ours"]["p50"]
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))
    plot(doc, path.with_suffix(".png"))
    o, b = doc["ours"], doc["batch_cascade"]
    print(f"voice-to-voice  ours p50 {o['p50']:.3f} s p95 {o['p95']:.3f} s | batch cascade p50 {b['p50']:.3f} s "
          f"p95 {b['p95']:.3f} s | batch/ours {doc['ratio_p50_batch_over_ours']:.2f}x")
    f = doc["ours_full_asr_window"]
    print(f"session with the 30 s ASR window: p50 {f['p50']:.3f} s p95 {f['p95']:.3f} s | "
          f"full-window/ours {doc['ratio_p50_full_window_over_ours']:.2f}x")
    print(f"barge-in reaction p50 {o['barge_in_p50']:.3f} s p95 {o['barge_in_p95']:.3f} s ({len(react)} interruptions)")
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
