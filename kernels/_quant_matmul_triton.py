"""Triton GEMV kernels behind :mod:`rejoinder.kernels.quant_matmul` (imported lazily).

Grid (N tiles, M tiles, K splits). Each program streams a [BLOCK_N, BLOCK_K] slice of packed
weights, dequantises it in registers once, and applies it to BLOCK_M rows of x (a batch of decode
sequences), accumulating in fp32; with several K splits it writes an fp32 partial [SPLIT, M, N]
that the wrapper sums (deterministic, unlike atomics). Each row is computed exactly as it would be
with BLOCK_M = 1: its accumulator only ever receives its own products, in the same order.
"""

import triton
import triton.language as tl


@triton.jit
def qgemv_int4_kernel(
    x_ptr, q_ptr, s_ptr, m_ptr, bias_ptr, out_ptr,
    M, N, K, KP, K_PER_SPLIT,
    sxm, sqn, ssn,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # The tile is viewed as [BLOCK_N, NG groups, HALF bytes]: each byte holds element j (low
    # nibble) and j + HALF (high nibble) of its group. Codes are reduced per group first and
    # scaled once per group: y += s * sum(q * x) + m * sum(x), so scales/mins stay [BLOCK_N, NG]
    # in registers instead of being broadcast over the tile. The unpacked tile then serves each of
    # the BLOCK_M rows in turn; row i's partial sums live in acc[i].
    pid_n = tl.program_id(0)
    row0 = tl.program_id(1).to(tl.int64) * BLOCK_M
    pid_k = tl.program_id(2)
    HALF: tl.constexpr = GROUP // 2
    NG: tl.constexpr = BLOCK_K // GROUP
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    n64 = n.to(tl.int64)
    gi = tl.arange(0, NG)
    j = tl.arange(0, HALF)
    byte_off = gi[:, None] * HALF + j[None, :]   # [NG, HALF] byte within the tile
    elem_lo = gi[:, None] * GROUP + j[None, :]   # element of each low nibble (high: + HALF)
    mi = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N, NG], tl.float32)
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, KP)
    for k0 in range(k_begin, k_end, BLOCK_K):
        g_abs = k0 // GROUP + gi
        gmask = g_abs < KP // GROUP
        wmask = nmask[:, None, None] & gmask[None, :, None]
        packed = tl.load(q_ptr + n64[:, None, None] * sqn + (k0 // 2 + byte_off)[None, :, :], mask=wmask, other=0)
        lo = (packed & 0xF).to(tl.float32)
        hi = (packed >> 4).to(tl.float32)
        e_lo = k0 + elem_lo
        e_hi = e_lo + HALF
        smask = nmask[:, None] & gmask[None, :]
        sc = tl.load(s_ptr + n64[:, None] * ssn + g_abs[None, :], mask=smask, other=0.0).to(tl.float32)
        mn = tl.load(m_ptr + n64[:, None] * ssn + g_abs[None, :], mask=smask, other=0.0).to(tl.float32)
        for i in tl.static_range(BLOCK_M):
            row = tl.minimum(row0 + i, M - 1)  # rows past M repeat the last one; never stored
            x_lo = tl.load(x_ptr + row * sxm + e_lo, mask=e_lo < K, other=0.0).to(tl.float32)
            x_hi = tl.load(x_ptr + row * sxm + e_hi, mask=e_hi < K, other=0.0).to(tl.float32)
            dot = tl.sum(lo * x_lo[None, :, :] + hi * x_hi[None, :, :], axis=2)  # [BLOCK_N, NG]
            xsum = tl.sum(x_lo + x_hi, axis=1)                                   # [NG]
            part = sc * dot + mn * xsum[None, :]
            acc = tl.where((mi == i)[:, None, None], acc + part[None, :, :], acc)
    y = tl.sum(acc, axis=2)  # [BLOCK_M, BLOCK_N]
    rows = row0 + mi
    omask = (rows < M)[:, None] & nmask[None, :]
    if SPLIT:
        tl.store(out_ptr + (pid_k * M + rows)[:, None] * N + n64[None, :], y, mask=omask)
    else:
        if HAS_BIAS:
            y += tl.load(bias_ptr + n64, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows[:, None] * N + n64[None, :], y.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def qgemv_int8_kernel(
    x_ptr, q_ptr, s_ptr, bias_ptr, out_ptr,
    M, N, K, KP, K_PER_SPLIT,
    sxm, sqn, ssn,
    GROUP, SUB: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # The tile is viewed as [BLOCK_N, NSUB, SUB] where the SUB elements of a sub-block share one
    # scale (SUB = the group size, or BLOCK_K when groups are larger than a tile). The converted
    # tile serves each of the BLOCK_M rows in turn; row i's partial sums live in acc[i].
    pid_n = tl.program_id(0)
    row0 = tl.program_id(1).to(tl.int64) * BLOCK_M
    pid_k = tl.program_id(2)
    NSUB: tl.constexpr = BLOCK_K // SUB
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    n64 = n.to(tl.int64)
    si = tl.arange(0, NSUB)
    kk = si[:, None] * SUB + tl.arange(0, SUB)[None, :]  # [NSUB, SUB]
    mi = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N, NSUB], tl.float32)
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, KP)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k = k0 + kk
        wmask = nmask[:, None, None] & (k < KP)[None, :, :]
        q = tl.load(q_ptr + n64[:, None, None] * sqn + k[None, :, :], mask=wmask, other=0).to(tl.float32)
        sub_start = k0 + si * SUB
        sc = tl.load(s_ptr + n64[:, None] * ssn + (sub_start // GROUP)[None, :],
                     mask=nmask[:, None] & (sub_start < KP)[None, :], other=0.0).to(tl.float32)
        for i in tl.static_range(BLOCK_M):
            row = tl.minimum(row0 + i, M - 1)  # rows past M repeat the last one; never stored
            xv = tl.load(x_ptr + row * sxm + k, mask=k < K, other=0.0).to(tl.float32)
            dot = tl.sum(q * xv[None, :, :], axis=2)  # [BLOCK_N, NSUB]
            acc = tl.where((mi == i)[:, None, None], acc + (sc * dot)[None, :, :], acc)
    y = tl.sum(acc, axis=2)  # [BLOCK_M, BLOCK_N]
    rows = row0 + mi
    omask = (rows < M)[:, None] & nmask[None, :]
    if SPLIT:
        tl.store(out_ptr + (pid_k * M + rows)[:, None] * N + n64[None, :], y, mask=omask)
    else:
        if HAS_BIAS:
            y += tl.load(bias_ptr + n64, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows[:, None] * N + n64[None, :], y.to(out_ptr.dtype.element_ty), mask=omask)
