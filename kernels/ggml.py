"""GGML block types: the type ids, block sizes and the weight record the GGUF loader hands the kernels.

ggml stores a quantised matrix as rows of blocks of `QK` = 32 weights each (llama.cpp's layout,
exactly as a GGUF file holds it):

* Q8_0 (34 bytes): fp16 ``d``, 32 x int8 ``q``; value ``d * q``.
* Q4_0 (18 bytes): fp16 ``d``, 16 bytes of nibbles; value ``d * (q - 8)``.
* Q4_1 (20 bytes): fp16 ``d``, fp16 ``m``, 16 bytes of nibbles; value ``d * q + m``.

Blocks run row-major along K; in the 16 nibble bytes, byte j's low nibble is element j and its
high nibble element j + 16.

Plain data only (no ctypes, no kernels): the native CPU step (`cpu_native`), the Triton packers
(`quant_matmul`) and the engine's GGUF loader all read these names from here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# ggml type ids (the `ggml_type` enum; GGUF stores them per tensor)
F32, Q4_0, Q4_1, Q8_0 = 0, 2, 3, 8
QK = 32  # weights per block
BLOCK_BYTES = {Q4_0: 18, Q4_1: 20, Q8_0: 34}  # bytes per block of each block type


@dataclass(frozen=True)
class GGMLWeight:
    """A linear weight [rows, cols] (out x in) in a ggml layout: ``data`` is uint8
    [rows, row_bytes] for Q4_0 / Q4_1 / Q8_0 blocks, or float32 [rows, cols] for F32."""

    data: torch.Tensor
    type: int
    rows: int
    cols: int

    def __post_init__(self) -> None:
        if self.type == F32:
            ok = self.data.dtype == torch.float32 and tuple(self.data.shape) == (self.rows, self.cols)
        elif self.type in BLOCK_BYTES:
            ok = (
                self.cols % QK == 0
                and self.data.dtype == torch.uint8
                and tuple(self.data.shape) == (self.rows, self.cols // QK * BLOCK_BYTES[self.type])
            )
        else:
            raise ValueError(f"unsupported ggml type {self.type}")
        if not ok:
            raise ValueError(
                f"GGMLWeight data {tuple(self.data.shape)} {self.data.dtype} does not hold a "
                f"[{self.rows}, {self.cols}] weight of ggml type {self.type}"
            )
        if not self.data.is_contiguous() or self.data.device.type != "cpu":
            raise ValueError("GGMLWeight data must be a contiguous CPU tensor")

    @classmethod
    def dense(cls, w: torch.Tensor) -> GGMLWeight:
        """An fp32 matrix as an F32 weight (a contiguous float32 copy when it is not one already)."""
        w = w.detach().float().contiguous()
        return cls(w, F32, w.shape[0], w.shape[1])

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()
