"""Turning logits into the next token: greedy, or temperature / top-k / top-p with a seeded generator;
optionally never repeating a run of tokens from given sequences (the previous answers).

The repetition guard (`RepetitionGuard`, on `SamplingParams.avoid`) is an n-gram block: a token that
would make the last `ngram` generated tokens equal a run found in one of its sequences is masked out
before sampling. Small models (the embedded SmolLM2-135M) asked a follow-up ("…and what is it famous
for?") often copy their previous answer word for word; shorter shared runs ("Paris is", "the Mona
Lisa") stay allowed, so an answer about the same subject can still name it (5 tokens: 4 masked
names like "Mona Lisa" after "The", and answered fewer follow-ups on bench/followups.py). Tokens
that continue a word (`exempt`: "ling" of " Row|ling") are never masked: a ban there would only
misspell the word ("Rowle"); the next word start is where it bites. The guard looks at the answer being generated
only: the engine passes the tokens generated so far.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from rejoinder.errors import ConfigError

if TYPE_CHECKING:
    from .tokenizer import ChatTokenizer

TokenRun = tuple[int, ...]


@dataclass(frozen=True)
class RepetitionGuard:
    """What an answer must not copy: no `ngram` tokens in a row from any of `runs`."""

    runs: tuple[TokenRun, ...] = ()
    ngram: int = 5
    exempt: frozenset[int] = frozenset()  # never masked (tokens that continue a word)

    def __post_init__(self) -> None:
        if self.ngram < 1:
            raise ConfigError(f"the repetition guard's ngram must be at least 1, not {self.ngram}")
        if not isinstance(self.runs, tuple) or not all(
            isinstance(run, tuple) and all(isinstance(t, int) for t in run) for run in self.runs
        ):
            raise ConfigError("the repetition guard's runs must be a tuple of token-id tuples")

    @classmethod
    def of_texts(cls, tokenizer: ChatTokenizer, texts: Iterable[str], ngram: int = 5) -> RepetitionGuard:
        """The guard against `texts` (e.g. the last answers), tokenised as an answer starts."""
        runs = tuple(tuple(tokenizer.encode(t)) for t in texts if t.strip())
        pieces = {i: tokenizer.decode([i]) for run in runs for i in run}
        exempt = frozenset(i for i, p in pieces.items() if p[:1].isalnum())  # no space before it: mid-word
        return cls(runs, ngram, exempt)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 256
    avoid: RepetitionGuard | None = None  # token runs the answer must not copy (the previous answers)

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.max_new_tokens < 1:
            raise ConfigError(f"invalid sampling parameters: {self}")
        if self.avoid is not None and not isinstance(self.avoid, RepetitionGuard):
            raise ConfigError(f"avoid must be a RepetitionGuard, not {type(self.avoid).__name__}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@lru_cache(maxsize=64)
def _ngram_index(guard: RepetitionGuard) -> dict[TokenRun, frozenset[int]]:
    """(n-1) leading tokens -> the tokens that followed them somewhere in the guard's runs."""
    n = guard.ngram
    follow: dict[TokenRun, set[int]] = {}
    for run in guard.runs:
        for i in range(len(run) - n + 1):
            if run[i + n - 1] not in guard.exempt:
                follow.setdefault(run[i : i + n - 1], set()).add(run[i + n - 1])
    return {k: frozenset(v) for k, v in follow.items()}


def banned_tokens(generated: Sequence[int], params: SamplingParams) -> frozenset[int]:
    """Tokens that, appended to `generated`, would copy an n-token run of `params.avoid`."""
    guard = params.avoid
    if guard is None or not guard.runs or len(generated) < guard.ngram - 1:
        return frozenset()
    n = guard.ngram
    key = tuple(generated[len(generated) - (n - 1) :]) if n > 1 else ()
    return _ngram_index(guard).get(key, frozenset())


def block_repeats(logits: Tensor, params: SamplingParams, generated: Sequence[int]) -> Tensor:
    """logits [B, V] with the tokens `banned_tokens` names masked to -inf (every row: one request's
    tokens); `logits` itself when nothing is banned (the usual step: no copy, no pass over V)."""
    banned = banned_tokens(generated, params)
    if not banned:
        return logits
    idx = torch.tensor(sorted(banned), dtype=torch.long, device=logits.device)
    return logits.clone().index_fill_(-1, idx, float("-inf"))


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
    """logits [B, V] -> token ids [B]; `generated`: the tokens sampled so far (for `params.avoid`).
    A ban that leaves nothing to choose is dropped (the model's own choice stands)."""
    masked = block_repeats(logits, params, generated)
    if params.greedy:
        token = masked.argmax(dim=-1)
        if masked is not logits and bool(torch.isneginf(masked.gather(-1, token[:, None])).any()):
            token = logits.argmax(dim=-1)
        return token
    probs = filtered_probs(masked, params)
    if masked is not logits and bool(torch.isnan(probs).any()):
        probs = filtered_probs(logits, params)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
