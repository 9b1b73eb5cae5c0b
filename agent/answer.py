"""One spoken answer in the making: engine tokens -> (tool-call filter) -> streamed TTS -> speech chunks.

An Answer produces chunks as fast as the engine and Piper allow and hands each to `on_chunk`; it
does not play anything itself (the session decides whether the chunks go to the playout buffer now,
later — a preemptive answer is held until the user's turn is really over — or never).

`cancel()` stops the engine (before its next token) and Piper (mid-clause) at once. What was
generated and synthesised so far stays readable, so an answer cut off by a false interruption can be
*continued*: `continuation()` makes a new Answer whose prompt is this one's prompt plus the tokens
already generated (the engine's prefix cache makes that free) and whose speech starts with the text
generated but not yet synthesised.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rejoinder.engine import Engine, SamplingParams, SlotKey, TokenStream
from rejoinder.engine.forced_call import forced_call
from rejoinder.streaming.streamed_tts import SpeechChunk, StreamedTTS, Synthesizer
from rejoinder.streaming.text_segmenter import SegmenterConfig

from .tools import ToolCall, ToolCallFilter

if TYPE_CHECKING:
    from .turns import UserTurn

log = logging.getLogger("rejoinder.agent.answer")

ChunkCallback = Callable[["Answer", SpeechChunk], None]


@dataclass(frozen=True)
class AnswerSpec:
    """Everything an answer needs besides the models."""

    prompt_ids: list[int]
    params: SamplingParams
    turn: int
    user_text: str = ""
    pending_text: str = ""  # speak this first (a continuation's unsynthesised text, or `say`)
    generate: bool = True  # False: speak pending_text only (no LLM)
    forced_tool: str = ""  # the answer is a call of this tool (engine.forced_call writes its arguments)
    tool_parameters: Mapping[str, Any] | None = None  # the forced tool's JSON-schema parameters
    filter_tools: bool = True


class Answer:
    def __init__(
        self,
        engine: Engine,
        tts: Synthesizer,
        spec: AnswerSpec,
        *,
        on_chunk: ChunkCallback | None = None,
        segmenter: SegmenterConfig | None = None,
        preemptive: bool = False,
        slot: SlotKey = None,
        synthesis_hold_s: float = 0.0,
    ) -> None:
        self.engine = engine
        # Decoding pauses up to this long while a piece is synthesised (0: never; StreamedTTS).
        self.synthesis_hold_s = synthesis_hold_s
        self.slot = slot  # the engine's KV-cache slot of the session it answers in
        self.prompt_reused = 0  # prompt tokens found in the slot's cache
        self.prompt_run = 0  # prompt tokens the model had to run (prefill)
        self.tts_engine = tts
        self.spec = spec
        self.on_chunk = on_chunk
        self.segmenter = segmenter
        self.preemptive = preemptive
        self.turn = spec.turn
        self.user_text = spec.user_text
        self.token_ids: list[int] = []  # generated (forced tokens included), in the engine's cache order
        self.chunks: list[SpeechChunk] = []
        self.filter = ToolCallFilter() if spec.filter_tools else None
        self.generation_done = not spec.generate  # the model stopped by itself (not cancelled)
        self.synthesis_done = False
        self.cancelled = False
        self.released = False  # the session lets the chunks play
        self.error: BaseException | None = None
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.first_sent_at: float | None = None  # set by the session when its first frame goes out
        # What travels with the answer through the session (declared here, never patched on):
        self.user_turn: UserTurn | None = None  # the user turn it answers (None: greeting, `say`)
        # A continuation after a false interruption, or the follow-up after a tool call, reports its
        # metrics (turn timings, tool names) through the answer that began the exchange.
        self.origin: Answer = self
        self.tool_names: list[str] = []  # tools called while making this exchange (on the origin)
        self.speculative = False  # prepared at a pause in speech, held until the turn is handed over
        self.created_at = time.monotonic()
        self.done = asyncio.Event()
        self._stream: TokenStream | None = None
        self._tts: StreamedTTS | None = None
        self._task: asyncio.Task | None = None

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> Answer:
        self._task = asyncio.get_running_loop().create_task(self._produce(), name=f"rejoinder-answer-{self.turn}")
        return self

    def cancel(self) -> None:
        """Stop generating and synthesising now (idempotent); chunks already made stay."""
        if self.cancelled or self.done.is_set():
            self.cancelled = True
            return
        self.cancelled = True
        if self._stream is not None:
            self._stream.cancel()
        if self._tts is not None:
            self._tts.cancel()
        if self._task is not None:
            self._task.cancel()

    async def wait(self) -> None:
        await self.done.wait()

    # --- what was made ---------------------------------------------------------------------------

    @property
    def tokens_per_s(self) -> float | None:
        """Decode speed: generated tokens after the first, over the time they took."""
        n = len(self.token_ids)
        if self.first_token_at is None or self.last_token_at is None or n < 3:
            return None
        span = self.last_token_at - self.first_token_at
        return (n - 1) / span if span > 0 else None

    @property
    def tts_metrics(self):
        return self._tts.metrics if self._tts is not None else None

    @property
    def speech_text(self) -> str:
        """Text handed to TTS so far (chunk offsets index into it)."""
        return self._tts.text if self._tts is not None else ""

    @property
    def synthesized_upto(self) -> int:
        return max((c.text_end for c in self.chunks), default=0)

    @property
    def tool_call(self) -> ToolCall | None:
        return self.filter.call() if self.filter is not None else None

    @property
    def complete(self) -> bool:
        """Nothing left to produce: the model finished and every word was synthesised."""
        return self.generation_done and self.synthesis_done

    def continuation(self) -> AnswerSpec | None:
        """What is left to say after a cancel, as a new answer's spec (None: nothing left)."""
        remaining = self.speech_text[self.synthesized_upto :]
        if self.generation_done and not remaining.strip():
            return None
        return AnswerSpec(
            prompt_ids=self.spec.prompt_ids + self.token_ids,
            params=self.spec.params,
            turn=self.turn,
            user_text=self.user_text,
            pending_text=remaining,
            generate=not self.generation_done,
            filter_tools=False,  # it was speech, not a call, or it would not have been spoken
        )

    # --- production ------------------------------------------------------------------------------

    async def _speech_deltas(self) -> AsyncIterator[str]:
        spec = self.spec
        if spec.pending_text:
            yield spec.pending_text
        if not spec.generate:
            return
        prompt = list(spec.prompt_ids)
        if spec.forced_tool:
            # A forced call is written for the model, argument by argument; the follow-up is a new answer.
            call = await forced_call(self.engine, prompt, {spec.forced_tool: spec.tool_parameters or {}},
                                     spec.forced_tool, spec.params, slot=self.slot)
            text = call.text()
            self.token_ids += self.engine.tokenizer.encode(text)
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
            out = self._filtered(text)
            if out:
                yield out
            self.generation_done = True
            return
        stream = self._stream = self.engine.stream(prompt, spec.params, slot=self.slot)
        try:
            async for ev in stream:
                if self.first_token_at is None:
                    self.first_token_at = ev.t
                    self.prompt_reused, self.prompt_run = stream.prompt_reuse()
                self.last_token_at = ev.t
                self.token_ids.append(ev.token_id)
                out = self._filtered(ev.text)
                if out:
                    yield out
                if self.filter is not None and self.filter.call_complete:
                    break  # the call is all we need; the follow-up is a new answer
            else:
                self.generation_done = not stream.cancelled
            if self.filter is not None and self.filter.call_complete:
                self.generation_done = True
            if self.filter is not None:
                tail = self.filter.finish()
                if tail:
                    yield tail
        finally:
            if not stream.cancelled and self.filter is not None and self.filter.call_complete:
                stream.cancel()
            elif self.cancelled:
                stream.cancel()

    def _hold_tokens(self, on: bool) -> None:
        if self._stream is not None and self.synthesis_hold_s > 0:
            self._stream.hold(self.synthesis_hold_s if on else 0.0)

    def _filtered(self, delta: str) -> str:
        return self.filter.push(delta) if self.filter is not None else delta

    async def _produce(self) -> None:
        tts = self._tts = StreamedTTS(self.tts_engine, segmenter=self.segmenter, synthesis_hold=self._hold_tokens)
        try:
            async for chunk in tts.run(self._speech_deltas()):
                if self.cancelled:
                    break
                self.chunks.append(chunk)
                if self.on_chunk is not None:
                    self.on_chunk(self, chunk)
            else:
                self.synthesis_done = not tts.cancelled
        except asyncio.CancelledError:
            self.cancelled = True
        except Exception as exc:  # surfaced to the session through .error; the turn still ends
            self.error = exc
            log.exception("answer for turn %d failed", self.turn)
        finally:
            if self._stream is not None and not self.generation_done:
                self._stream.cancel()
            self.done.set()
