"""agent.heap: a serving process gives the allocator's free pages back, after each call and on a timer."""
from __future__ import annotations

import asyncio
import ctypes
import platform
import time

import pytest

from rejoinder.agent import heap

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")


@glibc
def test_trim_gives_back_free_pages_the_allocator_kept():
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size, n = 96 * 1024, 320  # 30 MiB in blocks under glibc's mmap threshold: they come from the heap
    heap.trim()
    blocks = []
    for _ in range(n):
        p = libc.malloc(size)
        assert p
        ctypes.memset(p, 1, size)  # resident
        blocks.append(p)
    # Free every other block: each free one lies between two in use, so free() cannot hand it back
    # (only the heap's top can shrink); it stays resident until a trim.
    try:
        for p in blocks[::2]:
            libc.free(p)
        kept = heap.rss_bytes()
        st = heap.stats()
        if st is not None:  # glibc's own view: the freed blocks are free heap, not in use
            assert st.free >= 0.9 * size * n // 2
        assert heap.trim() is True
        given_back = kept - heap.rss_bytes()
    finally:
        for p in blocks[1::2]:
            libc.free(p)
    freed = size * n // 2
    assert given_back > 0.6 * freed, f"trim gave back {given_back / 2**20:.1f} MiB of {freed / 2**20:.0f} freed"


async def test_the_trimmer_trims_after_each_call_and_on_its_timer():
    async with heap.trimmer(3600.0) as t:
        assert t.enabled == (heap.trim() is True)
        if not t.enabled:
            pytest.skip("no malloc_trim in this C library")
        await asyncio.sleep(0.05)
        assert t.trims == 0  # nothing ended, the timer is an hour away
        for expected in (1, 2):
            t.call_ended()
            deadline = time.monotonic() + 10
            while t.trims < expected and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert t.trims == expected
        task = t._task
    assert task is not None and task.cancelled()  # owned: gone with the context
    async with heap.trimmer(0.05) as t:
        # The timer alone, no call ended. A trim of the test process's heap (models loaded by other
        # tests) can take a good part of a second on a loaded box: wait for two, boundedly.
        deadline = time.monotonic() + 20
        while t.trims < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert t.trims >= 2


async def test_a_zero_interval_never_trims_and_a_bad_one_is_refused():
    async with heap.trimmer(0.0) as t:
        t.call_ended()
        await asyncio.sleep(0.05)
        assert not t.enabled and t.trims == 0 and t._task is None
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="heap trim interval"):
            heap.HeapTrimmer(bad)
