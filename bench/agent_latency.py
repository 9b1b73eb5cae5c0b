"""Voice-to-voice latency and barge-in reaction: the speculative hand-over, the sequential one, a batch cascade.

Measured in one run, on the same audio (espeak-ng voice, synthesised here) and the same models:

- speculative: the session as it ships. When speech pauses, the pause is transcribed, scored for
  end of turn, and the answer's first words generated and synthesised at once, held, and handed
  over as soon as the silence is long enough for how complete the words read.
- speculative, cold: the same without prefilling the user's words while they speak
  (`--no-prefill-while-speaking`): the end-of-turn score at the pause prefills the whole user turn.
- sequential: the same session with `--no-speculative` (REJOINDER_SPECULATIVE=0): wait for the VAD
  hang-over and the final transcript, score, then generate and synthesise.
- batch cascade (the peer; what `rejoinder reply` and most voice bots start as): wait for 0.5 s of
  silence, transcribe the whole utterance, generate the whole answer, synthesise it, then play.

Each question is spoken into a live Session on the in-process transport in real time; voice-to-voice
= first answer frame sent - end of the user's speech (as captured). Modes alternate question by
question, so drift in the machine's load hits them alike. Barge-in: the user interrupts a long
answer; reaction = agent audio stopped - user speech onset. Also reported: the speculation hit rate
(answers prepared at a pause that were handed over) and the work thrown away by the misses, and the
median of every stage after the end of speech.

With `--webrtc` the session is also measured over real WebRTC as a caller hears it (bench/webrtc_latency.py:
`rejoinder serve` in a subprocess, an aiortc caller in its own process, loopback only).

    python bench/agent_latency.py [--json bench/results/agent_latency.json] [--rounds 1] [--webrtc]
                                  [--interim-interval S] [--pause-pass S]   (each adds a mode)
Writes a PNG next to the JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
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
    "What time is it in Tokyo?",
    "How do I boil an egg?",
]
INTERRUPTIONS = ["Wait, what is two plus two?", "Hold on, stop please.", "No, tell me about rivers instead.",
                 "Sorry, what time is it?"]
LONG = "Tell me a long story about a brave knight and a dragon."
BATCH_SILENCE_S = 0.5
STAGES = ("asr_final_s", "end_of_turn_s", "llm_first_token_s", "first_clause_s", "first_tts_audio_s",
          "first_audio_sent_s")
TARGET_P50, TARGET_P95 = 0.45, 0.7


def pct(v: list[float], q: float) -> float | None:
    return float(np.percentile(v, q)) if v else None


@dataclasses.dataclass
class Mode:
    name: str
    cfg: AgentConfig
    v2v: list[float] = dataclasses.field(default_factory=list)
    react: list[float] = dataclasses.field(default_factory=list)
    rows: list[dict] = dataclasses.field(default_factory=list)
    speculation: dict[str, float] = dataclasses.field(default_factory=dict)

    def summary(self) -> dict:
        stages = {s: pct([r[s] for r in self.rows if r.get(s) is not None], 50) for s in STAGES}
        spec = dict(self.speculation)
        spec["hit_rate"] = spec["used"] / spec["started"] if spec.get("started") else None
        return {"voice_to_voice_s": self.v2v, "p50": pct(self.v2v, 50), "p95": pct(self.v2v, 95),
                "barge_in_reaction_s": self.react, "barge_in_p50": pct(self.react, 50),
                "barge_in_p95": pct(self.react, 95), "stage_p50_s": stages, "speculation": spec, "turns": self.rows}


async def one(models: Models, mode: Mode, question: str) -> None:
    transport = InProcessTransport(output_sample_rate=models.tts.sample_rate)
    mic = Mic(transport)
    session = Session(models, mode.cfg, transport, greeting="")
    task = asyncio.create_task(session.run())
    mic.start()
    interruption = question in INTERRUPTIONS
    if interruption:
        await mic.speak(espeak_say(LONG))
        await wait_for(lambda: session.state == SessionState.SPEAKING
                       and session.speaker.playout.played_seconds > 1.0, 30)
        await mic.speak(espeak_say(question))
        await wait_for(lambda: any(b.outcome == "interruption" for b in session.barge_ins), 10)
    else:
        await mic.speak(espeak_say(question))
    await wait_for(lambda: len(session.turns) >= 1 and session.state == SessionState.LISTENING, 40)
    await mic.stop()
    await task
    for k, v in dataclasses.asdict(session.turn_taker.speculation).items():
        mode.speculation[k] = mode.speculation.get(k, 0) + v
    line = f"  {mode.name:11s} {question[:40]:40s}"
    if interruption:
        reactions = [b.reaction_s for b in session.barge_ins if b.outcome == "interruption" and b.reaction_s]
        mode.react += reactions[:1]
        line += (f" barge-in reaction {reactions[0]:.3f} s" if reactions else
                 f" (no interruption seen: barge-ins {[b.outcome for b in session.barge_ins]}, "
                 f"answers {[t.agent_text[:50] for t in session.turns]})")
    elif session.turns and session.turns[0].voice_to_voice_s is not None:
        t = session.turns[0]
        mode.v2v.append(t.voice_to_voice_s)
        mode.rows.append({"question": question, "heard": t.user_text, "answer": t.agent_text,
                          "voice_to_voice_s": t.voice_to_voice_s, "preemptive": t.preemptive,
                          "end_of_turn_prob": t.end_of_turn_prob, **t.stage_latencies()})
        stages = " ".join(f"{(mode.rows[-1][s] or float('nan')):.2f}" for s in STAGES)
        line += (f" v2v {t.voice_to_voice_s:.3f} s  P(end) {t.end_of_turn_prob or 0:.3f}  stages {stages}  "
                 f"{t.user_text!r}")
    print(line, flush=True)


async def sessions(models: Models, modes: list[Mode], rounds: int, questions: list[str]) -> None:
    for _ in range(rounds):
        for q in questions + INTERRUPTIONS:
            for mode in modes:
                await one(models, mode, q)


def batch(models: Models, cfg: AgentConfig, rounds: int, questions: list[str]) -> list[float]:
    out = []
    for _ in range(rounds):
        for q in questions:
            audio = np.concatenate([silence(0.3), espeak_say(q), silence(0.3)])
            t0 = time.perf_counter()
            reply_to_audio(models, cfg, audio, 16_000)
            out.append(BATCH_SILENCE_S + time.perf_counter() - t0)
            print(f"  {'batch':11s} {q[:40]:40s} v2v {out[-1]:.3f} s", flush=True)
    return out


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, v in doc.items() if isinstance(v, dict) and "voice_to_voice_s" in v]
    sessions = [n for n in names if "stage_p50_s" in doc[n]]
    data = [doc[n]["voice_to_voice_s"] for n in names]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.5))
    ax[0].boxplot(data)
    ax[0].set_xticks(range(1, len(names) + 1), [n.replace("_", "\n") for n in names])
    ax[0].axhline(TARGET_P50, color="r", ls="--", label=f"target p50 {TARGET_P50} s")
    ax[0].legend()
    ax[0].set_ylabel("voice-to-voice latency (s)")
    ax[0].set_title(f"p50: cold/speculative {doc['ratio_p50_cold_over_speculative']:.2f}x, "
                    f"sequential/speculative {doc['ratio_p50_sequential_over_speculative']:.2f}x, "
                    f"batch/speculative {doc['ratio_p50_batch_over_speculative']:.2f}x", fontsize=8)
    width = 0.8 / len(sessions)
    x = np.arange(len(STAGES))
    for i, n in enumerate(sessions):
        vals = [doc[n]["stage_p50_s"][s] or 0 for s in STAGES]
        ax[1].bar(x + (i - (len(sessions) - 1) / 2) * width, vals, width, label=n)
    ax[1].set_xticks(x, [s.removesuffix("_s").replace("_", "\n") for s in STAGES], fontsize=7)
    ax[1].set_ylabel("median s after end of speech")
    ax[1].legend()
    ax[1].set_title("stage by stage")
    reacts = doc["speculative"]["barge_in_reaction_s"]
    ax[2].bar(range(len(reacts)), reacts)
    ax[2].axhline(0.25, color="r", ls="--", label="target p95 0.25 s")
    ax[2].set_ylabel("barge-in reaction (s)")
    ax[2].legend()
    spec = doc["speculative"]["speculation"]
    hit = spec.get("hit_rate")
    ax[2].set_title(f"speculation hit rate {hit:.0%}" if hit is not None else "no speculation", fontsize=9)
    fig.suptitle("bench/agent_latency.py (2-core CPU, embedded models)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def as_heard(questions: list[str], rounds: int) -> dict:
    """The same questions and interruptions over real WebRTC (bench/webrtc_latency.py's caller and server)."""
    from webrtc_latency import run_config, summarise  # bench/webrtc_latency.py

    turns: list[dict] = []
    barges: list[dict] = []
    for _ in range(rounds):
        run = run_config("after", server_jitter=0, caller_jitter=0, mute=True,
                         questions=questions, interruptions=INTERRUPTIONS, max_new_tokens=60, timeout_s=900.0)
        turns += run["turns"]
        barges += run["barge_ins"]
    summary = summarise(turns, barges)
    heard = [r["heard_voice_to_voice_s"] for r in turns if r.get("heard_voice_to_voice_s") is not None]
    stops = [r["heard_stop_after_onset_s"] for r in barges if r.get("heard_stop_after_onset_s") is not None]
    return {"voice_to_voice_s": heard, "p50": pct(heard, 50), "p95": pct(heard, 95),
            "barge_in_heard_s": stops, "barge_in_p50": pct(stops, 50), "barge_in_p95": pct(stops, 95),
            "summary": summary, "turns": turns, "barge_ins": barges}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="bench/results/agent_latency.json")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--questions", type=int, default=len(QUESTIONS), help="ask the first N questions")
    ap.add_argument("--interim-interval", type=float, default=None,
                    help="also run the default with interim ASR passes every S seconds of new audio")
    ap.add_argument("--pause-pass", type=float, default=None,
                    help="also run the default with the pause transcript decoded after S seconds of silence")
    ap.add_argument("--webrtc", action="store_true", help="also measure over real WebRTC, as a caller hears it")
    args = ap.parse_args()
    questions = QUESTIONS[: max(1, args.questions)]
    base = AgentConfig.from_env(max_new_tokens=60)
    cold = dataclasses.replace(base.turns, prefill_while_speaking=False)
    modes = [Mode("speculative", base),
             Mode("speculative_cold", base.replace(turns=cold)),
             Mode("sequential", base.replace(turns=dataclasses.replace(base.turns, speculative=False)))]
    if args.interim_interval is not None:
        every = dataclasses.replace(base.turns, interim_interval_s=args.interim_interval)
        modes.append(Mode(f"interim_every_{args.interim_interval:g}s", base.replace(turns=every)))
    if args.pause_pass is not None:
        early = dataclasses.replace(base.turns, pause_pass_s=args.pause_pass)
        modes.append(Mode(f"pause_pass_{args.pause_pass:g}s", base.replace(turns=early)))
    print("loading models…", flush=True)
    models = Models(base)
    try:
        asyncio.run(sessions(models, modes, args.rounds, questions))
        peer = batch(models, base, args.rounds, questions)
    finally:
        models.close()
    doc = {m.name: m.summary() for m in modes}
    doc["batch_cascade"] = {"voice_to_voice_s": peer, "p50": pct(peer, 50), "p95": pct(peer, 95)}
    spec, seq = doc["speculative"], doc["sequential"]
    doc["ratio_p50_sequential_over_speculative"] = seq["p50"] / spec["p50"]
    doc["ratio_p50_cold_over_speculative"] = doc["speculative_cold"]["p50"] / spec["p50"]
    doc["ratio_p50_batch_over_speculative"] = doc["batch_cascade"]["p50"] / spec["p50"]
    doc["targets"] = {"p50_s": TARGET_P50, "p95_s": TARGET_P95}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))  # kept even if the WebRTC part fails
    if args.webrtc:
        doc["webrtc_as_heard"] = as_heard(questions, args.rounds)
        path.write_text(json.dumps(doc, indent=2))
    plot(doc, path.with_suffix(".png"))
    b = doc["batch_cascade"]
    names = [mode.name for mode in modes]
    for name in names:
        m = doc[name]
        print(f"{name:16s} voice-to-voice p50 {m['p50']:.3f} s p95 {m['p95']:.3f} s | barge-in reaction "
              f"p50 {m['barge_in_p50'] or float('nan'):.3f} s p95 {m['barge_in_p95'] or float('nan'):.3f} s")
    print(f"{'batch':16s} voice-to-voice p50 {b['p50']:.3f} s p95 {b['p95']:.3f} s")
    print(f"ratios (p50): cold/speculative {doc['ratio_p50_cold_over_speculative']:.2f}x, "
          f"sequential/speculative {doc['ratio_p50_sequential_over_speculative']:.2f}x, "
          f"batch/speculative {doc['ratio_p50_batch_over_speculative']:.2f}x")
    s = spec["speculation"]
    print(f"speculation: {s.get('started', 0)} prepared, {s.get('used', 0)} handed over (hit rate "
          f"{s['hit_rate'] if s.get('hit_rate') is not None else float('nan'):.0%}), {s.get('discarded', 0)} "
          f"discarded: {s.get('wasted_tokens', 0)} tokens, {s.get('wasted_audio_s', 0):.2f} s of audio thrown away; "
          f"final differed {s.get('final_differed', 0)}")
    print("stage medians (s after end of speech):  " + "  ".join(s.removesuffix("_s") for s in STAGES))
    for name in names:
        st = doc[name]["stage_p50_s"]
        print(f"  {name:16s} " + "  ".join(f"{(st[s] or float('nan')):.3f}" for s in STAGES))
    if "webrtc_as_heard" in doc:
        w = doc["webrtc_as_heard"]
        print(f"over WebRTC, as heard: voice-to-voice p50 {w['p50']:.3f} s p95 {w['p95']:.3f} s; barge-in as heard "
              f"p95 {w.get('barge_in_p95') or float('nan'):.3f} s")
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
