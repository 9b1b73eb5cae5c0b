"""What runs new tokens through the model: one protocol, three implementations.

The `Engine` holds exactly one `Decoder` and calls nothing else for speed:

* `EagerDecoder` (here): the torch `Transformer` itself -- the reference and the baseline;
* `NativeDecoder` (`cpu_decoder.py`): the compiled C step on fp32 CPU models, GGUF blocks kept;
* `TritonDecoder` (`triton_decoder.py`): the fused Triton kernels in a CUDA graph.

Every decoder writes the K/V of the tokens it runs into the model's own static cache, so they
interleave freely with the eager model (which prefills the long prompts) and prefix reuse holds.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from .model import Transformer


@runtime_checkable
class Decoder(Protocol):
    """Runs tokens at positions ``pos, pos + 1, ...`` (the cache holds 0..pos-1) and returns the
    next-token logits [V] (float32) after the last one. The returned tensor may be a buffer that
    the next call overwrites: copy it to keep it."""

    name: str  # what Engine.backend reports: "native", "triton" or "eager"
    prefill_max: int  # prompts of up to this many new tokens go to `prefill`, longer ones to the eager model

    def step(self, token: int, pos: int) -> torch.Tensor: ...

    def prefill(self, tokens: Sequence[int], pos: int) -> torch.Tensor: ...


class EagerDecoder:
    """The torch model for every call (one forward each): what every other decoder must equal."""

    name = "eager"
    prefill_max = 0  # it is the eager model: long prompts come here anyway

    def __init__(self, model: Transformer):
        self.model = model
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def step(self, token: int, pos: int) -> torch.Tensor:
        return self.prefill([token], pos)

    @torch.inference_mode()
    def prefill(self, tokens: Sequence[int], pos: int) -> torch.Tensor:
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)
        return self.model(ids, pos, last_only=True)[0, -1]
