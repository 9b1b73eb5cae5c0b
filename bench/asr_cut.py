#!/usr/bin/env python
"""Does Whisper hear the same words when the audio stops a little before the VAD's speech end?

The speculative hand-over answers from the pass that decodes the pause. When an interim pass is
already running as the user's last word ends, `StreamingASR.request_pass` takes it as the pause's
pass if it stops at most `pause_cover_tolerance_s` short of the end of speech (and the speech lasted
`pause_cover_min_speech_s`), instead of queueing a second pass behind it (a whole pass, ~0.25 s on
two cores). This measures what that costs in words.

Each clip (the complete utterances of bench/data/eot_utterances.tsv, alternately Piper and
espeak-ng, with silence around) goes through the VAD (Silero, as the session runs it) to find where
speech ends; Whisper (the embedded model, as the session runs it) then decodes it cut `d` seconds
before that end, for each `d`, and once cut 0.1 s after it (the reference: what the pause pass
that queues behind sees). The peer is that reference: a cut clip "agrees" when its normalised text
equals it; word error rate against the text that was said is printed for both.

    python bench/asr_cut.py [--clips N] [--json bench/results/asr_cut.json]

Writes a PNG beside the JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from speech import espeak_say, piper_say  # noqa: E402

from rejoinder.streaming.asr import ASR_RATE, WhisperASR  # noqa: E402
from rejoinder.streaming.asr_stream import StreamingASRConfig  # noqa: E402
from rejoinder.streaming.frames import AudioFrame  # noqa: E402
from rejoinder.streaming.text_metrics import normalize_text, word_error_rate  # noqa: E402
from rejoinder.streaming.vad import SpeechDetector, VADConfig  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "eot_utterances.tsv"
CUTS_S = (-0.05, 0.0, 0.02, 0.04, 0.06, 0.1, 0.15)  # negative: after the end (a pause pass at 0.05 s of silence)


def complete_utterances() -> list[str]:
    lines = [line for line in DATA.read_text().splitlines() if line and not line.startswith("#")]
    rows = [line.split("\t") for line in lines]
    return [r[2] for r in rows if r[0] == "complete"]


def vad_speech_end_s(x: np.ndarray) -> float:
    det = SpeechDetector(None, VADConfig(hangover_s=0.3))
    for k in range(0, x.size - 320, 320):
        det.process_frame(AudioFrame(x[k : k + 320], ASR_RATE, 1, k / ASR_RATE))
    return det.last_speech_end_s


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cuts = [c["cut_s"] for c in doc["cuts"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([c * 1000 for c in cuts], [100 * c["agree"] for c in doc["cuts"]], "o-",
            label="same words as the reference")
    ax.axvline(doc["tolerance_s"] * 1000, color="grey", ls="--", label="pause_cover_tolerance_s")
    ax.set_xlabel("audio cut this long before the VAD's speech end (ms)")
    ax.set_ylabel("% of clips")
    ax.set_ylim(0, 105)
    ax.set_title(f"Whisper on audio that stops short of the end ({doc['clips']} clips)")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips", type=int, default=0, help="first N utterances (0: all complete ones)")
    ap.add_argument("--json", type=Path, default=Path("bench/results/asr_cut.json"))
    args = ap.parse_args(argv)
    texts = complete_utterances()
    texts = texts[: args.clips] if args.clips > 0 else texts
    asr = WhisperASR()
    agree = {d: 0 for d in CUTS_S}
    agree_long = {d: 0 for d in CUTS_S}  # clips the session would adopt a short pass for
    long_min = StreamingASRConfig().pause_cover_min_speech_s
    n_long = 0
    wer: dict[float, list[float]] = {d: [] for d in CUTS_S}
    ref_wer: list[float] = []
    rows = []
    for i, said in enumerate(texts):
        voice = espeak_say if i % 2 else piper_say
        x = np.asarray(voice(said), np.float32)
        x = np.concatenate([np.zeros(ASR_RATE // 5, np.float32), x, np.zeros(ASR_RATE // 2, np.float32)])
        end = vad_speech_end_s(x)
        ref = asr.transcribe(x[: int((end + 0.1) * ASR_RATE)]).text
        ref_wer.append(word_error_rate(said, ref))
        n_long += end >= long_min
        row = {"said": said, "voice": voice.__name__, "speech_end_s": end, "reference": ref, "cut": {}}
        for d in CUTS_S:
            got = asr.transcribe(x[: int((end - d) * ASR_RATE)]).text
            agree[d] += normalize_text(got) == normalize_text(ref)
            agree_long[d] += end >= long_min and normalize_text(got) == normalize_text(ref)
            wer[d].append(word_error_rate(said, got))
            row["cut"][str(d)] = got
        rows.append(row)
        print(f"[{i + 1}/{len(texts)}] {said[:40]!r:44s} " + " ".join(
            "=" if normalize_text(row["cut"][str(d)]) == normalize_text(ref) else "x" for d in CUTS_S), flush=True)
    n = len(texts)
    tol = StreamingASRConfig().pause_cover_tolerance_s
    doc = {"clips": n, "tolerance_s": tol, "reference_wer": float(np.mean(ref_wer)), "long_min_speech_s": long_min,
           "long_clips": n_long,
           "cuts": [{"cut_s": d, "agree": agree[d] / n, "agree_count": agree[d], "wer": float(np.mean(wer[d])),
                     "agree_long_count": agree_long[d]} for d in CUTS_S], "rows": rows}
    print(f"reference (cut 0.1 s after the VAD's end): WER {doc['reference_wer']:.3f}")
    for c in doc["cuts"]:
        print(f"cut {c['cut_s'] * 1000:4.0f} ms before the end: same words {c['agree_count']}/{n} "
              f"({100 * c['agree']:.0f} %), WER {c['wer']:.3f}; speech >= {long_min:g} s: "
              f"{c['agree_long_count']}/{n_long}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1))
    plot(doc, args.json.with_suffix(".png"))
    print(f"wrote {args.json} and {args.json.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
