"""One generation in flight: its prompt, its sampling parameters and generator, its tokens so far, its stats.

The scheduler (scheduler.py) runs many at once and hands each its own row of next-token logits;
everything that depends on one sequence alone -- which token is drawn, whether it stops, the text
it adds, its statistics -- happens here, so batching never mixes one sequence's state with
another's and a batched sequence draws exactly the tokens it would draw alone.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from .sampling import SamplingParams, sample

if TYPE_CHECKING:
    from .kv_slots import Slot, SlotKey
    from .tokenizer import ChatTokenizer


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    text: str  # the text this token completes (may be "" while a UTF-8 sequence is incomplete)
    index: int  # 0-based position among the generated tokens
    t: float  # time.monotonic() when the token was sampled


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens whose KV came from the cache
    prefill_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    ttft_s: float = 0.0  # request start -> first token sampled
    decode_s: float = 0.0
    finish_reason: str = ""  # "stop", "length", "cancelled"
    started_at: float = 0.0  # when the request was made (queueing behind other work counts)

    @property
    def decode_tok_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s > 0 else 0.0


class GenerationSink(Protocol):
    """Where a generation's output goes; called on the engine thread, so it must not block."""

    def token(self, event: TokenEvent) -> None: ...

    def finished(self, error: BaseException | None) -> None: ...


class Generation:
    """A generation: `ids` then up to `params.max_new_tokens` sampled tokens, in the slot of `key`."""

    def __init__(
        self,
        ids: Sequence[int],
        params: SamplingParams,
        key: SlotKey,
        sink: GenerationSink,
        tokenizer: ChatTokenizer,
        max_seq_len: int,
        device: torch.device,
        cancel: threading.Event | None = None,
    ) -> None:
        self.ids = list(ids)
        self.params = params
        self.key = key
        self.sink = sink
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.generator: torch.Generator | None = None  # its own, so other sequences never shift its draws
        if params.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed)
        self.stats = GenerationStats(prompt_tokens=len(self.ids), started_at=time.monotonic())
        self.generated: list[int] = []
        self.pending = -1  # the token sampled last, not yet run through the model
        self.slot: Slot | None = None  # set by the scheduler when it admits the sequence
        self.done = threading.Event()  # set when it has finished (just before its sink hears so)
        self._cancel = cancel
        self._abort = threading.Event()
        # Monotonic time until which the scheduler runs no decode step for it (`Scheduler.hold`).
        self.held_until = 0.0
        self._emitted = ""
        self._t_first = 0.0

    def cancelled(self) -> bool:
        return self._abort.is_set() or (self._cancel is not None and self._cancel.is_set())

    def abort(self) -> None:
        """Stop before the next forward pass (the consumer went away); the caller's event is left alone."""
        self._abort.set()

    def next_token(self, logits: torch.Tensor) -> int:
        """Draw this sequence's next token from its logits [V]: its own parameters, generator and
        repetition guard (`params.avoid`, reading the tokens generated so far)."""
        return int(sample(logits[None], self.params, self.generator, self.generated)[0])

    def advance(self, logits: torch.Tensor) -> bool:
        """Sample from the logits after the last token run, deliver the token; False once finished
        (`stats.finish_reason` says why), True while another decode step is due (`pending`)."""
        token = self.next_token(logits)
        now = time.monotonic()
        stats = self.stats
        if not self.generated:
            self._t_first = now
            stats.ttft_s = now - stats.started_at
        if token in self.tokenizer.stop_ids:
            return self.stop("stop", now)
        self.generated.append(token)
        stats.new_tokens = len(self.generated)
        text = self.tokenizer.decode(self.generated)
        delta = ""
        if not text.endswith("\ufffd"):  # hold back half a UTF-8 character
            delta, self._emitted = text[len(self._emitted):], text
        self.sink.token(TokenEvent(token, delta, len(self.generated) - 1, now))
        assert self.slot is not None
        if len(self.generated) >= self.params.max_new_tokens or len(self.slot.ids) + 1 >= self.max_seq_len:
            return self.stop("length")
        if self.cancelled():
            return self.stop("cancelled")
        self.pending = token
        return True

    def stop(self, reason: str, now: float | None = None) -> bool:
        self.stats.finish_reason = reason
        if self._t_first:
            self.stats.decode_s = (now or time.monotonic()) - self._t_first
        return False
