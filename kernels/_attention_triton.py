"""Triton kernels behind :mod:`rejoinder.kernels.attention` (imported lazily)."""

import triton
import triton.language as tl


@triton.jit
def decode_attn_split_kernel(
    q_ptr, k_ptr, v_ptr, len_ptr, row_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    sqb, sqh,
    skb, skh, sks,
    svb, svh, svs,
    D, qk_scale_log2,
    CHUNK,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr, NUM_SPLITS: tl.constexpr, DOT_PREC: tl.constexpr, CACHE_ROWS: tl.constexpr,
):
    # Grid (B, Hkv, NUM_SPLITS): one KV head, its GROUP query heads, one chunk of the KV length.
    b = tl.program_id(0).to(tl.int64)
    if CACHE_ROWS:  # query row b attends over its session's cache slot
        cb = tl.load(row_ptr + b).to(tl.int64)
    else:
        cb = b
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(len_ptr + b).to(tl.int32)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, seq_len)  # empty when the split lies past the sequence

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    gmask = g < GROUP
    dmask = d < D
    qh = kvh * GROUP + g
    q = tl.load(q_ptr + b * sqb + qh[:, None] * sqh + d[None, :], mask=gmask[:, None] & dmask[None, :], other=0.0)

    k_base = k_ptr + cb * skb + kvh.to(tl.int64) * skh
    v_base = v_ptr + cb * svb + kvh.to(tl.int64) * svh
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < end
        kt = tl.load(k_base + n[None, :].to(tl.int64) * sks + d[:, None], mask=dmask[:, None] & nmask[None, :],
                     other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale_log2  # [BLOCK_G, BLOCK_N], log2 domain
        s = tl.where(nmask[None, :], s, float("-inf"))
        # Each iteration has >= 1 valid column, so m_new is finite and exp2 never sees inf - inf.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + n[:, None].to(tl.int64) * svs + d[None, :], mask=nmask[:, None] & dmask[None, :],
                    other=0.0)
        # Probabilities go to V's dtype for the tensor-core product, as flash attention does.
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    safe_l = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / safe_l[:, None]
    omask = gmask[:, None] & dmask[None, :]
    if SPLIT:
        row = (b * (GROUP * tl.num_programs(1)) + qh) * NUM_SPLITS + split  # [B, Hq, S] index
        tl.store(part_out_ptr + row[:, None] * D + d[None, :], o, mask=omask)
        lse = tl.where(l_i > 0.0, m_i + tl.log2(safe_l), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=gmask)
    else:
        tl.store(out_ptr + b * sqb + qh[:, None] * sqh + d[None, :], o.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def decode_attn_merge_kernel(
    part_out_ptr, part_lse_ptr, out_ptr,
    sob, soh, D,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Grid (B, Hq): rescale each split's normalised output by its share of the total softmax mass.
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    row = b * tl.num_programs(1) + h
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    smask = s < NUM_SPLITS
    lse = tl.load(part_lse_ptr + row * NUM_SPLITS + s, mask=smask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    # Split 0 always holds position 0 (seq_len >= 1), so m is finite.
    w = tl.where(smask & (lse > float("-inf")), tl.exp2(lse - m), 0.0)
    o = tl.load(part_out_ptr + (row * NUM_SPLITS + s[:, None]) * D + d[None, :],
                mask=(w > 0.0)[:, None] & (d < D)[None, :], other=0.0)
    res = tl.sum(o * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + b * sob + h * soh + d, res.to(out_ptr.dtype.element_ty), mask=d < D)
