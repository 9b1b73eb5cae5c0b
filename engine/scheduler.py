"""Who runs on the model next? The engine thread, batching every session's decode steps together.

One thread owns the model and its KV-cache slots (kv_slots.py). Requests queue in arrival order:

* a `Generation` (generation.py) is admitted once its slot key is free: it takes its
  slot, prefills what the slot does not already hold, samples its first token and joins the
  running batch;
* a `Job` (a function: an end-of-turn score, a prefill, a reset) runs between two decode steps
  once its key is free.

Requests with the same key run in order, one at a time (they share a cache slot); different keys
interleave. Each turn of the loop admits what it can, then runs ONE decode step for all running
sequences together (`Runner.step_batch`: one pass over the weights for the whole batch), lets each
sequence sample its own token with its own parameters and generator, and retires those that
stopped, reached their length or were cancelled: continuous batching, sequences join and leave
between steps, and cancelling one never disturbs the others. A new sequence's prefill runs whole
between two steps, so it delays the running ones by that long (short for follow-ups, which reuse
their slot's prefix).

A running sequence can be *held* (`hold`): it keeps its slot and its place, but no step runs for it
until it is released or the hold runs out. A voice answer holds its generation while its first
audio is synthesised, so the synthesiser has the CPU when a listener is waiting for it.
"""
from __future__ import annotations

import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from rejoinder.errors import EngineError

from .generation import Generation
from .kv_slots import KVSlots, Slot, SlotKey

__all__ = ["ANY_TIME", "Job", "Runner", "Scheduler"]


class Runner(Protocol):
    """What the scheduler drives (the Engine)."""

    def prefill_slot(self, slot: Slot, ids: list[int], stats: Any) -> torch.Tensor: ...

    def step_batch(self, tokens: list[int], positions: list[int], slots: list[int]) -> torch.Tensor: ...


ANY_TIME = object()  # a job key: needs no slot and waits for nobody (reset, bookkeeping)


@dataclass(eq=False)
class Job:
    fn: Callable[[], Any]
    key: object  # a SlotKey, or ANY_TIME
    needs_slot: bool = True  # it will run the model in its key's slot
    future: Future = field(default_factory=Future)


class Scheduler:
    def __init__(self, runner: Runner, n_slots: int) -> None:
        self.runner = runner
        self.slots = KVSlots(n_slots)
        self._cond = threading.Condition()
        self._queue: deque[Job | Generation] = deque()
        self.running: list[Generation] = []  # decoding, in admission order (only the engine thread changes it)
        self._thread: threading.Thread | None = None
        self._thread_id: int | None = None
        self._closed = False
        self.batch_sizes: Counter[int] = Counter()  # decode steps run, by how many sequences shared them

    # --- any thread --------------------------------------------------------------------------------

    def submit(self, request: Job | Generation) -> None:
        with self._cond:
            if self._closed:
                raise EngineError("the engine is closed")
            self._queue.append(request)
            if self._thread is None:  # started on first use; it holds the scheduler weakly
                self._thread = threading.Thread(target=_work, args=(weakref.ref(self),), name="rejoinder-engine",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()

    def call(self, fn: Callable[[], Any], key: object, needs_slot: bool = True) -> Future:
        job = Job(fn, key, needs_slot)
        self.submit(job)
        return job.future

    def hold(self, seq: Generation, seconds: float) -> None:
        """Run no decode step for `seq` for up to `seconds` (or until `release`); 0 releases."""
        with self._cond:
            seq.held_until = time.monotonic() + seconds if seconds > 0 else 0.0
            self._cond.notify_all()

    def release(self, seq: Generation) -> None:
        self.hold(seq, 0.0)

    def on_engine_thread(self) -> bool:
        return threading.get_ident() == self._thread_id

    def close(self) -> None:
        """Cancel what is queued and running, stop the thread (after the request it is in)."""
        with self._cond:
            self._closed = True
            queued = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for request in queued:
            self._drop(request)
        thread = self._thread
        if thread is not None and not self.on_engine_thread():
            thread.join()

    # --- the engine thread ---------------------------------------------------------------------------

    def slot_for(self, key: SlotKey) -> Slot:
        """The key's slot for a model call made on the engine thread (inside a job)."""
        if any(seq.key == key for seq in self.running):
            raise EngineError(f"slot {key!r} is generating; queue the call with run_async(..., slot={key!r})")
        return self.slots.take(key)

    def _turn(self) -> bool:
        """Admit what can start, then one decode step for all running sequences. False: closed."""
        with self._cond:
            if not self._closed and not self._queue:
                if not self.running:
                    self._cond.wait(timeout=1.0)  # wakes now and then so a forgotten engine can be collected
                elif (wait := self._held_for()) > 0:
                    self._cond.wait(timeout=wait)  # every sequence is held: until the first hold ends
            if self._closed:
                return False
            budget = len(self._queue)  # what arrives meanwhile waits for the next turn: steps keep coming
        while budget > 0 and (request := self._next()) is not None:
            budget -= 1
            if isinstance(request, Job):
                self._run_job(request)
            else:
                self._admit(request)
        if self.running:
            self._step()
        return True

    def _held_for(self) -> float:
        """Seconds until the first running sequence may step (0: one may step now). Under the lock."""
        now = time.monotonic()
        return min(max(0.0, seq.held_until - now) for seq in self.running) if self.running else 0.0

    def _next(self) -> Job | Generation | None:
        """Pop the first request whose key is free (FIFO per key), or None."""
        with self._cond:
            blocked = {seq.key for seq in self.running}
            for request in self._queue:
                if request.key is ANY_TIME:
                    break
                if request.key in blocked:
                    continue
                if isinstance(request, Generation) or request.needs_slot:
                    if not self.slots.can_take(request.key):  # every slot is decoding
                        blocked.add(request.key)
                        continue
                break
            else:
                return None
            self._queue.remove(request)
            return request

    def _run_job(self, job: Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            job.future.set_result(job.fn())
        except BaseException as exc:  # delivered to the caller, not lost in the thread
            job.future.set_exception(exc)

    def _admit(self, seq: Generation) -> None:
        if seq.cancelled():
            seq.stop("cancelled")
            self._retire(seq)
            return
        try:
            seq.slot = self.slots.take(seq.key)
            seq.slot.busy = True
            logits = self.runner.prefill_slot(seq.slot, seq.ids, seq.stats)
            keep = seq.advance(logits)
        except BaseException as exc:
            self._retire(seq, exc)
            return
        if keep:
            self.running.append(seq)
        else:
            self._retire(seq)

    def _step(self) -> None:
        for seq in [s for s in self.running if s.cancelled()]:
            seq.stop("cancelled")
            self._retire(seq)
        now = time.monotonic()
        batch = [s for s in self.running if s.held_until <= now]
        if not batch:
            return
        self.batch_sizes[len(batch)] += 1
        slots = [seq.slot for seq in batch]
        try:
            logits = self.runner.step_batch([s.pending for s in batch], [len(s.ids) for s in slots],  # type: ignore[union-attr]
                                            [s.index for s in slots])  # type: ignore[union-attr]
        except BaseException as exc:
            for seq in batch:
                self._retire(seq, exc)
            return
        for seq, row in zip(batch, logits):
            seq.slot.ids.append(seq.pending)  # type: ignore[union-attr]
            try:
                if not seq.advance(row):
                    self._retire(seq)
            except BaseException as exc:
                self._retire(seq, exc)

    def _retire(self, seq: Generation, error: BaseException | None = None) -> None:
        if seq in self.running:
            self.running.remove(seq)
        if seq.slot is not None:
            seq.slot.busy = False
        if error is not None and not seq.stats.finish_reason:
            seq.stats.finish_reason = "error"
        seq.done.set()
        seq.sink.finished(error)

    def _drop(self, request: Job | Generation) -> None:
        if isinstance(request, Job):
            if request.future.set_running_or_notify_cancel():
                request.future.set_exception(EngineError("the engine is closed"))
        else:
            request.stop("cancelled")
            self._retire(request)

    def _shutdown(self) -> None:
        for seq in list(self.running):
            seq.stop("cancelled")
            self._retire(seq)


def _work(ref: weakref.ref[Scheduler]) -> None:
    scheduler = ref()
    if scheduler is None:
        return
    scheduler._thread_id = threading.get_ident()
    del scheduler
    while True:
        scheduler = ref()
        if scheduler is None:  # the engine was dropped without close()
            return
        if not scheduler._turn():
            scheduler._shutdown()
            return
        del scheduler
