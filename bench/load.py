"""Load as callers hear it: N concurrent WebRTC callers against one `rejoinder serve`, and a soak.

`rejoinder serve` runs in its own process (loopback only: 127.0.0.1, ICE restricted to it,
`--max-sessions N`); each caller is its own process (this file with `--caller`), so callers do not
share one event loop or GIL with each other. A caller places calls back to back until the run's
deadline; each call is bench/webrtc_latency.measure_webrtc (tests/webrtc_client.RTCClient, aiortc):
the greeting, questions and one interruption synthesised by espeak-ng, what it heard recorded. Per N:
  voice-to-voice as heard (p50/p95): first audible answer frame - the caller's last spoken sample
  barge-in as heard (p50/p95): the caller's onset -> it stops hearing the agent
  intelligibility: the answer audio as heard, transcribed after the run by the embedded Whisper,
                   WER against the answer text the server's `metrics` event reports (what was played)
  503s (a caller found every slot taken; it waits 1 s and calls again), errors
  the server's RSS, threads and open fds, sampled every second (psutil, else /proc)

    python bench/load.py [--callers 1,2,4] [--duration 75] [--json bench/results/load.json]
    python bench/load.py --soak 10 [--call greeting|full] [--warmup 2] [--heap | --trace]
    python bench/load.py --soak 10 --from-json --json FILE      # re-summarise and re-plot a soak

`--soak MINUTES`: one caller, calls back to back against one server; the RSS slope after `--warmup`
minutes (least squares up to the last call's end, MiB/hour; DESIGN target < 5) and MiB per call,
errors. `--heap` runs the server through bench/serve_traced.py (glibc heap statistics, object counts
by type; a malloc_trim at the end tells fragmentation from a leak); `--trace` adds tracemalloc from
the end of the warm-up (which lines hold the growth; slows the server). Writes JSON + PNG
(bench/results/load_soak.* for a soak).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
from webrtc_latency import INTERRUPTIONS, QUESTIONS, measure_webrtc, pct, serve_process  # noqa: E402

MIB = 1024 * 1024
CALL_BOUND_S = 150.0  # no single call runs longer, whatever happens
BUSY_RETRY_S = 1.0
TRANSPORT_COUNTERS = ("speech_runs", "speech_holes", "late_frames", "clock_jumps", "dropped_out_frames", "max_in_queue",
                      "max_out_queue", "packets_lost", "frames_out_speech")
SPOKEN_PER_CALL = 5  # greeting, two answers, the long `say` that is interrupted, the answer to the interruption


# --- one caller (its own process) -------------------------------------------------------------------

async def greeting_call(url: str, source_address: str | None = None) -> dict[str, Any]:
    """Connect, hear the greeting to its end, hang up."""
    from webrtc_client import RTCClient

    client = RTCClient(url, source_address=source_address)
    await client.connect()
    try:
        ev = await client.wait_event(lambda e: e["type"] == "agent_speech" and not e["started"], 60)
        return {"greeting": ev.get("text"), "speech_frames": len(client.speech_frames())}
    finally:
        if client.resource:
            with contextlib.suppress(Exception):
                await client.hang_up()
        await client.close()


async def run_caller(url: str, until: float, index: int, out: Path, mode: str) -> None:
    from webrtc_client import SignallingError

    rows = out / f"caller{index}.jsonl"
    # Each caller is its own client, as N people would be: it signals from its own loopback address
    # (the server limits unconnected offers per address); media stays on 127.0.0.1 (ICE restricted).
    source = f"127.0.0.{index + 1}"
    k = 0
    while time.monotonic() < until - 3.0:  # no new call after the deadline; one under way finishes
        k += 1
        rec: dict[str, Any] = {"caller": index, "call": k, "started_at": time.monotonic()}
        try:
            if mode == "greeting":
                rec.update(await asyncio.wait_for(greeting_call(url, source), 90))
            else:
                qs = [QUESTIONS[(index + 2 * k + j) % len(QUESTIONS)] for j in range(2)]
                cut = INTERRUPTIONS[(index + k) % len(INTERRUPTIONS)]
                doc = await asyncio.wait_for(
                    measure_webrtc(url, questions=qs, interruptions=[cut], timeout_s=CALL_BOUND_S - 30.0,
                                   keep_audio=True, log=lambda *_: None, source_address=source), CALL_BOUND_S)
                for j, t in enumerate(doc["turns"]):
                    pcm = t.pop("answer_audio", None)
                    if pcm is not None and pcm.size:
                        path = out / f"answer_c{index}_{k}_{j}.npy"
                        np.save(path, pcm)
                        t["answer_audio_file"] = path.name
                # The server's counters of this call's outgoing audio: a speech run per spoken item
                # (greeting, 3 answers, the long `say`) when pacing holds up; more when speech broke up.
                rec.update(turns=doc["turns"], barge_ins=doc["barge_ins"],
                           transport={k: doc["server"].get(k) for k in TRANSPORT_COUNTERS})
        except SignallingError as exc:
            rec["status"] = exc.status
            rec["error"] = None if exc.status == 503 else str(exc)
            await asyncio.sleep(BUSY_RETRY_S)
        except Exception as exc:  # noqa: BLE001 - every failure is a result: counted, not fatal
            rec["error"] = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(BUSY_RETRY_S)
        rec["ended_at"] = time.monotonic()
        with open(rows, "a") as f:
            f.write(json.dumps(rec, default=float) + "\n")


# --- the server's resources ---------------------------------------------------------------------------

def proc_sample(pid: int) -> dict[str, float]:
    try:
        import psutil

        p = psutil.Process(pid)
        return {"rss_mib": p.memory_info().rss / MIB, "threads": p.num_threads(), "fds": p.num_fds()}
    except ImportError:
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB
        with open(f"/proc/{pid}/status") as f:
            threads = next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
        return {"rss_mib": rss, "threads": threads, "fds": len(os.listdir(f"/proc/{pid}/fd"))}


class Watch:
    """Samples the server process every `every` s in a thread; stop() ends it."""

    def __init__(self, every: float = 1.0) -> None:
        self.every = every
        self.samples: list[dict[str, float]] = []
        self.pid: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load-watch", daemon=True)

    def started(self, proc: subprocess.Popen) -> None:
        self.pid = proc.pid
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            with contextlib.suppress(Exception):  # the process may be exiting
                self.samples.append({"at": time.monotonic(), **proc_sample(self.pid)})

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def latest(self) -> dict[str, float]:
        return self.samples[-1] if self.samples else {}


def read_rows(out: Path) -> list[dict[str, Any]]:
    rows = []
    for p in sorted(out.glob("caller*.jsonl")):
        rows += [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return rows


def start_callers(url: str, n: int, until: float, out: Path, mode: str) -> list[subprocess.Popen]:
    log = open(out / "callers.log", "a")  # noqa: SIM115 - the children hold it; closed with the run
    procs = [subprocess.Popen([sys.executable, __file__, "--caller", url, "--until", str(until), "--index", str(i),
                               "--out", str(out), "--call", mode], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
             for i in range(n)]
    log.close()
    return procs


def wait_callers(procs: list[subprocess.Popen], until: float, out: Path, watch: Watch, label: str,
                 t0: float) -> None:
    """Print progress until every caller has exited; kill the ones that overrun the bound."""
    hard = until + CALL_BOUND_S + 30.0  # a call started just before the deadline, and process start-up
    while any(p.poll() is None for p in procs):
        if time.monotonic() > hard:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(5)
        rows = read_rows(out)
        s = watch.latest()
        print(f"  {label} t={time.monotonic() - t0:5.0f} s calls {len(rows)} "
              f"answers {sum(len(r.get('turns', [])) for r in rows)} "
              f"503s {sum(r.get('status') == 503 for r in rows)} errors {sum(bool(r.get('error')) for r in rows)}  "
              f"server rss {s.get('rss_mib', 0):.0f} MiB threads {s.get('threads', 0)} fds {s.get('fds', 0)}",
              flush=True)
    for p in procs:
        p.wait(10)


# --- a level: N callers -----------------------------------------------------------------------------

def transcribe_answers(rows: list[dict], out: Path) -> None:
    """WER of each answer as heard against the text the server says it played (Whisper, after the run)."""
    from rejoinder.streaming.asr import WhisperASR
    from rejoinder.streaming.audio import resample
    from rejoinder.streaming.text_metrics import word_error_rate

    todo = [t for r in rows for t in r.get("turns", []) if t.get("answer_audio_file") and t.get("answer")]
    if not todo:
        return
    asr = WhisperASR()
    for t in todo:
        pcm = np.load(out / t["answer_audio_file"]).astype(np.float32) / 32768.0
        heard = asr.transcribe(resample(pcm, 48_000, 16_000), word_timestamps=False).text
        t["answer_heard_text"] = heard
        t["answer_wer"] = word_error_rate(t["answer"], heard)


def summarise_level(rows: list[dict], samples: list[dict], duration: float) -> dict[str, Any]:
    turns = [t for r in rows for t in r.get("turns", [])]
    barges = [b for r in rows for b in r.get("barge_ins", [])]
    v2v = [t["heard_voice_to_voice_s"] for t in turns if t.get("heard_voice_to_voice_s") is not None]
    srv = [t["server_voice_to_voice_s"] for t in turns if t.get("server_voice_to_voice_s") is not None]
    bi = [b["heard_stop_after_onset_s"] for b in barges if b.get("heard_stop_after_onset_s") is not None]
    wer = [t["answer_wer"] for t in turns if t.get("answer_wer") is not None]
    errors = [r["error"] for r in rows if r.get("error")] + [t["error"] for t in turns if t.get("error")] + \
        [b["error"] for b in barges if b.get("error")]
    rss = [s["rss_mib"] for s in samples]
    tr = [r["transport"] for r in rows if r.get("transport")]
    runs = [t["speech_runs"] / SPOKEN_PER_CALL for t in tr if t.get("speech_runs") is not None]
    return {
        "speech_runs_per_spoken_item": float(np.mean(runs)) if runs else None,
        "speech_holes": sum(t.get("speech_holes") or 0 for t in tr),
        "late_frames": sum(t.get("late_frames") or 0 for t in tr),
        "dropped_out_frames": sum(t.get("dropped_out_frames") or 0 for t in tr),
        "clock_jumps": sum(t.get("clock_jumps") or 0 for t in tr),
        "max_in_queue": max((t.get("max_in_queue") or 0 for t in tr), default=None),
        "calls": sum(1 for r in rows if "status" not in r and not r.get("error")), "attempts": len(rows),
        "asked": len(turns), "answered_heard": len(v2v), "barge_ins": len(bi),
        "heard_v2v_p50_s": pct(v2v, 50), "heard_v2v_p95_s": pct(v2v, 95),
        "server_v2v_p50_s": pct(srv, 50), "server_v2v_p95_s": pct(srv, 95),
        "barge_in_heard_p50_s": pct(bi, 50), "barge_in_heard_p95_s": pct(bi, 95),
        "answer_wer_mean": float(np.mean(wer)) if wer else None, "answer_wer_p50": pct(wer, 50),
        "answers_intelligible": sum(w <= 0.25 for w in wer), "answers_transcribed": len(wer),
        "http_503": sum(r.get("status") == 503 for r in rows), "errors": len(errors),
        "error_kinds": sorted(set(errors)), "rss_start_mib": rss[0] if rss else None,
        "rss_end_mib": rss[-1] if rss else None,
        "rss_max_mib": max(rss) if rss else None,
        "threads_max": max((s["threads"] for s in samples), default=None),
        "fds_max": max((s["fds"] for s in samples), default=None), "duration_s": duration,
    }


def run_level(n: int, args: argparse.Namespace, results: Path) -> dict[str, Any]:
    out = results / f"load_work_n{n}"
    out.mkdir(parents=True, exist_ok=True)
    for p in out.iterdir():
        p.unlink()
    watch = Watch(1.0)
    print(f"N={n}: `rejoinder serve --max-sessions {n}` loading models…", flush=True)
    extra = ["--max-new-tokens", str(args.max_new_tokens)]
    with serve_process(extra=extra, max_sessions=n, log_path=out / "serve.log", started=watch.started) as url:
        t0 = time.monotonic()
        until = t0 + args.duration
        idle = watch.latest()
        procs = start_callers(url, n, until, out, args.call)
        wait_callers(procs, until, out, watch, f"N={n}", t0)
        watch.stop()
    rows = read_rows(out)
    print(f"N={n}: transcribing the answers heard (Whisper)…", flush=True)
    transcribe_answers(rows, out)
    samples = [{**s, "t": s["at"] - t0} for s in watch.samples]
    summary = summarise_level(rows, [s for s in samples if s["t"] >= 0], args.duration)
    summary["rss_idle_mib"] = idle.get("rss_mib")
    return {"n": n, "summary": summary, "calls": rows, "server_samples": samples}


# --- soak -------------------------------------------------------------------------------------------

def slope_mib_per_hour(samples: list[dict], after_s: float) -> float | None:
    pts = [(s["t"], s["rss_mib"]) for s in samples if s["t"] >= after_s]
    if len(pts) < 10:
        return None
    t, y = np.array(pts).T
    return float(np.polyfit(t, y, 1)[0] * 3600)


def soak_summary(rows: list[dict], samples: list[dict], *, minutes: float, call: str, warm: float,
                 trim: dict) -> dict[str, Any]:
    """The slope is fitted from the end of the warm-up to the end of the last call (the malloc_trim
    after it is reported apart)."""
    last = max((r["t_end"] for r in rows), default=0.0)
    during = [s for s in samples if s["t"] <= last + 1.0]
    slope = slope_mib_per_hour(during, warm)
    ends = [r["t_end"] for r in rows if r["t_end"] >= warm and not r.get("error")]
    per_call = None
    if len(ends) >= 2 and slope is not None:
        per_call = slope / 3600 * (ends[-1] - ends[0]) / (len(ends) - 1)
    errors = [r["error"] for r in rows if r.get("error")] + \
        [t["error"] for r in rows for t in r.get("turns", []) + r.get("barge_ins", []) if t.get("error")]
    return {"minutes": minutes, "call": call, "calls": len(rows), "warmup_s": warm,
            "rss_start_mib": during[0]["rss_mib"] if during else None,
            "rss_end_mib": during[-1]["rss_mib"] if during else None,
            "rss_max_mib": max((s["rss_mib"] for s in during), default=None),
            "slope_mib_per_hour": slope, "mib_per_call_after_warmup": per_call,
            "threads_start_end": [during[0]["threads"], during[-1]["threads"]] if during else None,
            "fds_start_end": [during[0]["fds"], during[-1]["fds"]] if during else None,
            "http_503": sum(r.get("status") == 503 for r in rows), "errors": len(errors),
            "error_kinds": sorted(set(errors)), "malloc_trim": trim}


def run_soak(args: argparse.Namespace, results: Path) -> dict[str, Any]:
    out = results / "load_work_soak"
    out.mkdir(parents=True, exist_ok=True)
    for p in out.iterdir():
        p.unlink()
    watch = Watch(2.0)
    launcher = None
    if args.trace or args.heap:
        launcher = [sys.executable, str(ROOT / "bench" / "serve_traced.py"), str(out / "memory.jsonl"),
                    "--every", "45", "--"]
    minutes = args.soak
    print(f"soak: {minutes:g} min of {args.call} calls, one caller; server loading models…", flush=True)
    extra = ["--max-new-tokens", str(args.max_new_tokens)]
    if args.heap_trim_s is not None:  # 0: the server never trims (how it ran before agent.heap)
        extra += ["--heap-trim-s", str(args.heap_trim_s)]
    trim: dict[str, Any] = {}
    with serve_process(extra=extra, max_sessions=1, log_path=out / "serve.log", started=watch.started,
                       launcher=launcher) as url:
        t0 = time.monotonic()
        until = t0 + minutes * 60
        procs = start_callers(url, 1, until, out, args.call)
        tracing = None
        if args.trace:  # tracemalloc from the end of the warm-up: growth after it is what matters
            tracing = threading.Timer(args.warmup * 60, os.kill, (watch.pid, signal.SIGUSR1))
            tracing.start()
        try:
            wait_callers(procs, until, out, watch, "soak", t0)
        finally:
            if tracing is not None:
                tracing.cancel()
        time.sleep(5)  # the last session's cleanup
        if args.trace or args.heap:
            os.kill(watch.pid, signal.SIGUSR2)  # malloc_trim(0): what comes back was free heap, not a leak
            time.sleep(3)
            lines = [json.loads(x) for x in (out / "memory.jsonl").read_text().splitlines()]
            trim = next((x["trim"] for x in reversed(lines) if "trim" in x), {})
        watch.stop()
    samples = [{**s, "t": s["at"] - t0} for s in watch.samples if s["at"] >= t0]
    rows = read_rows(out)
    for r in rows:
        r["t_end"] = r["ended_at"] - t0
    summary = soak_summary(rows, samples, minutes=minutes, call=args.call, warm=args.warmup * 60, trim=trim)
    summary["server_heap_trim_s"] = args.heap_trim_s  # None: the server's default
    doc = {"summary": summary, "calls": rows, "server_samples": samples}
    if args.trace or args.heap:
        doc["memory_trace"] = [json.loads(x) for x in (out / "memory.jsonl").read_text().splitlines()]
    return doc


# --- output -------------------------------------------------------------------------------------------

def plot_levels(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = doc["levels"]
    ns = [str(lv["n"]) for lv in levels]
    fig, ax = plt.subplots(1, 4, figsize=(19, 4.5))
    x = np.arange(len(ns))
    for off, key, lab in ((-0.2, "heard_v2v_p50_s", "v2v p50"), (0.0, "heard_v2v_p95_s", "v2v p95"),
                          (0.2, "barge_in_heard_p95_s", "barge-in p95")):
        ax[0].bar(x + off, [lv["summary"][key] or 0 for lv in levels], 0.2, label=lab)
    ax[0].set_xticks(x, ns)
    ax[0].set_xlabel("concurrent callers")
    ax[0].set_ylabel("as heard by the caller (s)")
    ax[0].axhline(0.7, color="r", ls="--", lw=0.8)
    ax[0].legend(fontsize=8)
    ax[1].bar(x - 0.15, [lv["summary"]["answer_wer_mean"] or 0 for lv in levels], 0.3, label="answer WER (mean)")
    ax[1].set_xticks(x, ns)
    ax[1].set_xlabel("concurrent callers")
    ax[1].set_ylabel("WER of the answers heard")
    ax1b = ax[1].twinx()
    ax1b.bar(x + 0.15, [lv["summary"]["http_503"] + lv["summary"]["errors"] for lv in levels], 0.3, color="C3",
             label="503s + errors")
    ax1b.set_ylabel("count")
    ax[1].legend(loc="upper left", fontsize=8)
    ax1b.legend(loc="upper right", fontsize=8)
    for lv in levels:
        s = lv["server_samples"]
        ax[2].plot([p["t"] for p in s], [p["rss_mib"] for p in s], label=f"N={lv['n']}")
        ax[3].plot([p["t"] for p in s], [p["threads"] for p in s], label=f"threads N={lv['n']}")
        ax[3].plot([p["t"] for p in s], [p["fds"] for p in s], ls=":", label=f"fds N={lv['n']}")
    ax[2].set_xlim(left=-2)  # from the callers' start: model loading is not the point here
    low = min((p["rss_mib"] for lv in levels for p in lv["server_samples"] if p["t"] >= 0), default=0)
    ax[2].set_ylim(bottom=low - 50)
    ax[3].set_xlim(left=-2)
    ax[2].set_xlabel("s since the callers started")
    ax[2].set_ylabel("server RSS (MiB)")
    ax[2].legend(fontsize=8)
    ax[3].set_xlabel("s since the callers started")
    ax[3].legend(fontsize=7)
    fig.suptitle(f"bench/load.py: N WebRTC callers against one rejoinder serve, loopback ({os.cpu_count()} CPUs)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_soak(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, su = doc["server_samples"], doc["summary"]
    fig, ax = plt.subplots(1, 2, figsize=(13, 4.5))
    t = np.array([p["t"] for p in s]) / 60
    ax[0].plot(t, [p["rss_mib"] for p in s], label="server RSS")
    last = max((r["t_end"] for r in doc["calls"]), default=0.0)
    pts = [(p["t"], p["rss_mib"]) for p in s if su["warmup_s"] <= p["t"] <= last + 1.0]
    if len(pts) >= 10:
        tt, yy = np.array(pts).T
        k, b = np.polyfit(tt, yy, 1)
        ax[0].plot(tt / 60, k * tt + b, "r--", label=f"fit after warm-up: {su['slope_mib_per_hour']:.1f} MiB/h")
    t0 = s[0]["at"] - s[0]["t"] if s else 0.0
    for r in doc["calls"]:  # each call's end
        ax[0].axvline((r["ended_at"] - t0) / 60, color="0.85", lw=0.5)
    ax[0].set_xlabel("minutes")
    ax[0].set_ylabel("MiB")
    ax[0].legend(fontsize=8)
    if doc.get("memory_trace"):
        m = [x for x in doc["memory_trace"] if "rss_mib" in x]
        tm = [x["t"] / 60 for x in m]
        h0 = m[0]["heap"].get("in_use_mib", 0) if m else 0
        ax[1].plot(tm, [x["heap"].get("in_use_mib", 0) - h0 for x in m], label="glibc heap in use (growth)")
        ax[1].plot(tm, [x["heap"].get("free_mib", 0) for x in m], label="glibc heap free (kept)")
        ax[1].plot(tm, [x.get("traced_mib", 0) for x in m], label="tracemalloc (Python, after warm-up)")
        ax[1].set_xlabel("minutes since the server started")
        ax[1].set_ylabel("MiB")
        ax[1].legend(fontsize=8)
    else:
        ax[1].plot(t, [p["threads"] for p in s], label="threads")
        ax[1].plot(t, [p["fds"] for p in s], label="fds")
        ax[1].legend(fontsize=8)
    fig.suptitle(f"bench/load.py --soak {su['minutes']:g}: {su['calls']} {su['call']} calls back to back")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--callers", default="1,2,4", help="comma-separated numbers of concurrent callers")
    ap.add_argument("--duration", type=float, default=75.0, help="seconds of calls per level")
    ap.add_argument("--json", default=None, help="default bench/results/load.json (load_soak.json for --soak)")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--heap-trim-s", type=float, default=None,
                    help="soak: the server's --heap-trim-s (default: its own default; 0: never trim)")
    ap.add_argument("--call", choices=("full", "greeting"), default="full",
                    help="full: greeting, 2 questions, an interruption; greeting: hear the greeting, hang up")
    ap.add_argument("--soak", type=float, default=None, metavar="MINUTES")
    ap.add_argument("--warmup", type=float, default=2.0, help="soak minutes left out of the slope fit")
    ap.add_argument("--trace", action="store_true", help="soak: tracemalloc + heap statistics in the server")
    ap.add_argument("--heap", action="store_true", help="soak: heap statistics and object counts, no tracemalloc")
    ap.add_argument("--from-json", action="store_true", help="measure nothing: re-summarise (soak) and re-plot --json")
    ap.add_argument("--caller", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--until", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.caller:
        asyncio.run(run_caller(args.caller, args.until, args.index, Path(args.out), args.call))
        return 0
    default = "bench/results/load_soak.json" if args.soak else "bench/results/load.json"
    path = Path(args.json or default)
    path.parent.mkdir(parents=True, exist_ok=True)
    (ROOT / "artifacts").mkdir(exist_ok=True)
    meta = {"cpus": os.cpu_count(), "load_average_start": os.getloadavg()}
    if args.soak and args.from_json:
        doc = json.loads(path.read_text())
        s0 = doc["summary"]
        t0 = doc["server_samples"][0]["at"] - doc["server_samples"][0]["t"]
        for r in doc["calls"]:
            r["t_end"] = r["ended_at"] - t0
        doc["summary"] = soak_summary(doc["calls"], doc["server_samples"], minutes=s0["minutes"], call=s0["call"],
                                      warm=args.warmup * 60, trim=s0["malloc_trim"])
    elif args.soak:
        doc = {**meta, **run_soak(args, ROOT / "artifacts")}
    if args.soak:
        path.write_text(json.dumps(doc, indent=1, default=float))
        plot_soak(doc, path.with_suffix(".png"))
        s = doc["summary"]
        print(f"soak: {s['calls']} calls in {s['minutes']:g} min; RSS {s['rss_start_mib']:.0f} -> "
              f"{s['rss_end_mib']:.0f} MiB; slope after {s['warmup_s'] / 60:g} min warm-up "
              f"{s['slope_mib_per_hour'] or float('nan'):.1f} MiB/hour "
              f"({s['mib_per_call_after_warmup'] or float('nan'):.2f} MiB/call); threads {s['threads_start_end']} "
              f"fds {s['fds_start_end']}; 503s {s['http_503']} errors {s['errors']} {s['error_kinds']}; "
              f"malloc_trim {s['malloc_trim']}")
    else:
        if args.from_json:
            doc = json.loads(path.read_text())
            levels = doc["levels"]
        else:
            levels = [run_level(int(n), args, ROOT / "artifacts") for n in args.callers.split(",")]
            doc = {**meta, "duration_s": args.duration, "levels": levels}
        path.write_text(json.dumps(doc, indent=1, default=float))
        plot_levels(doc, path.with_suffix(".png"))
        print("\n  N  calls  asked  v2v p50/p95 (s)  server v2v p50  barge-in p50/p95 (s)  WER mean  "
              "intelligible  503s  errors  RSS idle->max MiB  threads  fds  runs/item  clock jumps")

        def f(v: float | None) -> str:
            return "  -  " if v is None else f"{v:.2f}"

        for lv in levels:
            s = lv["summary"]
            print(f"  {lv['n']}  {s['calls']:5d}  {s['asked']:5d}  {f(s['heard_v2v_p50_s'])} / "
                  f"{f(s['heard_v2v_p95_s'])}      {f(s['server_v2v_p50_s'])}         {f(s['barge_in_heard_p50_s'])} / "
                  f"{f(s['barge_in_heard_p95_s'])}        {f(s['answer_wer_mean'])}     "
                  f"{s['answers_intelligible']}/{s['answers_transcribed']}       {s['http_503']:3d}  {s['errors']:5d}"
                  f"   {s['rss_idle_mib'] or 0:.0f} -> {s['rss_max_mib'] or 0:.0f}   {s['threads_max']}  "
                  f"{s['fds_max']}  {f(s.get('speech_runs_per_spoken_item'))}  {s.get('clock_jumps')}")
            for e in s["error_kinds"]:
                print(f"     error: {e}")
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
