#!/usr/bin/env python
"""Piper and the LLM taking turns on the CPU vs sharing it: first audio of a streamed answer.

An answer is the embedded LLM generating (real engine, native decode step, all cores) while
StreamedTTS synthesises its pieces with the embedded Piper voice. In the same run, question by
question, interleaved:

* shared (the peer, the product before): Piper on half the cores (1 of 2), decoding goes on while
  it synthesises: both compete for the cores;
* turns (the default): Piper on every core, and the answer's decoding is held while a piece is
  synthesised (`TokenStream.hold`, up to `--hold-s`): each runs alone on the whole machine;
* hold only: Piper on half the cores with the hold (what the hold gives without more threads).

Measured per answer, from the prompt's submission (prefill included): the first audio chunk out,
the whole answer synthesised, and playback stalls (a chunk arriving after the audio before it
would have finished playing, had playback started with the first chunk).

    python bench/synthesis_hold.py [--rounds 2] [--hold-s 0.5] [--json bench/results/synthesis_hold.json]

Writes a PNG beside the JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

from rejoinder.agent.config import AgentConfig
from rejoinder.agent.models import Models
from rejoinder.engine.sampling import SamplingParams
from rejoinder.streaming.assets import resolve
from rejoinder.streaming.streamed_tts import StreamedTTS
from rejoinder.streaming.tts import PiperTTS

QUESTIONS = [
    "How far away is the moon?",
    "What is the capital of France?",
    "Where is the nearest train station?",
    "Tell me a long story about a brave knight and a dragon.",
    "How do I boil an egg?",
    "Can you recommend a good book?",
    "What time is it in Tokyo?",
    "Tell me a joke about cats.",
]


async def answer(models: Models, voice: PiperTTS, question: str, hold_s: float) -> dict:
    t0 = time.monotonic()
    stream = models.engine.stream([{"role": "user", "content": question}], SamplingParams(max_new_tokens=120),
                                  slot="bench")

    async def deltas():
        async for ev in stream:
            yield ev.text

    def hold(on: bool) -> None:
        if hold_s > 0:
            stream.hold(hold_s if on else 0.0)

    tts = StreamedTTS(voice, synthesis_hold=hold)
    first = play_end = None
    stall = 0.0
    async for chunk in tts.run(deltas()):
        now = time.monotonic()
        if first is None:
            first, play_end = now - t0, now
        assert play_end is not None
        if now > play_end:
            stall += now - play_end
            play_end = now
        play_end += chunk.duration
    await stream.aclose()
    return {"question": question, "first_audio_s": first, "done_s": time.monotonic() - t0, "stall_s": stall,
            "audio_s": tts.metrics.audio_seconds}


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(doc["variants"])
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, name in enumerate(names):
        v = [r["first_audio_s"] * 1000 for r in doc["variants"][name]["answers"]]
        ax.scatter([i] * len(v), v, alpha=0.5)
        ax.hlines(statistics.median(v), i - 0.25, i + 0.25, color="k")
    ax.set_xticks(range(len(names)), [f"{n}\n{doc['variants'][n]['label']}" for n in names], fontsize=8)
    ax.set_ylabel("prompt submitted -> first audio (ms)")
    ax.set_title("First audio: Piper and the LLM sharing the CPU vs taking turns (bar: median)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--hold-s", type=float, default=AgentConfig().synthesis_hold_s)
    ap.add_argument("--json", type=Path, default=Path("bench/results/synthesis_hold.json"))
    args = ap.parse_args(argv)
    cores = os.cpu_count() or 2
    half, every = max(1, min(4, cores // 2)), max(1, min(4, cores))
    print("loading models…", flush=True)
    models = Models(AgentConfig.from_env({}))
    voices = {half: PiperTTS(resolve("tts"), threads=half), every: PiperTTS(resolve("tts"), threads=every)}
    variants = {"shared": (half, 0.0), "turns": (every, args.hold_s), "hold_only": (half, args.hold_s)}
    labels = {"shared": f"Piper {half} thr, no hold", "turns": f"Piper {every} thr, hold {args.hold_s:g} s",
              "hold_only": f"Piper {half} thr, hold {args.hold_s:g} s"}
    for threads, hold in variants.values():  # warm-up: first calls pay for allocations
        asyncio.run(answer(models, voices[threads], QUESTIONS[0], hold))
    results: dict[str, list[dict]] = {name: [] for name in variants}
    total = args.rounds * len(QUESTIONS) * len(variants)
    done = 0
    for _ in range(args.rounds):
        for q in QUESTIONS:
            for name, (threads, hold) in variants.items():
                r = asyncio.run(answer(models, voices[threads], q, hold))
                results[name].append(r)
                done += 1
                print(f"[{done}/{total}] {name:9s} {q[:40]:40s} first audio {r['first_audio_s'] * 1000:5.0f} ms, "
                      f"done {r['done_s']:.2f} s, stall {r['stall_s']:.2f} s", flush=True)
    doc: dict = {"cores": cores, "hold_s": args.hold_s, "variants": {}}
    for name, rows in results.items():
        first = [r["first_audio_s"] for r in rows]
        doc["variants"][name] = {
            "label": labels[name], "answers": rows, "first_audio_p50_s": statistics.median(first),
            "first_audio_mean_s": statistics.mean(first), "done_mean_s": statistics.mean(r["done_s"] for r in rows),
            "stall_total_s": sum(r["stall_s"] for r in rows)}
    base = doc["variants"]["shared"]["first_audio_p50_s"]
    for name, v in doc["variants"].items():
        print(f"{name:9s} ({v['label']}): first audio p50 {v['first_audio_p50_s'] * 1000:.0f} ms "
              f"(mean {v['first_audio_mean_s'] * 1000:.0f}), shared/this {base / v['first_audio_p50_s']:.2f}x; "
              f"whole answer mean {v['done_mean_s']:.2f} s; stalls {v['stall_total_s']:.2f} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1))
    plot(doc, args.json.with_suffix(".png"))
    print(f"wrote {args.json} and {args.json.with_suffix('.png')}")
    models.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
