"""Turning logits into the next token: greedy, or temperature / top-k / top-p with a seeded generator;
optionally never repeating a long run of tokens from given sequences (the previous answers).

The repetition guard is an n-gram block: with `avoid` holding the token ids of earlier assistant
answers, a token that would make the last `avoid_ngram` generated tokens equal a run found in one of
them is masked out before sampling. Small models (the embedded SmolLM2-135M) asked a follow-up
("…and what is it famous for?") often copy their previous answer word for word; shorter shared runs
("Paris is", "in the") stay allowed, so answers about the same subject can still name it. The guard
looks at the answer being generated only: the engine passes the tokens generated so far.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from rejoinder.errors import ConfigError

TokenRun = tuple[int, ...]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 256
    # Token sequences the answer must not copy (e.g. the previous assistant answers): no run of
    # `avoid_ngram` generated tokens may equal a run in one of them. Empty: no guard.
    avoid: tuple[TokenRun, ...] = ()
    avoid_ngram: int = 4

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.max_new_tokens < 1:
            raise ConfigError(f"invalid sampling parameters: {self}")
        if self.avoid_ngram < 1:
            raise ConfigError(f"avoid_ngram must be at least 1, not {self.avoid_ngram}")
        if not isinstance(self.avoid, tuple) or not all(
            isinstance(run, tuple) and all(isinstance(t, int) for t in run) for run in self.avoid
        ):
            raise ConfigError("avoid must be a tuple of token-id tuples")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@lru_cache(maxsize=64)
def _ngram_index(avoid: tuple[TokenRun, ...], n: int) -> dict[TokenRun, frozenset[int]]:
    """(n-1) leading tokens -> the tokens that followed them somewhere in `avoid`."""
    follow: dict[TokenRun, set[int]] = {}
    for run in avoid:
        for i in range(len(run) - n + 1):
            follow.setdefault(run[i : i + n - 1], set()).add(run[i + n - 1])
    return {k: frozenset(v) for k, v in follow.items()}


def banned_tokens(generated: Sequence[int], params: SamplingParams) -> frozenset[int]:
    """Tokens that, appended to `generated`, would repeat an `avoid_ngram`-run of `params.avoid`."""
    n = params.avoid_ngram
    if not params.avoid or len(generated) < n - 1:
        return frozenset()
    key = tuple(generated[len(generated) - (n - 1) :]) if n > 1 else ()
    return _ngram_index(params.avoid, n).get(key, frozenset())


def block_repeats(logits: Tensor, params: SamplingParams, generated: Sequence[int]) -> Tensor:
    """logits [B, V] with the tokens `banned_tokens` names masked to -inf (every row: one request's
    tokens). A ban that would leave nothing to sample is dropped (the model's choice stands)."""
    banned = banned_tokens(generated, params)
    if not banned:
        return logits
    idx = torch.tensor(sorted(banned), dtype=torch.long, device=logits.device)
    masked = logits.index_fill(-1, idx, float("-inf"))
    return torch.where(torch.isinf(masked).all(-1, keepdim=True), logits, masked)


def filtered_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """Probabilities over the vocabulary after temperature, top-k and top-p (nucleus) masking."""
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, idx = torch.sort(probs, dim=-1, descending=True)
        # keep the smallest set whose mass reaches top_p: drop a token if the mass before it already does
        drop = (sorted_p.cumsum(-1) - sorted_p) >= params.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(
    logits: Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    generated: Sequence[int] = (),
) -> Tensor:
    """logits [B, V] -> token ids [B]; `generated`: the tokens sampled so far (for `params.avoid`)."""
    logits = block_repeats(logits, params, generated)
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = filtered_probs(logits, params)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
