"""First token -> first audio of a streamed answer, and how its pieces join: lead-in vs clause-first.

Each reference answer (typical of the agent: short factual answers, apologies, numbers, titles,
quotes) is streamed token by token through the embedded LLM's real tokenizer, one token every
`--token-ms` (our CPU decoder runs ~220 tokens/s on 2 cores, bench/results/decode.json; 25 ms
stands for a slower model or a loaded box), into StreamedTTS with the real Piper voice. In the same
run, interleaved answer by answer:

* old:     clause-first segmentation (`SegmenterConfig.clause_only()`), raw Piper joins, Piper's
           per-sentence peak normalisation — the product before lead-ins;
* lead:    lead-in segmentation, but raw Piper joins and per-sentence normalisation — what cutting
           early costs at the joins when nothing else changes;
* new:     lead-in segmentation, shaped joins (`JoinConfig()`), one gain per voice — the default.

Measured per answer: first token -> first chunk handed out (`StreamedTTS.metrics`), first token ->
first voice in that chunk (adds its leading silence), the words of the first segment; at every join,
the gap of silence and the click measures of tests/seams.py against a continuous synthesis of the
whole answer by the same voice; the level step between a lead-in and the rest of its sentence; and
(unless --no-wer) Whisper's WER on the joined audio vs the continuous synthesis. Piper's noise is
off unless --natural, so the variants differ only in how the answer is cut and joined. A last table
replays the measured pieces at other synthesis speeds (real-time factors), to show where a short
first piece lets playback run dry before the next one is ready (a stall).

    python bench/first_audio.py [--json bench/results/first_audio.json] [--token-ms 5,25] [--rounds 1]
                                [--natural] [--no-wer]
Writes a PNG next to the JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import seams  # noqa: E402

from rejoinder.streaming.assets import resolve  # noqa: E402
from rejoinder.streaming.streamed_tts import JoinConfig, StreamedTTS, ends_mid_phrase  # noqa: E402
from rejoinder.streaming.text_segmenter import SegmenterConfig, TextSegmenter  # noqa: E402
from rejoinder.streaming.tts import PiperTTS  # noqa: E402

ANSWERS = [
    "The capital of France is Paris.",
    "Sure, the capital of France is Paris, which is also its largest city.",
    "Paris.",
    "I'm sorry, but I can't help with that request.",
    "Hello! How can I help you today?",
    "The moon is about 384,400 kilometers away from the Earth on average.",
    "Dr. Smith works at the hospital in the center of town, near the station.",
    "Mount Everest is the tallest mountain in the world, at 8,849 meters above sea level.",
    "Sure! Here is a joke: why did the cat sit on the computer? To keep an eye on the mouse.",
    "Well, I think the best way to learn a language is to speak it every day.",
    "It is currently 3:30 in the afternoon, and the weather is sunny.",
    'He said "hello" to me and then walked out of the room without another word.',
    "The nearest train station is about 10 minutes from here on foot.",
    "Of course, I would be happy to recommend a good book for you to read.",
    "Water boils at 100 degrees Celsius at sea level, and freezes at zero.",
    "The meeting has been moved to Thursday at 10 a.m. in the main conference room.",
    "Yes, you can pay with a credit card or in cash at the front desk.",
    "To reset your password, open the settings page and choose the security tab.",
    "The Great Wall of China is more than 21,000 kilometers long.",
    "That is a great question, and the short answer is that it depends on the season.",
    "Photosynthesis is the process by which plants turn sunlight into chemical energy.",
    "No problem, I have set a reminder for your appointment tomorrow morning.",
    "A healthy adult should drink around 2 liters of water per day.",
    "Thanks for asking! My favorite color is blue, like the sky on a clear day.",
]

SIM_RTF = (0.05, 0.1, 0.2, 0.3, 0.5)  # Piper on an idle 2-core box: 0.05 (DESIGN.md)

VARIANTS = {
    "old": dict(segmenter=SegmenterConfig.clause_only(), joins=None, voice="sentence"),
    "lead": dict(segmenter=SegmenterConfig(), joins=None, voice="sentence"),
    "new": dict(segmenter=SegmenterConfig(), joins=JoinConfig(), voice="voice"),
}


def load_tokenizer():
    from rejoinder.engine.gguf_loader import read_metadata
    from rejoinder.engine.tokenizer import tokenizer_from_gguf

    return tokenizer_from_gguf(read_metadata(resolve("llm"))[1])


def token_deltas(tokenizer, text: str) -> list[str]:
    """The text deltas an engine would stream for `text` (decoded prefix by prefix, as engine.py does)."""
    ids = tokenizer.encode(text)
    out, emitted = [], ""
    for i in range(1, len(ids) + 1):
        t = tokenizer.decode(ids[:i])
        if t.endswith("\ufffd"):
            continue
        out.append(t[len(emitted):])
        emitted = t
    assert "".join(out) == text, (out, text)
    return out


async def stream_answer(tts: PiperTTS, deltas: list[str], token_s: float, variant: dict) -> tuple[StreamedTTS, list]:
    async def tokens():
        for i, d in enumerate(deltas):
            if i:
                await asyncio.sleep(token_s)
            yield d

    st = StreamedTTS(tts, segmenter=variant["segmenter"], joins=variant["joins"])
    chunks, arrivals = [], []
    async for c in st.run(tokens()):
        chunks.append(c)
        arrivals.append(time.monotonic())
    st.arrivals = arrivals  # type: ignore[attr-defined]  (bench bookkeeping only)
    return st, chunks


def stall_s(arrivals: list[float], durations: list[float]) -> float:
    """Silence a real-time player would insert waiting for chunks (playback starts with the first)."""
    end, stall = None, 0.0
    for t, d in zip(arrivals, durations):
        if end is not None and t > end:
            stall += t - end
        end = max(t, end if end is not None else t) + d
    return stall


def leading_silence_s(audio: np.ndarray, rate: int, ref: seams.Reference) -> float:
    x = audio.astype(np.float32) / 32768.0
    w = int(0.005 * rate)
    k = x.size // w
    rms = np.sqrt(np.mean(np.square(x[: k * w].reshape(k, w)), axis=1))
    voiced = np.flatnonzero(rms > ref.silence_level)
    return float(voiced[0] * 0.005) if voiced.size else 0.0


def release_points(deltas: list[str], config: SegmenterConfig) -> dict[int, int]:
    """Segment index -> index of the token whose arrival released it (the segmenter is deterministic)."""
    seg, out = TextSegmenter(config), {}
    for i, d in enumerate(deltas):
        out.update({s.index: i for s in seg.push(d)})
    out.update({s.index: len(deltas) - 1 for s in seg.finish()})
    return out


def simulate(pieces: list[tuple[int, float]], token_s: float, rtf: float) -> tuple[float, float]:
    """(first audio, stall) for chunks [(release token, seconds of audio)] if synthesis took `rtf` x
    the audio's duration on one worker, and playback ran in real time from the first chunk."""
    free, play_end, stall, first = 0.0, None, 0.0, 0.0
    for tok, dur in pieces:
        done = max(tok * token_s, free) + rtf * dur
        free = done
        if play_end is None:
            first, play_end = done, done + dur
        else:
            stall += max(0.0, done - play_end)
            play_end = max(done, play_end) + dur
    return first, stall


def measure(text: str, st: StreamedTTS, chunks: list, ref: seams.Reference, rate: int,
            released: dict[int, int]) -> dict:
    m = st.metrics
    _, js = seams.joins([c.audio for c in chunks], rate, ref)
    mid = [ends_mid_phrase(c.text) for c in chunks[:-1]]
    first_seg = [c for c in chunks if c.segment_index == chunks[0].segment_index]
    first_text = "".join(c.text for c in first_seg)
    lead = m.first_audio_latency + leading_silence_s(chunks[0].audio, rate, ref)
    level = seams.level_step_db([c.gain for c in chunks[:2]]) if len(chunks) > 1 and mid[:1] == [True] else None
    return {
        "first_audio_s": m.first_audio_latency,
        "first_voice_s": lead,
        "first_segment": first_text,
        "first_words": len(first_text.split()),
        "segments": m.segments,
        "joins": [{**j.as_dict(), "mid_phrase": mp} for j, mp in zip(js, mid)],
        "level_step_db": level,
        "stall_s": stall_s(st.arrivals, [c.duration for c in chunks]),
        "rtf": m.synth_seconds / m.audio_seconds if m.audio_seconds else None,
        "pieces": [(released[c.segment_index], c.duration) for c in chunks],
        "audio_s": m.audio_seconds,
        "text_ok": "".join(c.text for c in chunks) == text,
    }


def summarize(rows: list[dict], refs: list[seams.Reference]) -> dict:
    lat = [r["first_audio_s"] for r in rows]
    voice = [r["first_voice_s"] for r in rows]
    mid_gaps = [j["gap_s"] for r in rows for j in r["joins"] if j["mid_phrase"]]
    all_joins = [(j, ref) for r, ref in zip(rows, refs) for j in r["joins"]]
    over = sum(1 for j, ref in all_joins if j["jump"] > ref.max_jump or j["flux"] > ref.max_flux
               or j["hf_flux"] > ref.max_hf_flux)
    levels = [r["level_step_db"] for r in rows if r["level_step_db"] is not None]
    return {
        "first_audio_p50_s": float(np.median(lat)), "first_audio_mean_s": float(np.mean(lat)),
        "first_audio_p90_s": float(np.percentile(lat, 90)),
        "first_voice_p50_s": float(np.median(voice)), "first_voice_mean_s": float(np.mean(voice)),
        "first_words_mean": float(np.mean([r["first_words"] for r in rows])),
        "joins": len(all_joins), "mid_phrase_joins": len(mid_gaps),
        "mid_phrase_gap_p50_s": float(np.median(mid_gaps)) if mid_gaps else None,
        "mid_phrase_gap_max_s": float(np.max(mid_gaps)) if mid_gaps else None,
        "joins_over_continuous_bounds": over,
        "lead_level_step_db_mean": float(np.mean(levels)) if levels else None,
        "lead_level_step_db_max": float(np.max(levels)) if levels else None,
        "stalled_answers": sum(1 for r in rows if r["stall_s"] > 0.02),
        "stall_total_s": float(sum(r["stall_s"] for r in rows)),
        "rtf_p50": float(np.median([r["rtf"] for r in rows if r["rtf"] is not None])),
        "text_ok": all(r["text_ok"] for r in rows),
    }


def wer_pass(results: dict, voices: dict, whisper, rate: int) -> None:
    from rejoinder.streaming.audio import resample
    from rejoinder.streaming.text_metrics import word_error_rate

    def wer(audio: np.ndarray, text: str) -> float:
        x = audio.astype(np.float32) / 32768.0 if audio.dtype == np.int16 else audio
        return word_error_rate(text, whisper.transcribe(resample(x, rate, 16_000), word_timestamps=False).text)

    for v in results["variants"].values():
        rows = [r for pace in v.values() for r in pace["rows"] if "_audio" in r]
        for r in rows:
            r["wer_joined"] = wer(r.pop("_audio"), r["text"])
        for pace in v.values():
            pace["summary"]["wer_joined_mean"] = float(np.mean([r["wer_joined"] for r in rows])) if rows else None
    results["wer_continuous"] = {
        k: float(np.mean([wer(v.synthesize(t), t) for t in ANSWERS])) for k, v in voices.items()
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paces = results["token_ms"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    ax = axes[0]
    width = 0.8 / len(VARIANTS)
    for k, name in enumerate(VARIANTS):
        meds = [results["variants"][name][str(p)]["summary"]["first_audio_p50_s"] * 1000 for p in paces]
        ax.bar(np.arange(len(paces)) + k * width, meds, width, label=name)
        for i, v in enumerate(meds):
            ax.text(i + k * width, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(np.arange(len(paces)) + width * (len(VARIANTS) - 1) / 2, [f"{p} ms/token" for p in paces])
    ax.set_ylabel("first token -> first audio, p50 (ms)")
    ax.set_title(f"{len(ANSWERS)} answers, Piper {results['voice']}")
    ax.legend()
    ax = axes[1]
    for name in VARIANTS:
        gaps = [j["gap_s"] * 1000 for p in paces for r in results["variants"][name][str(p)]["rows"]
                for j in r["joins"] if j["mid_phrase"]]
        if gaps:
            ax.hist(gaps, bins=np.arange(0, 320, 10), alpha=0.6, label=f"{name} ({len(gaps)} joins)")
    inner = [g * 1000 for g in results["continuous_word_gaps_s"]]
    if inner:
        p95 = float(np.percentile(inner, 95))
        ax.axvline(p95, color="k", ls="--",
                   label=f"pauses between words inside\ncontinuous syntheses: p95 ({p95:.0f} ms)")
    ax.set_xlabel("silence at a mid-phrase join (ms)")
    ax.set_ylabel("joins")
    ax.set_title("gap where a piece ends between two words")
    ax.legend(fontsize=8)
    ax = axes[2]
    pace = str(paces[0])
    for name in VARIANTS:
        sims = results["variants"][name][pace]["summary"]["simulated"]
        xs = [float(r) for r in sims]
        line, = ax.plot(xs, [sims[r]["first_audio_p50_s"] * 1000 for r in sims], marker="o",
                        label=f"{name}: first audio p50")
        ax.plot(xs, [sims[r]["stall_total_s"] * 1000 / len(ANSWERS) for r in sims], ls=":", marker="x",
                color=line.get_color(), label=f"{name}: stall per answer")
    measured = results["variants"]["new"][pace]["summary"]["rtf_p50"]
    ax.axvline(measured, color="grey", ls="--", label=f"RTF measured in this run ({measured:.2f})")
    ax.set_xlabel("Piper real-time factor (synthesis time / audio time)")
    ax.set_ylabel("ms")
    ax.set_title(f"simulated from the same pieces, {pace} ms/token")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "first_audio.json"))
    ap.add_argument("--token-ms", default="5,25", help="token pacing(s), comma separated")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--no-wer", action="store_true", help="skip the Whisper check of the joined audio")
    ap.add_argument("--natural", action="store_true",
                    help="keep Piper's noise (what the product plays); by default noise is off, so every variant "
                         "synthesises the same waveform for the same piece of text")
    args = ap.parse_args()
    paces = [float(p) for p in args.token_ms.split(",")]
    paces = [int(p) if p.is_integer() else p for p in paces]

    t0 = time.perf_counter()
    tokenizer = load_tokenizer()
    noise = {} if args.natural else {"noise_scale": 0.0, "noise_w_scale": 0.0}
    voices = {"sentence": PiperTTS(normalize="sentence", **noise), "voice": PiperTTS(**noise)}
    rate = voices["voice"].sample_rate
    for v in voices.values():
        v.synthesize("Warm up, please.")
    print(f"models loaded in {time.perf_counter() - t0:.1f} s; voice gain {voices['voice'].voice_gain:.3f}")
    deltas = [token_deltas(tokenizer, a) for a in ANSWERS]
    # the continuous synthesis each join is judged against (per normalisation, so levels match)
    refs = {k: [seams.reference(v.synthesize(a), rate) for a in ANSWERS] for k, v in voices.items()}
    word_gaps = [g for ref in refs["voice"] for g in ref.gaps_s if g < 0.15]

    results: dict = {"voice": Path(voices["voice"].model_path).stem, "token_ms": paces, "rounds": args.rounds,
                     "piper_noise": bool(args.natural),
                     "answers": ANSWERS, "machine": f"{platform.machine()} ({__import__('os').cpu_count()} cores)",
                     "continuous_word_gaps_s": word_gaps, "variants": {n: {} for n in VARIANTS}}
    for pace in paces:
        rows: dict[str, list] = {n: [] for n in VARIANTS}
        rref: dict[str, list] = {n: [] for n in VARIANTS}
        for rnd in range(args.rounds):
            for i, text in enumerate(ANSWERS):
                order = list(VARIANTS) if (i + rnd) % 2 == 0 else list(reversed(VARIANTS))
                for name in order:
                    var = VARIANTS[name]
                    st, chunks = asyncio.run(stream_answer(voices[var["voice"]], deltas[i], pace / 1000, var))
                    ref = refs[var["voice"]][i]
                    released = release_points(deltas[i], var["segmenter"])
                    row = {"text": text, **measure(text, st, chunks, ref, rate, released)}
                    if rnd == 0 and pace == paces[0] and not args.no_wer:
                        row["_audio"] = np.concatenate([c.audio for c in chunks])
                    rows[name].append(row)
                    rref[name].append(ref)
        for name in VARIANTS:
            summary = summarize(rows[name], rref[name])
            sims = {}
            for rtf in SIM_RTF:
                runs = [simulate(r["pieces"], pace / 1000, rtf) for r in rows[name]]
                sims[str(rtf)] = {"first_audio_p50_s": float(np.median([f for f, _ in runs])),
                                  "stalled_answers": sum(1 for _, st in runs if st > 0.02),
                                  "stall_total_s": float(sum(st for _, st in runs))}
            summary["simulated"] = sims
            results["variants"][name][str(pace)] = {"summary": summary, "rows": rows[name]}

    if not args.no_wer:
        from rejoinder.streaming.asr import WhisperASR

        wer_pass(results, voices, WhisperASR(), rate)

    ratios = {}
    print(f"\n{len(ANSWERS)} answers x {args.rounds} round(s); first token -> first audio (chunk handed out)")
    print(f"{'pace':>8} {'variant':>7} {'p50 ms':>8} {'mean ms':>8} {'p90 ms':>8} {'voice p50':>9} {'words':>6} "
          f"{'mid gap p50/max ms':>19} {'over':>5} {'lead dB':>8} {'stalls':>7} {'RTF':>5}")
    for pace in paces:
        for name in VARIANTS:
            s = results["variants"][name][str(pace)]["summary"]
            gaps = (f"{s['mid_phrase_gap_p50_s'] * 1000:.0f}/{s['mid_phrase_gap_max_s'] * 1000:.0f}"
                    if s["mid_phrase_gap_p50_s"] is not None else "-")
            lvl = f"{s['lead_level_step_db_mean']:.1f}" if s["lead_level_step_db_mean"] is not None else "-"
            print(f"{pace:>8} {name:>7} {s['first_audio_p50_s'] * 1000:8.0f} {s['first_audio_mean_s'] * 1000:8.0f} "
                  f"{s['first_audio_p90_s'] * 1000:8.0f} {s['first_voice_p50_s'] * 1000:9.0f} "
                  f"{s['first_words_mean']:6.1f} {gaps:>19} {s['joins_over_continuous_bounds']:>5} {lvl:>8} "
                  f"{s['stalled_answers']:>3} {s['stall_total_s']:.2f}s {s['rtf_p50']:5.2f}")
        old = results["variants"]["old"][str(pace)]["summary"]
        new = results["variants"]["new"][str(pace)]["summary"]
        ratios[str(pace)] = {
            "first_audio_p50_old_over_new": old["first_audio_p50_s"] / new["first_audio_p50_s"],
            "first_audio_mean_old_over_new": old["first_audio_mean_s"] / new["first_audio_mean_s"],
            "first_voice_p50_old_over_new": old["first_voice_p50_s"] / new["first_voice_p50_s"],
        }
        r = ratios[str(pace)]
        print(f"   {pace} ms/token: old/new first audio p50 {r['first_audio_p50_old_over_new']:.2f}x, "
              f"mean {r['first_audio_mean_old_over_new']:.2f}x; "
              f"first voice p50 {r['first_voice_p50_old_over_new']:.2f}x")
    results["ratios"] = ratios
    print("\nsimulated from the same pieces: synthesis at RTF x the audio's duration, one worker, real-time playout")
    print(f"{'pace':>8} {'variant':>7} " + " ".join(f"{'RTF ' + str(r):>20}" for r in SIM_RTF))
    for pace in paces:
        for name in VARIANTS:
            sims = results["variants"][name][str(pace)]["summary"]["simulated"]
            cells = [f"{sims[str(r)]['first_audio_p50_s'] * 1000:5.0f} ms {sims[str(r)]['stalled_answers']:2d} stalled"
                     for r in SIM_RTF]
            print(f"{pace:>8} {name:>7} " + " ".join(f"{c:>20}" for c in cells))
    if word_gaps:
        print(f"pauses under 150 ms inside continuous syntheses: p50 {np.median(word_gaps) * 1000:.0f} ms, "
              f"p95 {np.percentile(word_gaps, 95) * 1000:.0f} ms, max {max(word_gaps) * 1000:.0f} ms")
    if not args.no_wer:
        cont = results["wer_continuous"]
        print(f"WER: continuous {cont['voice']:.3f} (one gain per voice) / {cont['sentence']:.3f} (per sentence); "
              "joined: " + ", ".join(
            f"{n} {results['variants'][n][str(paces[0])]['summary']['wer_joined_mean']:.3f}" for n in VARIANTS))

    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=float))
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
