#!/usr/bin/env python
"""Whisper with a short encoder context vs the full 30 s window, on the same model, in the same run.

The peer is faster-whisper as everyone runs it: every buffer padded to 30 s of features. Ours cuts
the features to the audio plus `context_pad_s` (at least `min_context_s`) and redoes a pass that
comes out empty or looping with the full window (rejoinder.streaming.asr). Clips are synthesised at
run time: Piper (two speaking rates) and, when installed, espeak-ng; each clean and with leading and
trailing silence plus noise; 0.4 s to ~15 s. Both configurations decode every clip, interleaved,
`--repeats` times; the time kept per clip is the best of the repeats (the machine is shared).

    python bench/asr_context.py [--threads N] [--repeats N] [--pad S] [--json PATH]

Prints word error rate and decode time per configuration, the speed-up by clip length, and how many
passes needed the full-window retry; --json writes the figures and a PNG beside them.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rejoinder.streaming.asr import ASR_RATE, DEFAULT_CONTEXT_PAD_S, DEFAULT_MIN_CONTEXT_S, WhisperASR
from rejoinder.streaming.assets import resolve
from rejoinder.streaming.audio import read_wav, resample
from rejoinder.streaming.text_metrics import word_error_rate

SENTENCES = (
    "Yes.",
    "No thanks.",
    "What is the capital of France?",
    "How far away is the moon?",
    "Tell me a joke about cats.",
    "Can you recommend a good book?",
    "Where is the nearest train station?",
    "Stop, stop. Wait a moment please.",
    "Please book a table for two at seven tonight.",
    "My account number is four five six seven and I was charged twice this month.",
    "I would like to change the delivery address on my last order, it should go to my office instead.",
    "The weather is lovely today and the park is full of people, so we could walk to the river, have "
    "lunch at the little cafe by the bridge and be home before it gets dark.",
)


@dataclass
class Clip:
    text: str
    voice: str
    audio: np.ndarray

    @property
    def duration_s(self) -> float:
        return self.audio.size / ASR_RATE


def trim(audio: np.ndarray, threshold: float = 0.01) -> np.ndarray:
    idx = np.flatnonzero(np.abs(audio) > threshold)
    return audio[idx[0] : idx[-1] + 1] if idx.size else audio


def synthesise() -> list[Clip]:
    from piper import PiperVoice, SynthesisConfig

    piper = PiperVoice.load(resolve("tts"))
    espeak = shutil.which("espeak-ng")

    def piper_say(text: str, length_scale: float) -> np.ndarray:
        chunks = list(piper.synthesize(text, syn_config=SynthesisConfig(length_scale=length_scale)))
        audio = np.concatenate([c.audio_float_array for c in chunks]).astype(np.float32)
        return resample(audio, chunks[0].sample_rate, ASR_RATE)

    def espeak_say(text: str) -> np.ndarray:
        import io

        wav = subprocess.run([espeak, "-v", "en-us", "-s", "150", "--stdout", text], check=True,
                             capture_output=True).stdout
        audio, rate = read_wav(io.BytesIO(wav), max_seconds=None)
        return resample(audio, rate, ASR_RATE)

    rng = np.random.default_rng(0)
    clips: list[Clip] = []
    for text in SENTENCES:
        voices = {"piper": piper_say(text, 1.0), "piper-slow": piper_say(text, 1.3)}
        if espeak:
            voices["espeak"] = espeak_say(text)
        for name, audio in voices.items():
            audio = trim(audio)
            clips.append(Clip(text, name, audio))
            padded = np.concatenate([np.zeros(int(0.25 * ASR_RATE), np.float32), audio,
                                     np.zeros(int(0.2 * ASR_RATE), np.float32)])
            clips.append(Clip(text, name + "+noise", padded + rng.normal(0, 0.003, padded.size).astype(np.float32)))
    if not espeak:
        print("espeak-ng not installed: Piper voices only", flush=True)
    return clips


def decode(asr: WhisperASR, clip: Clip, pad: float | None) -> tuple[str, float, bool]:
    asr.context_pad_s = pad
    t0 = time.perf_counter()
    tr = asr.transcribe(clip.audio, word_timestamps=True)
    return tr.text, time.perf_counter() - t0, tr.retried_full_context


def plot(path: Path, buckets: dict[str, dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(buckets)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(x - 0.2, [buckets[n]["full_s"] * 1000 for n in names], 0.4, label="full 30 s window (faster-whisper)")
    ax.bar(x + 0.2, [buckets[n]["short_s"] * 1000 for n in names], 0.4, label="short context (ours)")
    for i, n in enumerate(names):
        ax.text(i + 0.2, buckets[n]["short_s"] * 1000, f"{buckets[n]['full_s'] / buckets[n]['short_s']:.1f}x",
                ha="center", va="bottom", fontsize=9)
    ax.set_xticks(x, names)
    ax.set_xlabel("clip length")
    ax.set_ylabel("median decode time per clip (ms)")
    ax.set_title("Whisper base int8: short encoder context vs full window")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=0, help="CTranslate2 threads (0: all cores)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--pad", type=float, default=DEFAULT_CONTEXT_PAD_S, help="context padding in seconds (ours)")
    ap.add_argument("--min-context", type=float, default=DEFAULT_MIN_CONTEXT_S, help="least context in seconds (ours)")
    ap.add_argument("--json", type=Path, help="write figures here (and a .png plot beside)")
    args = ap.parse_args(argv)

    print("synthesising clips ...", flush=True)
    clips = synthesise()
    asr = WhisperASR(cpu_threads=args.threads, min_context_s=args.min_context)
    asr.transcribe(clips[0].audio)  # warm-up
    best = {"full": [float("inf")] * len(clips), "short": [float("inf")] * len(clips)}
    texts: dict[str, list[str]] = {"full": [""] * len(clips), "short": [""] * len(clips)}
    retried = [False] * len(clips)
    for r in range(args.repeats):
        for i, clip in enumerate(clips):
            order = (("full", None), ("short", args.pad)) if (i + r) % 2 == 0 else (("short", args.pad), ("full", None))
            for name, pad in order:
                text, dt, retry = decode(asr, clip, pad)
                best[name][i] = min(best[name][i], dt)
                texts[name][i] = text
                if name == "short":
                    retried[i] = retried[i] or retry
            print(f"\rrepeat {r + 1}/{args.repeats}: {i + 1}/{len(clips)} clips", end="", flush=True)
    print()

    wer = {n: [word_error_rate(c.text, texts[n][i]) for i, c in enumerate(clips)] for n in best}
    for i, clip in enumerate(clips):
        if wer["short"][i] > wer["full"][i] + 0.1:
            print(f"  worse with short context [{clip.voice}, {clip.duration_s:.1f} s]: "
                  f"{texts['short'][i]!r} vs {texts['full'][i]!r}")
    edges = ((0, 2.0, "< 2 s"), (2.0, 5.0, "2-5 s"), (5.0, 10.0, "5-10 s"), (10.0, 31.0, ">= 10 s"))
    buckets: dict[str, dict[str, float]] = {}
    for lo, hi, name in edges:
        idx = [i for i, c in enumerate(clips) if lo <= c.duration_s < hi]
        if idx:
            buckets[name] = {"clips": len(idx), "full_s": statistics.median(best["full"][i] for i in idx),
                             "short_s": statistics.median(best["short"][i] for i in idx)}
    result = {
        "model": str(asr.model_dir), "threads": args.threads, "repeats": args.repeats, "clips": len(clips),
        "pad_s": args.pad, "min_context_s": asr.min_context_s,
        "wer": {n: statistics.fmean(v) for n, v in wer.items()},
        "decode_s_mean": {n: statistics.fmean(v) for n, v in best.items()},
        "speedup_mean": statistics.fmean(best["full"]) / statistics.fmean(best["short"]),
        "full_window_retries": sum(retried),
        "by_length": buckets,
    }
    print(f"{len(clips)} clips, {min(c.duration_s for c in clips):.1f}-{max(c.duration_s for c in clips):.1f} s")
    print(f"{'':24}{'WER':>8}{'mean decode':>14}")
    print(f"{'full 30 s (peer)':24}{result['wer']['full']:8.3f}{result['decode_s_mean']['full'] * 1000:11.0f} ms")
    print(f"{'short context (ours)':24}{result['wer']['short']:8.3f}{result['decode_s_mean']['short'] * 1000:11.0f} ms")
    print(f"speed-up {result['speedup_mean']:.2f}x; full-window retries: {sum(retried)}/{len(clips)}")
    for name, b in buckets.items():
        print(f"  {name:>8}: {b['clips']:2d} clips, {b['full_s'] * 1000:5.0f} -> {b['short_s'] * 1000:5.0f} ms "
              f"({b['full_s'] / b['short_s']:.1f}x)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        png = args.json.with_suffix(".png")
        plot(png, buckets)
        print(f"wrote {args.json} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
