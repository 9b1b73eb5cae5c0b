"""Weight-only quantised linear layers for decode: ``y = x @ W^T`` with W kept packed.

At batch 1 a decoder step is a chain of matrix-vector products whose cost is reading the weights,
so weights stay in 4 or 8 bits in GPU memory and are dequantised in registers, inside the GEMV
(the Q4/Q8 GGUF weights are never expanded to bf16).

Packed format (:class:`QuantizedWeight`), W logically [N, K] (N = out_features):

* ``bits=8``: ``qweight`` int8 [N, Kp]; ``scales`` [N, Kp/G]; ``mins`` None.
  ``W[n, k] = scales[n, k // G] * qweight[n, k]`` (symmetric).
* ``bits=4``: ``qweight`` uint8 [N, Kp/2], two 4-bit codes per byte; ``scales``, ``mins``
  [N, Kp/G]; ``W[n, k] = scales[n, g] * code + mins[n, g]`` with ``g = k // G``. Inside each group
  of G elements, byte ``j`` (0 <= j < G/2) holds element ``j`` in its low nibble and element
  ``j + G/2`` in its high nibble -- for G = 32 exactly GGUF's Q4_0/Q4_1 block layout, so GGUF data
  is repacked by copying bytes.

``G`` is ``group_size``; ``Kp`` is K rounded up to a multiple of G (the padding is zero codes and
meets zeros in x, so it never contributes). ``scales``/``mins`` are fp16 (GGUF's own precision)
or fp32. All arithmetic is fp32.

GGUF's Q8_0 / Q4_0 / Q4_1 blocks (their layout: :mod:`.ggml`) map losslessly: Q8_0 -> bits 8,
G 32; Q4_1 -> bits 4 with (scale, min) = (d, m); Q4_0 -> bits 4 with (scale, min) = (d, -8 d),
exact in fp32 arithmetic (-8 d is exact in fp16 unless it overflows, in which case the converter
stores fp32 scales).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from ._backend import Backend, gpu_config, sm_count, use_triton
from .ggml import BLOCK_BYTES, Q4_0, Q4_1, Q8_0, QK

__all__ = [
    "QuantizedWeight",
    "quantize_int8",
    "quantize_int4",
    "pack_q8_0_blocks",
    "pack_q4_0_blocks",
    "pack_q4_1_blocks",
    "quant_linear",
    "quant_linear_ref",
    "quant_linear_triton",
    "GEMV_BLOCK_M",
    "GEMV_MAX_ROWS",
]

#: Inputs with more rows than this use dequantise + cuBLAS matmul (prefill) instead of the GEMV.
GEMV_MAX_ROWS = 8
#: Rows of x (decode sequences of a batch) each GEMV program applies one dequantised weight tile to.
GEMV_BLOCK_M = 4


@dataclass(frozen=True)
class QuantizedWeight:
    """A packed [N, K] weight; see the module docstring for the exact layout."""

    qweight: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    bits: int
    group_size: int
    in_features: int

    def __post_init__(self) -> None:
        n = self.qweight.shape[0]
        per_byte = 2 if self.bits == 4 else 1
        kp = self.qweight.shape[1] * per_byte
        if self.bits not in (4, 8):
            raise ValueError("bits must be 4 or 8")
        if kp % self.group_size or self.scales.shape != (n, kp // self.group_size):
            raise ValueError(f"scales must be [{n}, {kp // self.group_size}], got {tuple(self.scales.shape)}")
        if (self.bits == 4) != (self.mins is not None):
            raise ValueError("int4 weights need mins; int8 weights have none")
        if self.bits == 4 and (self.group_size % 2 or self.qweight.dtype != torch.uint8):
            raise ValueError("int4 weights are uint8 with an even group size")
        if self.bits == 8 and self.qweight.dtype != torch.int8:
            raise ValueError("int8 weights are int8")
        if not 0 < self.in_features <= kp:
            raise ValueError("in_features out of range")

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def padded_in_features(self) -> int:
        return self.qweight.shape[1] * (2 if self.bits == 4 else 1)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def nbytes(self) -> int:
        """Bytes a GEMV reads for the weight (codes + scales + mins)."""
        extra = self.mins.numel() * self.mins.element_size() if self.mins is not None else 0
        return (self.qweight.numel() * self.qweight.element_size() + self.scales.numel() * self.scales.element_size()
                + extra)

    def to(self, device: torch.device | str) -> QuantizedWeight:
        return replace(
            self,
            qweight=self.qweight.to(device),
            scales=self.scales.to(device),
            mins=None if self.mins is None else self.mins.to(device),
        )

    def codes(self) -> torch.Tensor:
        """The integer codes as a [N, Kp] int16 tensor (int4 codes are 0..15)."""
        if self.bits == 8:
            return self.qweight.to(torch.int16)
        n, g = self.out_features, self.group_size
        b = self.qweight.view(n, -1, g // 2).to(torch.int16)
        return torch.cat([b & 0xF, b >> 4], dim=-1).reshape(n, -1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The [N, K] float weight (computed in fp32, then cast)."""
        n, g = self.out_features, self.group_size
        q = self.codes().float().view(n, -1, g)
        w = q * self.scales.float()[..., None]
        if self.mins is not None:
            w = w + self.mins.float()[..., None]
        return w.reshape(n, -1)[:, : self.in_features].to(dtype)


# --------------------------------------------------------------------------- packing


def _pad_k(w: torch.Tensor, group: int) -> torch.Tensor:
    pad = -w.shape[1] % group
    return F.pad(w, (0, pad)) if pad else w


def _pack_nibbles(codes: torch.Tensor, group: int) -> torch.Tensor:
    """[N, Kp] codes 0..15 -> [N, Kp/2] uint8 in the group-half nibble order."""
    n = codes.shape[0]
    c = codes.to(torch.uint8).view(n, -1, 2, group // 2)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, -1)


def quantize_int8(
    w: torch.Tensor,
    group_size: int | None = None,
    scale_dtype: torch.dtype = torch.float16,
) -> QuantizedWeight:
    """Symmetric int8 quantisation of a float [N, K] weight, one scale per row (``group_size``
    None) or per ``group_size`` elements along K."""
    n, k = w.shape
    group = k if group_size is None else int(group_size)
    wf = _pad_k(w.float(), group).view(n, -1, group)
    scales = (wf.abs().amax(dim=-1) / 127.0).to(scale_dtype)
    s = scales.float()[..., None]
    q = torch.where(s > 0, torch.round(wf / torch.where(s > 0, s, 1.0)), 0.0).clamp(-127, 127)
    return QuantizedWeight(q.to(torch.int8).view(n, -1), scales, None, 8, group, k)


def quantize_int4(w: torch.Tensor, group_size: int = 32, scale_dtype: torch.dtype = torch.float16) -> QuantizedWeight:
    """Asymmetric int4 quantisation (GGUF Q4_1 style: ``scale * q + min``, q in 0..15) of a float
    [N, K] weight in groups of ``group_size`` along K."""
    n, k = w.shape
    if group_size % 2:
        raise ValueError("group_size must be even")
    wf = _pad_k(w.float(), group_size).view(n, -1, group_size)
    lo, hi = wf.amin(dim=-1), wf.amax(dim=-1)
    mins = lo.to(scale_dtype)
    scales = ((hi - mins.float()) / 15.0).to(scale_dtype)
    # Quantise against the *stored* (rounded) scale and min so dequantisation is the best fit.
    s, m = scales.float()[..., None], mins.float()[..., None]
    q = torch.where(s > 0, torch.round((wf - m) / torch.where(s > 0, s, 1.0)), 0.0).clamp(0, 15)
    return QuantizedWeight(_pack_nibbles(q.view(n, -1), group_size), scales, mins, 4, group_size, k)


def _blocks(raw: torch.Tensor | np.ndarray, shape: tuple[int, int], block_bytes: int) -> torch.Tensor:
    n, k = shape
    if k % QK:
        raise ValueError(f"K={k} is not a multiple of the GGUF block size {QK}")
    t = torch.as_tensor(np.ascontiguousarray(raw)) if isinstance(raw, np.ndarray) else raw
    if t.dtype != torch.uint8:
        raise ValueError("raw GGUF data must be uint8")
    if t.numel() != n * (k // QK) * block_bytes:
        raise ValueError(f"expected {n * (k // QK) * block_bytes} bytes for shape {shape}, got {t.numel()}")
    return t.reshape(n, k // QK, block_bytes)


def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 field at byte offset ``at`` of every block -> [N, K/32] float16."""
    return blocks[..., at : at + 2].contiguous().view(torch.float16).squeeze(-1)


def pack_q8_0_blocks(raw: torch.Tensor | np.ndarray, shape: tuple[int, int]) -> QuantizedWeight:
    """GGUF Q8_0 data (uint8, N*K/32 blocks of 34 bytes) of a torch-order [N, K] weight."""
    b = _blocks(raw, shape, BLOCK_BYTES[Q8_0])
    q = b[..., 2:34].contiguous().view(torch.int8).reshape(shape[0], shape[1])
    return QuantizedWeight(q, _f16(b, 0), None, 8, QK, shape[1])


def pack_q4_1_blocks(raw: torch.Tensor | np.ndarray, shape: tuple[int, int]) -> QuantizedWeight:
    """GGUF Q4_1 data (uint8, N*K/32 blocks of 20 bytes) of a torch-order [N, K] weight."""
    b = _blocks(raw, shape, BLOCK_BYTES[Q4_1])
    qs = b[..., 4:20].reshape(shape[0], shape[1] // 2).contiguous()
    return QuantizedWeight(qs, _f16(b, 0), _f16(b, 2), 4, QK, shape[1])


def pack_q4_0_blocks(raw: torch.Tensor | np.ndarray, shape: tuple[int, int]) -> QuantizedWeight:
    """GGUF Q4_0 data (uint8, N*K/32 blocks of 18 bytes) of a torch-order [N, K] weight."""
    b = _blocks(raw, shape, BLOCK_BYTES[Q4_0])
    qs = b[..., 2:18].reshape(shape[0], shape[1] // 2).contiguous()
    d = _f16(b, 0)
    mins = d * -8.0  # exact in fp16 unless it overflows
    if not bool(torch.isfinite(mins).all()):  # load-time check; never on the decode path
        d, mins = d.float(), d.float() * -8.0
    return QuantizedWeight(qs, d, mins, 4, QK, shape[1])


# --------------------------------------------------------------------------- matmul


def quant_linear_ref(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Torch twin: dequantise to fp32, ``x @ W^T (+ bias)`` in fp32, result in x.dtype."""
    y = x.float() @ qw.dequantize(torch.float32).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def _gemv_plan(m_tiles: int, n: int, kp: int, block_n: int, block_k: int, device: torch.device) -> tuple[int, int]:
    """(split_k, k_per_split): enough programs to cover the GPU ~4 times."""
    k_tiles = -(-kp // block_k)
    n_tiles = -(-n // block_n)
    split = max(1, min(k_tiles, -(-4 * sm_count(device) // (n_tiles * m_tiles))))
    per = -(-k_tiles // split)
    return -(-k_tiles // per), per * block_k


def quant_linear_triton(
    x: torch.Tensor,
    qw: QuantizedWeight,
    bias: torch.Tensor | None = None,
    *,
    block_n: int | None = None,
    block_k: int | None = None,
    split_k: int | None = None,
    block_m: int | None = None,
) -> torch.Tensor:
    """Triton GEMV for x [..., K] with few rows (<= GEMV_MAX_ROWS: a batch of decode sequences,
    up to GEMV_BLOCK_M of them served by each weight tile read); more rows fall back to
    dequantise + ``F.linear`` in x.dtype. Block sizes / split are overridable for tuning."""
    from . import _quant_matmul_triton as kern

    k = x.shape[-1]
    if k != qw.in_features:
        raise ValueError(f"x has K={k}, weight expects {qw.in_features}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, n, kp, g = x2.shape[0], qw.out_features, qw.padded_in_features, qw.group_size
    if m > GEMV_MAX_ROWS:
        return F.linear(x, qw.dequantize(x.dtype), None if bias is None else bias.to(x.dtype))
    out_shape = (*x.shape[:-1], n)
    if m == 0:
        return x.new_empty(out_shape)
    on_gpu = gpu_config(x)
    block_n = block_n or (16 if on_gpu else 8)
    # A tile spans whole groups so each byte's group is (tile start / G + local index / (G/2)).
    if block_k is None:
        block_k = (256 if qw.bits == 4 else 128) if on_gpu else 64
        if qw.bits == 4:
            block_k = max(block_k, g)
    if qw.bits == 4 and not (_is_pow2(g) and g >= 2 and _is_pow2(block_k) and block_k % g == 0):
        raise ValueError(f"int4 GEMV needs a power-of-two group size dividing block_k ({g}, {block_k})")
    if qw.bits == 8 and not (g == kp or _is_pow2(g)):
        raise ValueError(f"int8 GEMV needs one group per row or a power-of-two group size, got {g}")
    block_m = block_m or min(GEMV_BLOCK_M, 1 << (m - 1).bit_length())
    m_tiles = -(-m // block_m)
    if split_k is None:
        split, per = _gemv_plan(m_tiles, n, kp, block_n, block_k, x.device)
    else:
        k_tiles = -(-kp // block_k)
        per = -(-k_tiles // split_k) * block_k  # K elements per split, whole tiles
        split = -(-kp // per)
    if split > 1:
        target = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    else:
        target = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (-(-n // block_n), m_tiles, split)
    common = dict(
        HAS_BIAS=bias is not None and split == 1,
        SPLIT=split > 1,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        BLOCK_M=block_m,
        num_warps=4,
        num_stages=3 if on_gpu else 1,
    )
    bias_arg = bias if bias is not None else target
    if qw.bits == 4:
        assert qw.mins is not None
        kern.qgemv_int4_kernel[grid](
            x2, qw.qweight, qw.scales, qw.mins, bias_arg, target,
            m, n, k, kp, per,
            x2.stride(0), qw.qweight.stride(0), qw.scales.stride(0),
            GROUP=g, **common,
        )
    else:
        # Elements sharing a scale within a tile: the group, or the whole tile when a group
        # spans several tiles (or the whole row).
        sub = block_k if g == kp or g >= block_k else g
        kern.qgemv_int8_kernel[grid](
            x2, qw.qweight, qw.scales, bias_arg, target,
            m, n, k, kp, per,
            x2.stride(0), qw.qweight.stride(0), qw.scales.stride(0),
            g, SUB=sub, **common,
        )
    if split > 1:
        y = target.sum(dim=0)
        if bias is not None:
            y = y + bias.float()
        target = y.to(x.dtype)
    return target.view(out_shape)


def quant_linear(
    x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None, *, backend: Backend | None = None
) -> torch.Tensor:
    """``x @ W^T (+ bias)`` for x [..., K] (fp32/fp16/bf16) and packed W [N, K] -> [..., N]."""
    if use_triton(x, qw.qweight, backend=backend):
        return quant_linear_triton(x, qw, bias)
    return quant_linear_ref(x, qw, bias)
