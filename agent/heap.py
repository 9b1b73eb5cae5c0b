"""How does a process that serves call after call keep its memory flat?

Two things, both for `rejoinder serve` and LiveKit job processes (not for one-shot commands):

- `settle()` after the models are loaded: the collector stops walking the hundreds of thousands of
  objects that live as long as the process (`gc.freeze`), so its full passes come after a few
  calls' worth of new objects instead of ~100 calls' (a full pass waits until the objects added since
  the last one reach a quarter of those it kept): an ended call's reference cycles are freed soon.
- `HeapTrimmer`: after each call, and every `every_s` while calls run, glibc's `malloc_trim(0)` gives
  the free pages inside the allocator's arenas back to the system. A call allocates and frees audio
  frames, RTP packets, numpy buffers and decoder state from several threads; glibc keeps the freed
  pages, and as the arenas fragment the kept share creeps up (bench/load.py --soak --heap: the arenas
  grew 3.4 MiB in 25 minutes while the bytes in use stayed level, and one trim at the end gave back
  4.4 MiB, more than the resident set had grown). A trim takes 2-3 ms on a loaded server, in a worker
  thread. On a C library without `malloc_trim` (musl, macOS) it does nothing.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

log = logging.getLogger("rejoinder.agent.heap")

__all__ = ["HeapStats", "HeapTrimmer", "rss_bytes", "settle", "stats", "trim", "trimmer"]


def settle() -> None:
    """Freeze what is alive now (models, imports) out of the collector's full passes."""
    gc.collect()
    gc.freeze()
    gc.collect()


def _libc_fn(name: str) -> ctypes._CFuncPtr | None:
    """A function of the C library, or None where it has none (musl, macOS, glibc < 2.33 for mallinfo2)."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def _malloc_trim() -> ctypes._CFuncPtr | None:
    fn = _libc_fn("malloc_trim")
    if fn is not None:
        fn.argtypes = [ctypes.c_size_t]
        fn.restype = ctypes.c_int
    return fn


_TRIM = _malloc_trim()


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo2() -> ctypes._CFuncPtr | None:
    fn = _libc_fn("mallinfo2")
    if fn is not None:
        fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _mallinfo2()


@dataclass(frozen=True)
class HeapStats:
    """glibc's own view of its heap, in bytes (`stats()`)."""

    in_use: int  # malloc'd and not freed, every arena, mapped blocks included
    free: int  # held by the allocator but free (fragmentation, caching): what `trim` may give back
    mmapped: int  # large blocks mapped directly
    arena: int  # the arenas' size


def stats() -> HeapStats | None:
    """The heap as glibc sees it; None on another C library."""
    if _MALLINFO2 is None:
        return None
    m = _MALLINFO2()
    return HeapStats(in_use=m.uordblks + m.hblkhd, free=m.fordblks, mmapped=m.hblkhd, arena=m.arena)


def trim() -> bool:
    """Give the allocator's free pages back to the system; False where the C library cannot."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True


def rss_bytes() -> int:
    """The process's resident set (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class HeapTrimmer:
    """Trims the heap after each call (`call_ended()`) and every `every_s` seconds; owns its task."""

    def __init__(self, every_s: float) -> None:
        if every_s < 0 or every_s != every_s:
            raise ValueError(f"heap trim interval must be >= 0 seconds (0: never), not {every_s!r}")
        self.every_s = every_s
        self.trims = 0
        self.last_s = 0.0  # seconds the last trim took
        self._due = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.every_s > 0 and _TRIM is not None

    def call_ended(self) -> None:
        """A call's memory is garbage now: trim soon (the trimmer's task does it, off the event loop)."""
        self._due.set()

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="heap-trimmer")

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._due.wait(), self.every_s)
            self._due.clear()
            gc.collect()  # the ended call's cycles first, so their memory is free when trimmed
            t0 = time.perf_counter()
            await asyncio.to_thread(trim)
            self.last_s = time.perf_counter() - t0
            self.trims += 1
            log.debug("heap trimmed in %.1f ms; rss %.0f MiB", self.last_s * 1000, rss_bytes() / 2**20)


@contextlib.asynccontextmanager
async def trimmer(every_s: float) -> AsyncIterator[HeapTrimmer]:
    """A started `HeapTrimmer`, cancelled on exit."""
    t = HeapTrimmer(every_s)
    t.start()
    try:
        yield t
    finally:
        await t.aclose()
