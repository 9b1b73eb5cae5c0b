"""Rotary position embedding fused with the KV-cache write.

Convention: Hugging Face "rotate_half" (the two halves of each head are the two components of
each rotated pair, NOT interleaved even/odd lanes)::

    x1, x2 = x[..., :D/2], x[..., D/2:]
    out = cat(x1 * cos - x2 * sin, x2 * cos + x1 * sin)

Tables: ``cos``/``sin`` of shape [max_seq, D/2] (or [max_seq, D] in HF's duplicated layout, of
which only the first half is read), any float dtype; row ``p`` holds the angles of position ``p``.

Layouts (for the engine): ``q`` [B, T, Hq, D], ``k``/``v`` [B, T, Hkv, D] (any strides, e.g. views
of a fused QKV projection); caches [B, Hkv, max_seq, D]. Token ``t`` of batch row ``b`` sits at
position ``input_pos[b] + t``; ``input_pos`` is an int32/int64 device tensor of shape [B] (or [1],
broadcast), so a captured CUDA graph replays with new positions without a host round trip.
With ``cache_rows`` (int device tensor [B]) the caches are [S, Hkv, max_seq, D] with one row per
session's cache slot, and batch row ``b`` writes cache row ``cache_rows[b]`` (distinct rows).
Positions are not bounds-checked on device (that would need a sync): the caller keeps
``input_pos + T <= max_seq``.

The rotation is computed in fp32 and rounded once to the output / cache dtype.
"""

from __future__ import annotations

import torch

from ._backend import Backend, next_pow2, use_triton

__all__ = ["rope_kv_write", "rope_kv_write_ref", "rope_kv_write_triton", "apply_rope_ref", "rope_tables"]


def rope_tables(
    max_seq: int,
    head_dim: int,
    theta: float = 10000.0,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    inv_freq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain (unscaled) RoPE tables ``cos, sin`` of shape [max_seq, head_dim/2].

    Pass ``inv_freq`` [head_dim/2] to use a scaled frequency set (Llama-3 style rope scaling is
    applied to ``inv_freq`` by the engine; the kernel only consumes the tables).
    """
    if inv_freq is None:
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    pos = torch.arange(max_seq, dtype=torch.float64)
    ang = torch.outer(pos, inv_freq.to(torch.float64).cpu())
    return ang.cos().to(device=device, dtype=dtype), ang.sin().to(device=device, dtype=dtype)


def _half_tables(cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    half = head_dim // 2
    if cos.shape[-1] == head_dim:
        cos, sin = cos[..., :half], sin[..., :half]
    if cos.shape[-1] != half or sin.shape != cos.shape or cos.dim() != 2:
        raise ValueError(f"cos/sin must be [max_seq, {half}] or [max_seq, {head_dim}]")
    return cos, sin


def _positions(input_pos: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """[B, T] absolute positions (int64)."""
    start = input_pos.reshape(-1).long()
    if start.numel() not in (1, batch):
        raise ValueError(f"input_pos must have 1 or {batch} entries, got {start.numel()}")
    return start.expand(batch)[:, None] + torch.arange(seq, device=input_pos.device)[None, :]


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, D] at positions pos [B, T] (fp32 math, result in x.dtype)."""
    d = x.shape[-1]
    cos, sin = _half_tables(cos, sin, d)
    c = cos.float()[pos][:, :, None, :]  # [B, T, 1, D/2]
    s = sin.float()[pos][:, :, None, :]
    xf = x.float()
    x1, x2 = xf[..., : d // 2], xf[..., d // 2 :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def rope_kv_write_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    input_pos: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch twin: rotates q and k, writes rotated k and v into the caches in place, returns q."""
    b, t = q.shape[:2]
    pos = _positions(input_pos, b, t)  # [B, T]
    q_rot = apply_rope_ref(q, cos, sin, pos)
    k_rot = apply_rope_ref(k, cos, sin, pos)
    rows = torch.arange(b, device=q.device) if cache_rows is None else cache_rows.reshape(-1).long()
    bidx = rows[:, None].expand(b, t)
    # Advanced indexing on (batch, seq) of a [B, H, S, D] cache: value shape [B, T, H, D].
    k_cache.permute(0, 2, 1, 3)[bidx, pos] = k_rot.to(k_cache.dtype)
    v_cache.permute(0, 2, 1, 3)[bidx, pos] = v.to(v_cache.dtype)
    return q_rot.contiguous()


def rope_kv_write_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    input_pos: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton launch of :func:`rope_kv_write_ref` (one launch for q, k and v)."""
    from . import _rope_triton as kern

    b, t, hq, d = q.shape
    hkv = k.shape[2]
    if k.shape != (b, t, hkv, d) or v.shape != k.shape:
        raise ValueError("k and v must be [B, T, Hkv, D] matching q [B, T, Hq, D]")
    if cache_rows is not None and cache_rows.numel() != b:
        raise ValueError(f"cache_rows must have one entry per batch row ({b})")
    if ((cache_rows is None and k_cache.shape[0] != b) or k_cache.shape[1] != hkv or k_cache.shape[3] != d
            or v_cache.shape != k_cache.shape):
        raise ValueError("caches must be [B, Hkv, max_seq, D] ([S, Hkv, max_seq, D] with cache_rows)")
    if d % 2:
        raise ValueError("head_dim must be even")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("caches need unit stride along head_dim")
    cos, sin = _half_tables(cos, sin, d)
    pos = input_pos.reshape(-1)
    q_out = torch.empty((b, t, hq, d), dtype=q.dtype, device=q.device)
    half = d // 2
    grid = (b * t, hq + hkv)
    if b * t:
        kern.rope_kv_kernel[grid](
            q, k, v, cos, sin, pos, pos if cache_rows is None else cache_rows.reshape(-1), k_cache, v_cache, q_out,
            *q.stride(), *k.stride(), *v.stride(),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            cos.stride(0), cos.stride(1),
            t, hq, half,
            POS_PER_ROW=pos.numel() != 1,
            CACHE_ROWS=cache_rows is not None,
            BLOCK=next_pow2(half),
            num_warps=1 if half <= 64 else 2,
        )
    return q_out


def rope_kv_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    input_pos: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_rows: torch.Tensor | None = None,
    *,
    backend: Backend | None = None,
) -> torch.Tensor:
    """Rotate q [B,T,Hq,D] and k [B,T,Hkv,D], write k and v into the [B,Hkv,S,D] caches at
    ``input_pos`` (in place; batch row b into cache row ``cache_rows[b]`` when given) and return the
    rotated q as a new contiguous [B,T,Hq,D] tensor."""
    if use_triton(q, k, v, cos, k_cache, input_pos, backend=backend):
        return rope_kv_write_triton(q, k, v, cos, sin, input_pos, k_cache, v_cache, cache_rows)
    return rope_kv_write_ref(q, k, v, cos, sin, input_pos, k_cache, v_cache, cache_rows)
