"""A generation seen from asyncio: an async iterator of tokens that `cancel()` or `aclose()` stop.

`Engine.stream` makes one; the engine thread feeds it (it is the generation's sink) through the
event loop's thread-safe callbacks, so the loop never blocks on the model.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from .generation import GenerationStats, TokenEvent

if TYPE_CHECKING:
    from .engine import Engine
    from .generation import Generation

_END = object()


class TokenStream:
    """An async iterator of TokenEvents, produced on the engine thread; `cancel()` or `aclose()` stop it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._cancel = threading.Event()
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._done: asyncio.Future = self._loop.create_future()
        self._generation: Generation | None = None  # set by Engine.stream once submitted

    @property
    def stats(self) -> GenerationStats | None:
        """This generation's statistics once it has finished (None before)."""
        gen = self._generation
        return gen.stats if gen is not None and gen.done.is_set() else None

    def prompt_reuse(self) -> tuple[int, int]:
        """(prompt tokens whose KV came from the slot's cache, prompt tokens run through the model).
        Final once the first token has arrived: the prefill is done before it is sampled."""
        gen = self._generation
        return (gen.stats.reused_tokens, gen.stats.prefill_tokens) if gen is not None else (0, 0)

    # --- the generation's sink (engine thread) ----------------------------------------------------

    def token(self, event: TokenEvent) -> None:
        self._post(event)

    def finished(self, error: BaseException | None) -> None:
        self._post(_END if error is None else error)
        if error is not None:
            self._post(_END)

    def _post(self, item: object) -> None:
        try:
            self._loop.call_soon_threadsafe(self._deliver, item)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening any more
            self._cancel.set()

    def _deliver(self, item: object) -> None:
        self._queue.put_nowait(item)
        if item is _END and not self._done.done():
            self._done.set_result(None)

    # --- the consumer (event loop) ----------------------------------------------------------------

    def cancel(self) -> None:
        self._cancel.set()

    def hold(self, seconds: float) -> None:
        """Pause decoding for up to `seconds` (tokens already made still arrive); 0 resumes. Before
        the generation has started, or after it ended, nothing to do."""
        if self._generation is not None:
            self.engine._scheduler.hold(self._generation, seconds)

    def release(self) -> None:
        self.hold(0.0)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self

    async def __anext__(self) -> TokenEvent:
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)  # iterating again ends again
            await self._done
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item  # type: ignore[return-value]

    async def aclose(self) -> None:
        """Cancel and wait until the engine thread has really stopped (at most one token later)."""
        self.cancel()
        await self._done

    async def text(self) -> str:
        return "".join([ev.text async for ev in self])
