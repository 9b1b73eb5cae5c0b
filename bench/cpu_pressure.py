"""Does the agent's voice stay whole when the CPU is saturated? One caller, busy-loop processes beside it.

Each variant starts `rejoinder serve` (its own process, loopback only), starts `--burners` processes that
spin at normal priority (as many as the box has cores: every core contested), and places calls back to
back for `--duration` seconds with one aiortc caller in its own process (bench/load.py's caller: a
greeting, two questions, one interruption, all spoken by espeak-ng). Per variant it reports what the
caller heard and what the server's sender saw:

  speech holes     the sender found no speech frame for a slot mid-answer and sent silence, speech
                   resuming within 0.2 s: a hole in a word (the defect this measures)
  late frames      speech frames that reached the sender after their slot (within its grace)
  dropped frames   frames the sender's queue threw away
  answer WER       each answer as heard (recorded by the caller, transcribed by Whisper after the run)
                   against the text the server says it played; "intelligible" is WER <= 0.25
  v2v / barge-in   as heard, p50 and p95 (latency may grow under load; speech must not break)

The variants differ in the sender's reserve (`--send-reserve-ms`: speech handed to the WebRTC track
ahead of its slot; 0 is the behaviour before it existed). Writes JSON + PNG.

    python bench/cpu_pressure.py [--reserves 0,60] [--burners 2] [--duration 90]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from load import Watch, read_rows, start_callers, summarise_level, transcribe_answers, wait_callers  # noqa: E402
from webrtc_latency import serve_process  # noqa: E402

BURN = "import time\nend = time.monotonic() + {s}\nwhile time.monotonic() < end:\n    pass\n"


def burners(n: int, seconds: float) -> list[subprocess.Popen]:
    """`n` processes spinning for at most `seconds` (bounded even if this script dies)."""
    return [subprocess.Popen([sys.executable, "-c", BURN.format(s=seconds)]) for _ in range(n)]


def run_variant(reserve_ms: int, n_burn: int, args: argparse.Namespace, results: Path) -> dict[str, Any]:
    out = results / f"cpu_pressure_work_r{reserve_ms}_b{n_burn}"
    out.mkdir(parents=True, exist_ok=True)
    for p in out.iterdir():
        p.unlink()
    watch = Watch(1.0)
    label = f"reserve {reserve_ms} ms, {n_burn} burner(s)"
    print(f"{label}: `rejoinder serve --send-reserve-ms {reserve_ms}` loading models…", flush=True)
    extra = ["--max-new-tokens", str(args.max_new_tokens), "--send-reserve-ms", str(reserve_ms)]
    with serve_process(extra=extra, max_sessions=1, log_path=out / "serve.log", started=watch.started) as url:
        t0 = time.monotonic()
        until = t0 + args.duration
        burn = burners(n_burn, args.duration + 200.0)
        load0 = os.getloadavg()[0]
        try:
            procs = start_callers(url, 1, until, out, "full")
            wait_callers(procs, until, out, watch, label, t0)
        finally:
            for b in burn:
                b.kill()
                b.wait(5)
        watch.stop()
    rows = read_rows(out)
    print(f"{label}: transcribing the answers heard (Whisper)…", flush=True)
    transcribe_answers(rows, out)
    summary = summarise_level(rows, [], args.duration)
    summary["load_average_start"] = load0
    calls = max(1, summary["calls"])
    summary["speech_holes_per_call"] = summary["speech_holes"] / calls
    return {"reserve_ms": reserve_ms, "burners": n_burn, "summary": summary, "calls": rows}


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vs = doc["variants"]
    labels = [f"reserve {v['reserve_ms']} ms\n{v['burners']} burner(s)" for v in vs]
    s = [v["summary"] for v in vs]
    fig, ax = plt.subplots(1, 3, figsize=(12, 4))
    ax[0].bar(labels, [x["speech_holes_per_call"] for x in s], color="tab:red")
    ax[0].set_title("holes mid-answer per call")
    ax[1].bar(labels, [(x["answers_intelligible"] / x["answers_transcribed"]) if x["answers_transcribed"] else 0
                       for x in s], color="tab:green")
    ax[1].set_ylim(0, 1.05)
    ax[1].set_title("answers heard intelligibly (WER <= 0.25)")
    ax[2].bar(labels, [x["heard_v2v_p50_s"] or 0 for x in s], color="tab:blue", label="v2v p50")
    ax[2].bar(labels, [x["barge_in_heard_p95_s"] or 0 for x in s], color="tab:orange", alpha=0.7,
              label="barge-in p95")
    ax[2].set_title("as heard (s)")
    ax[2].legend()
    for a in ax:
        a.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"agent audio under CPU saturation ({doc['cpus']} CPUs, {doc['duration_s']:.0f} s of calls each)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reserves", default="0,60", help="comma-separated --send-reserve-ms values")
    ap.add_argument("--burners", default=str(os.cpu_count() or 2), help="comma-separated busy-process counts")
    ap.add_argument("--duration", type=float, default=90.0, help="seconds of calls per variant")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "cpu_pressure.json"))
    args = ap.parse_args()
    results = Path(args.json).parent
    results.mkdir(parents=True, exist_ok=True)
    variants = [run_variant(int(r), int(b), args, results)
                for b in args.burners.split(",") for r in args.reserves.split(",")]
    doc = {"cpus": os.cpu_count(), "duration_s": args.duration, "variants": variants}
    Path(args.json).write_text(json.dumps(doc, indent=1, default=float))
    plot(doc, Path(args.json).with_suffix(".png"))
    print(f"\n{'variant':28} {'calls':>5} {'holes':>6} {'late':>6} {'drop':>5} {'WER':>6} {'intell':>7} "
          f"{'v2v p50':>8} {'p95':>6} {'barge p95':>9}")
    for v in variants:
        s = v["summary"]
        name = f"reserve {v['reserve_ms']} ms, {v['burners']} burner(s)"
        wer = s["answer_wer_mean"]
        heard = f"{s['answers_intelligible']}/{s['answers_transcribed']}"
        print(f"{name:28} {s['calls']:5d} {s['speech_holes']:6d} {s['late_frames']:6d} {s['dropped_out_frames']:5d} "
              f"{wer if wer is not None else float('nan'):6.3f} {heard:>7} "
              f"{s['heard_v2v_p50_s'] or float('nan'):8.2f} {s['heard_v2v_p95_s'] or float('nan'):6.2f} "
              f"{s['barge_in_heard_p95_s'] or float('nan'):9.2f}")
    base = next((v["summary"] for v in variants if v["reserve_ms"] == 0), None)
    for v in variants:
        s = v["summary"]
        if base is not None and v["reserve_ms"] != 0 and base["speech_holes_per_call"]:
            print(f"holes per call, reserve {v['reserve_ms']} ms / none: "
                  f"{s['speech_holes_per_call'] / base['speech_holes_per_call']:.2f}x")
    print(f"wrote {args.json} and {Path(args.json).with_suffix('.png')}")


if __name__ == "__main__":
    main()
