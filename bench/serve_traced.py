"""`rejoinder serve` with its memory watched: where does a long-running server's memory go?

    python bench/serve_traced.py OUT.jsonl [--every 60] [--frames 6] -- serve <flags>

Runs the CLI in this process (`rejoinder.agent.cli.main`) and, from a sampler thread, appends one
JSON line to OUT every `--every` seconds:
  rss_mib                   the process's resident set (/proc/self/statm)
  heap                      glibc's own view (mallinfo2): `in_use_mib` (malloc'd and not freed, all
                            arenas), `free_mib` (held by the allocator but free: fragmentation or
                            caching), `mmap_mib` (large blocks mapped directly), `arenas`
  traced_mib, top           what tracemalloc sees (Python objects, numpy buffers): the total, and the
                            lines whose allocations grew most since the first sample (with a short
                            traceback for the first few)
  types                     live gc-tracked objects of each type that grew most since the first sample
tracemalloc starts on SIGUSR1 (send it after the warm-up: tracing model loading and imports would
slow them several-fold and only shows memory that stays anyway); the growth baselines are reset then.
On SIGUSR2 it calls glibc's malloc_trim(0) and writes a line with the RSS before and after: memory that
comes back then was free heap the allocator kept (fragmentation), not a leak. bench/load.py --soak
--trace launches the server through this file.
"""
from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import signal
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

from rejoinder.agent.heap import stats as heap_stats
from rejoinder.agent.heap import trim as heap_trim

MIB = 1024 * 1024


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def heap() -> dict[str, float]:
    st = heap_stats()
    if st is None:  # glibc < 2.33
        return {}
    return {"in_use_mib": st.in_use / MIB, "free_mib": st.free / MIB, "mmap_mib": st.mmapped / MIB,
            "arena_mib": st.arena / MIB}


def malloc_trim() -> dict[str, float]:
    before = rss_mib()
    heap_trim()
    return {"rss_before_trim_mib": before, "rss_after_trim_mib": rss_mib()}


def type_counts() -> collections.Counter:
    return collections.Counter(type(o).__qualname__ for o in gc.get_objects())


class Sampler:
    def __init__(self, out: Path, every: float, frames: int) -> None:
        self.out, self.every, self.frames = out, every, frames
        self.stop = threading.Event()
        self.first: tracemalloc.Snapshot | None = None
        self.first_types: collections.Counter | None = None
        self.t0 = time.monotonic()
        self.lock = threading.Lock()

    def write(self, row: dict[str, Any]) -> None:
        row = {"t": time.monotonic() - self.t0, "at": time.monotonic(), **row}
        with self.lock, open(self.out, "a") as f:
            f.write(json.dumps(row) + "\n")

    def sample(self) -> None:
        row: dict[str, Any] = {"rss_mib": rss_mib(), "heap": heap(), "threads": threading.active_count()}
        types = type_counts()
        if self.first_types is None:
            self.first_types = types
        grew = {k: types[k] - self.first_types.get(k, 0) for k in types}
        row["types"] = dict(sorted(((k, v) for k, v in grew.items() if v > 0), key=lambda kv: -kv[1])[:15])
        row["objects"] = sum(types.values())
        if tracemalloc.is_tracing():
            snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
            row["traced_mib"] = tracemalloc.get_traced_memory()[0] / MIB
            if self.first is None:
                self.first = snap
            diff = snap.compare_to(self.first, "traceback")
            row["top"] = [{"kib": d.size_diff / 1024, "count": d.count_diff,
                           "where": d.traceback.format()[-8:] if i < 4 else str(d.traceback[0])}
                          for i, d in enumerate(diff[:12])]
        self.write(row)

    def start_tracing(self) -> None:
        """From now on: Python allocations traced, and growth measured against the next sample."""
        with self.lock:
            self.first, self.first_types = None, None
        tracemalloc.start(self.frames)
        self.write({"tracing": True})

    def run(self) -> None:
        while not self.stop.wait(self.every):
            try:
                self.sample()
            except Exception as exc:  # noqa: BLE001 - the sampler must never take the server down
                self.write({"sampler_error": repr(exc)})


def main() -> int:
    argv = sys.argv[1:]
    if "--" not in argv:
        raise SystemExit("usage: serve_traced.py OUT.jsonl [options] -- serve <flags>")
    cut = argv.index("--")
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--every", type=float, default=60.0)
    ap.add_argument("--frames", type=int, default=6)
    args = ap.parse_args(argv[:cut])
    sampler = Sampler(Path(args.out), args.every, args.frames)
    signal.signal(signal.SIGUSR1, lambda *_: sampler.start_tracing())
    signal.signal(signal.SIGUSR2, lambda *_: sampler.write({"trim": malloc_trim()}))
    thread = threading.Thread(target=sampler.run, name="rejoinder-bench-memory-sampler", daemon=True)
    thread.start()
    from rejoinder.agent.cli import main as cli_main

    try:
        return cli_main(argv[cut + 1:])
    finally:
        sampler.stop.set()
        thread.join(5)


if __name__ == "__main__":
    sys.exit(main())
