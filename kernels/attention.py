"""Decode attention over the KV cache (flash-decoding).

One new query token per sequence attends over its whole cache. At batch 1 there are only
``n_kv_heads`` (b, head) pairs, far too few programs to fill a GPU, so the KV length is split
across programs ("flash-decoding"): stage 1 computes, per split, a partial softmax-weighted sum of
V and its log-sum-exp; stage 2 merges the splits. The split layout depends only on the cache's
static ``max_seq`` and the GPU, never on the current lengths (which live on the device), so one
launch configuration serves every step and the launch can sit in a CUDA graph.

GQA-aware: each stage-1 program owns one KV head and processes all ``Hq / Hkv`` query heads of
its group together, so each K/V tile is read from memory once per group, not once per query head.

Layouts: q [B, Hq, D]; k_cache, v_cache [B, Hkv, max_seq, D] (unit stride along D);
seq_lens [B] int32/int64 on the device = number of valid cache positions per row (the new token
included), 1 <= seq_len <= max_seq. Output [B, Hq, D] in q.dtype. Softmax in fp32.
Per-session caches: with ``cache_rows`` [B] (int, on the device) the caches are [S, Hkv, max_seq, D],
one row per session slot, and query row b attends over cache row ``cache_rows[b]`` -- B sessions at
B different lengths in one launch.
"""

from __future__ import annotations

import math

import torch

from ._backend import Backend, gpu_config, next_pow2, sm_count, use_triton

__all__ = ["decode_attention", "decode_attention_ref", "decode_attention_triton"]


def decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    cache_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch twin: masked softmax attention of one query token per row over the cache (fp32)."""
    if cache_rows is not None:
        rows = cache_rows.reshape(-1).long()
        k_cache, v_cache = k_cache[rows], v_cache[rows]
    b, hq, d = q.shape
    hkv, max_seq = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qf = q.float().view(b, hkv, group, d)
    scores = torch.einsum("bhgd,bhsd->bhgs", qf, k_cache.float()) * scale
    valid = torch.arange(max_seq, device=q.device)[None, :] < seq_lens.view(b, 1).to(q.device)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # Slots past the length may hold garbage (even NaN): zero them so 0 * NaN cannot leak in.
    v = v_cache.float().masked_fill(~valid[:, None, :, None], 0.0)
    out = torch.einsum("bhgs,bhsd->bhgd", probs, v)
    return out.reshape(b, hq, d).to(q.dtype)


def _plan(
    batch: int,
    hkv: int,
    max_seq: int,
    block_n: int,
    device: torch.device,
    num_splits: int | None,
) -> tuple[int, int]:
    """(num_splits, chunk): static split of [0, max_seq) into chunks that are multiples of block_n."""
    n_blocks = -(-max_seq // block_n)
    if num_splits is None:
        # About two waves of programs over the SMs; more splits only add merge work.
        num_splits = -(-2 * sm_count(device) // max(1, batch * hkv))
    num_splits = max(1, min(int(num_splits), n_blocks))
    chunk = -(-n_blocks // num_splits) * block_n
    return -(-max_seq // chunk), chunk


def decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    cache_rows: torch.Tensor | None = None,
    *,
    num_splits: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Triton launch of :func:`decode_attention_ref`.

    ``num_splits`` (static) overrides the split heuristic; ``block_n`` the KV tile length.
    """
    from . import _attention_triton as kern

    b, hq, d = q.shape
    _, hkv, max_seq, dk = k_cache.shape
    if cache_rows is not None and cache_rows.numel() != b:
        raise ValueError(f"cache_rows must have one entry per query row ({b})")
    if ((cache_rows is None and k_cache.shape[0] != b) or dk != d or v_cache.shape != k_cache.shape
            or hq % hkv):
        raise ValueError("expected q [B, Hq, D] and caches [B, Hkv, S, D] (any number of rows with cache_rows) "
                         "with Hq % Hkv == 0")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("q and the caches need unit stride along head_dim")
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    block_n = block_n or (64 if gpu_config(q) else 32)
    splits, chunk = _plan(b, hkv, max_seq, block_n, q.device, num_splits)
    # tl.dot needs M >= 16: pad the query group (padded rows are masked and never stored).
    block_g = max(16, next_pow2(group))
    block_d = max(16, next_pow2(d))
    out = torch.empty((b, hq, d), dtype=q.dtype, device=q.device)
    if splits > 1:
        part_out = torch.empty((b, hq, splits, d), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((b, hq, splits), dtype=torch.float32, device=q.device)
    else:
        part_out, part_lse = out, out  # unused: stage 1 writes the final result
    seq_lens = seq_lens.reshape(-1)
    rows = seq_lens if cache_rows is None else cache_rows.reshape(-1)
    dot_prec = "ieee" if q.dtype == torch.float32 else "tf32"
    kern.decode_attn_split_kernel[(b, hkv, splits)](
        q, k_cache, v_cache, seq_lens, rows, out, part_out, part_lse,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        d, scale * 1.4426950408889634,  # fold log2(e): the kernel uses exp2
        chunk,
        GROUP=group, BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=block_d,
        SPLIT=splits > 1, NUM_SPLITS=splits, DOT_PREC=dot_prec, CACHE_ROWS=cache_rows is not None,
        num_warps=4, num_stages=2 if gpu_config(q) else 1,
    )
    if splits > 1:
        kern.decode_attn_merge_kernel[(b, hq)](
            part_out, part_lse, out,
            out.stride(0), out.stride(1), d,
            NUM_SPLITS=splits, BLOCK_S=next_pow2(splits), BLOCK_D=block_d,
            num_warps=1 if block_d <= 64 else 2,
        )
    return out


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    cache_rows: torch.Tensor | None = None,
    *,
    num_splits: int | None = None,
    backend: Backend | None = None,
) -> torch.Tensor:
    """Attention of q [B,Hq,D] over caches [B,Hkv,S,D], first ``seq_lens[b]`` positions valid
    (over cache row ``cache_rows[b]`` of [S,Hkv,max_seq,D] caches when given)."""
    if use_triton(q, k_cache, v_cache, seq_lens, backend=backend):
        return decode_attention_triton(q, k_cache, v_cache, seq_lens, scale, cache_rows, num_splits=num_splits)
    return decode_attention_ref(q, k_cache, v_cache, seq_lens, scale, cache_rows)
