"""What runs new tokens through the model: one protocol, three implementations.

The `Engine` holds exactly one `Decoder` and calls nothing else for speed:

* `EagerDecoder` (here): the torch `Transformer` itself -- the reference and the baseline;
* `NativeDecoder` (`cpu_decoder.py`): the compiled C step on fp32 CPU models, GGUF blocks kept;
* `TritonDecoder` (`triton_decoder.py`): the fused Triton kernels in a CUDA graph.

Every decoder writes the K/V of the tokens it runs into the model's own static cache, in the slot
it is told (one per session: kv_slots.py), so they interleave freely with the eager model (which
prefills the long prompts) and prefix reuse holds. `step_batch` runs one token for each of several
sequences, each at its own position in its own slot; a sequence's logits must not depend on what
else shares its batch beyond rounding (native: bit for bit).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from .model import Transformer


@runtime_checkable
class Decoder(Protocol):
    """Runs tokens at positions ``pos, pos + 1, ...`` of cache slot ``slot`` (which holds
    0..pos-1) and returns the next-token logits [V] (float32) after the last one. The returned
    tensor may be a buffer that the next call overwrites: copy it to keep it."""

    name: str  # what Engine.backend reports: "native", "triton" or "eager"
    prefill_max: int  # prompts of up to this many new tokens go to `prefill`, longer ones to the eager model
    max_batch: int  # the most sequences one `step_batch` takes (the cache's slot count)

    def step(self, token: int, pos: int, slot: int = 0) -> torch.Tensor: ...

    def step_batch(self, tokens: Sequence[int], positions: Sequence[int], slots: Sequence[int]) -> torch.Tensor:
        """One token for each of B sequences, distinct slots -> logits [B, V]."""
        ...

    def prefill(self, tokens: Sequence[int], pos: int, slot: int = 0) -> torch.Tensor: ...


class EagerDecoder:
    """The torch model for every call (one forward each): what every other decoder must equal.
    A batch is run one sequence after another (the model's forward takes one position for all rows)."""

    name = "eager"
    prefill_max = 0  # it is the eager model: long prompts come here anyway

    def __init__(self, model: Transformer):
        self.model = model
        self.device = next(model.parameters()).device
        cache = model.layers[0].attn.cache
        self.max_batch = 1 if cache is None else cache.k.shape[0]

    @torch.inference_mode()
    def step(self, token: int, pos: int, slot: int = 0) -> torch.Tensor:
        return self.prefill([token], pos, slot)

    @torch.inference_mode()
    def step_batch(self, tokens: Sequence[int], positions: Sequence[int], slots: Sequence[int]) -> torch.Tensor:
        return torch.stack([self.step(t, p, s) for t, p, s in zip(tokens, positions, slots)])

    @torch.inference_mode()
    def prefill(self, tokens: Sequence[int], pos: int, slot: int = 0) -> torch.Tensor:
        if not 0 <= slot < self.max_batch:
            raise ValueError(f"slot {slot} is not one of the cache's {self.max_batch}")
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)
        return self.model(ids, pos, last_only=True, slot=slot)[0, -1]
