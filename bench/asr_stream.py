#!/usr/bin/env python
"""Streaming ASR vs its peer, batch re-transcription at end of speech, measured in the same run.

For utterances of ~2, 5 and 20 s (and 60 s with --long), synthesised with Piper at run time:

- streaming: frames are fed to StreamingASR; by default "as fast as possible" in lockstep (after
  each 20 ms frame the pass in flight is awaited, so passes run every interim interval of audio
  whatever the CPU speed), or paced in real time with --realtime.
- finalize latency: from finish() at the end of speech to the final event, re-decoding only the
  uncommitted tail (the worst case: finish called the moment speech ends).
- finalize latency after hang-over: 0.5 s of silence fed first (as a VAD hang-over does), a pass
  requested 0.2 s into it (as the Listener does when speech pauses) and the speech end passed to
  finish(); the final is then usually that pass's hypothesis (no decode after the hang-over).
- first interim: time from speech onset to the first interim event (audio time + decode time
  in lockstep mode, wall time with --realtime).
- baseline (the peer): WhisperASR.transcribe of the whole utterance at end of speech, the same
  model and settings; its time is the finalize latency a non-streaming pipeline would have.

    python bench/asr_stream.py [--realtime] [--long] [--repeats N] [--json PATH]

--json writes the figures and a PNG plot (same name, .png) beside them.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rejoinder.streaming.asr import ASR_RATE, WhisperASR
from rejoinder.streaming.asr_stream import StreamingASR, StreamingASRConfig
from rejoinder.streaming.assets import resolve
from rejoinder.streaming.audio import resample
from rejoinder.streaming.text_metrics import word_error_rate

FRAME = 320  # 20 ms at 16 kHz
HANGOVER_S = 0.5

SENTENCES = (
    "Please close the door before you leave.",
    "The weather is lovely today and the park is full of people.",
    "Please remind me to call my sister after lunch tomorrow.",
    "I would like a cup of coffee with a little milk.",
    "The library closes early on the weekend, so we should hurry.",
    "Could you tell me how to get to the train station from here?",
    "My favourite season is autumn because the leaves change colour.",
    "We planted tomatoes and beans in the garden last spring.",
    "The meeting has been moved to the afternoon, after the break.",
    "She opened the window to let some fresh air into the room.",
    "Turn left at the bakery and walk straight for a few minutes.",
    "He forgot his umbrella at home and got wet in the rain.",
    "Reading a good book before bed helps me fall asleep.",
)


@dataclass
class Utterance:
    target_s: int
    text: str
    audio: np.ndarray

    @property
    def duration_s(self) -> float:
        return self.audio.size / ASR_RATE


class Speaker:
    def __init__(self) -> None:
        from piper import PiperVoice

        self.voice = PiperVoice.load(resolve("tts"))

    def say(self, text: str) -> np.ndarray:
        chunks = list(self.voice.synthesize(text))
        audio = np.concatenate([c.audio_float_array for c in chunks]).astype(np.float32)
        return resample(audio, chunks[0].sample_rate, ASR_RATE)

    def utterance(self, target_s: int) -> Utterance:
        """Sentences in order until the audio reaches ~target_s (the first one alone is ~2 s)."""
        texts: list[str] = []
        parts: list[np.ndarray] = []
        i = 0
        while not parts or sum(p.size for p in parts) / ASR_RATE < target_s - 1.0:
            texts.append(SENTENCES[i % len(SENTENCES)])
            parts.append(self.say(texts[-1]))
            i += 1
        return Utterance(target_s, " ".join(texts), np.concatenate(parts))


@dataclass
class Run:
    finalize_s: float
    finalize_after_hangover_s: float
    first_interim_s: float
    wer: float
    baseline_s: float
    baseline_wer: float
    interims: int


async def stream_once(
    asr: WhisperASR, cfg: StreamingASRConfig, audio: np.ndarray, *, realtime: bool, hangover: bool
) -> tuple[str, float, float, int]:
    """Returns (final text, finalize latency, first-interim latency, number of interims)."""
    s = StreamingASR(asr, cfg)
    speech_end_s = audio.size / ASR_RATE
    feed = np.concatenate([audio, np.zeros(int(HANGOVER_S * ASR_RATE), np.float32)]) if hangover else audio
    first_interim: float | None = None
    interims = 0
    requested = False
    pause_after_s = cfg.final_reuse_margin_s + 0.05
    t_start = time.monotonic()
    for i in range(0, feed.size, FRAME):
        if realtime:
            # Pace on the clock (not sleep per frame) so decode hiccups do not slow the feed.
            delay = t_start + i / ASR_RATE - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        await s.feed(feed[i : i + FRAME])
        if hangover and not requested and (i + FRAME) / ASR_RATE >= speech_end_s + pause_after_s:
            # What streaming.listener.Listener does when speech pauses: decode during the hang-over.
            requested = True
            s.request_pass()
        if not realtime:
            await s.settle()
        while (ev := s.get_nowait()) is not None:
            interims += 1
            if first_interim is None:
                first_interim = (ev.emitted_at - t_start) if realtime else ev.audio_s + ev.decode_s
    t0 = time.monotonic()
    final = await s.finish(speech_end_s=speech_end_s if hangover else None)
    latency = time.monotonic() - t0
    return final.text, latency, first_interim if first_interim is not None else float("nan"), interims


async def measure(asr: WhisperASR, cfg: StreamingASRConfig, utt: Utterance, realtime: bool) -> Run:
    text, fin, first, n = await stream_once(asr, cfg, utt.audio, realtime=realtime, hangover=False)
    _, fin_h, _, _ = await stream_once(asr, cfg, utt.audio, realtime=realtime, hangover=True)
    t0 = time.perf_counter()
    base = await asyncio.to_thread(asr.transcribe, utt.audio, word_timestamps=False)
    base_s = time.perf_counter() - t0
    for label, hyp in (("streaming", text), ("peer", base.text)):
        if word_error_rate(utt.text, hyp) > 0.2:
            print(f"  [{utt.target_s} s] {label} WER {word_error_rate(utt.text, hyp):.2f}: {hyp!r}", flush=True)
    return Run(fin, fin_h, first, word_error_rate(utt.text, text), base_s, word_error_rate(utt.text, base.text), n)


def med(xs: list[float]) -> float:
    return float(statistics.median(xs))


def plot(path: Path, lengths: list[int], stream_s: list[float], hang_s: list[float], base_s: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(lengths))
    w = 0.27
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(x - w, base_s, w, label="batch re-transcribe (peer)")
    ax.bar(x, stream_s, w, label="streaming: tail re-decode")
    ax.bar(x + w, hang_s, w, label="streaming: after 0.5 s hang-over")
    ax.set_xticks(x, [f"{n} s" for n in lengths])
    ax.set_xlabel("utterance length")
    ax.set_ylabel("finalize latency (s)")
    ax.set_title("End of speech -> final transcript (Whisper base int8, CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--realtime", action="store_true", help="feed at real-time pace instead of lockstep")
    ap.add_argument("--long", action="store_true", help="add a 60 s utterance")
    ap.add_argument("--repeats", type=int, default=1, help="runs per length (median reported)")
    ap.add_argument("--interval", type=float, default=0.4, help="interim interval in seconds of audio")
    ap.add_argument("--threads", type=int, default=0, help="CTranslate2 CPU threads (0: default)")
    ap.add_argument("--json", type=Path, help="write figures here (and a .png plot beside)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    lengths = [2, 5, 20] + ([60] if args.long else [])
    speaker = Speaker()
    utts = [speaker.utterance(n) for n in lengths]
    asr = WhisperASR(cpu_threads=args.threads)
    asr.transcribe(utts[0].audio)  # warm-up: first call pays one-off allocation costs
    cfg = StreamingASRConfig(interim_interval_s=args.interval)
    mode = "real-time" if args.realtime else "lockstep"
    print(f"streaming ASR bench ({mode} feed, interval {args.interval} s, {args.repeats} repeat(s))")
    print(f"{'length':>7} {'audio':>6} {'final':>7} {'final+ho':>8} {'peer':>7} {'peer/stream':>11} "
          f"{'1st int':>7} {'WER':>5} {'peerWER':>7} {'interims':>8}")
    results: dict[int, list[Run]] = {}
    for utt in utts:
        runs = [asyncio.run(measure(asr, cfg, utt, args.realtime)) for _ in range(args.repeats)]
        results[utt.target_s] = runs
        fin, fin_h = med([r.finalize_s for r in runs]), med([r.finalize_after_hangover_s for r in runs])
        base = med([r.baseline_s for r in runs])
        print(f"{utt.target_s:>6}s {utt.duration_s:>5.1f}s {fin:>6.3f}s {fin_h:>7.3f}s {base:>6.3f}s "
              f"{base / fin:>10.2f}x {med([r.first_interim_s for r in runs]):>6.2f}s "
              f"{med([r.wer for r in runs]):>5.2f} {med([r.baseline_wer for r in runs]):>7.2f} "
              f"{med([r.interims for r in runs]):>8.0f}")
    keys = [str(n) for n in lengths]
    fin_by = {k: med([r.finalize_s for r in results[n]]) for k, n in zip(keys, lengths)}
    hang_by = {k: med([r.finalize_after_hangover_s for r in results[n]]) for k, n in zip(keys, lengths)}
    base_by = {k: med([r.baseline_s for r in results[n]]) for k, n in zip(keys, lengths)}
    all_runs = [r for runs in results.values() for r in runs]
    out = {
        "mode": mode,
        "interim_interval_s": args.interval,
        "utterance_s": {str(u.target_s): round(u.duration_s, 2) for u in utts},
        "finalize_latency_s": fin_by,
        "finalize_latency_after_hangover_s": hang_by,
        "baseline_finalize_latency_s": base_by,
        "speedup_vs_baseline": {k: base_by[k] / fin_by[k] for k in keys},
        "finalize_latency_growth_20_vs_2": fin_by["20"] / fin_by["2"],
        "baseline_latency_growth_20_vs_2": base_by["20"] / base_by["2"],
        "first_interim_s": med([r.first_interim_s for r in all_runs]),
        "wer": statistics.mean(r.wer for r in all_runs),
        "wer_by_length": {k: med([r.wer for r in results[n]]) for k, n in zip(keys, lengths)},
        "baseline_wer": statistics.mean(r.baseline_wer for r in all_runs),
    }
    print(f"finalize latency 20 s / 2 s: streaming {out['finalize_latency_growth_20_vs_2']:.2f}x, "
          f"peer {out['baseline_latency_growth_20_vs_2']:.2f}x; mean WER streaming {out['wer']:.3f}, "
          f"peer {out['baseline_wer']:.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        png = args.json.with_suffix(".png")
        plot(png, lengths, list(fin_by.values()), list(hang_by.values()), list(base_by.values()))
        print(f"wrote {args.json} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
