"""Triton GEMV kernels behind :mod:`rejoinder.kernels.quant_matmul` (imported lazily).

Grid (N tiles, M rows, K splits). Each program streams a [BLOCK_N, BLOCK_K] slice of packed
weights for one row of x, dequantises in registers and accumulates in fp32; with several K splits
it writes an fp32 partial [SPLIT, M, N] that the wrapper sums (deterministic, unlike atomics).
"""

import triton
import triton.language as tl


@triton.jit
def qgemv_int4_kernel(
    x_ptr, q_ptr, s_ptr, m_ptr, bias_ptr, out_ptr,
    M, N, K, KP, K_PER_SPLIT,
    sxm, sqn, ssn,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    pid_k = tl.program_id(2)
    HALF: tl.constexpr = GROUP // 2
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    n64 = n.to(tl.int64)
    j = tl.arange(0, BLOCK_K // 2)           # byte within the tile
    grp = j // HALF                           # group within the tile
    elem_lo = grp * GROUP + (j % HALF)        # element held by the low nibble (high: + HALF)
    acc = tl.zeros([BLOCK_N, BLOCK_K // 2], tl.float32)
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, KP)
    for k0 in range(k_begin, k_end, BLOCK_K):
        bmask = (k0 + 2 * j) < KP
        wmask = nmask[:, None] & bmask[None, :]
        packed = tl.load(q_ptr + n64[:, None] * sqn + (k0 // 2 + j)[None, :], mask=wmask, other=0)
        lo = (packed & 0xF).to(tl.float32)
        hi = (packed >> 4).to(tl.float32)
        gidx = k0 // GROUP + grp
        sc = tl.load(s_ptr + n64[:, None] * ssn + gidx[None, :], mask=wmask, other=0.0).to(tl.float32)
        mn = tl.load(m_ptr + n64[:, None] * ssn + gidx[None, :], mask=wmask, other=0.0).to(tl.float32)
        e_lo = k0 + elem_lo
        e_hi = e_lo + HALF
        x_lo = tl.load(x_ptr + row * sxm + e_lo, mask=e_lo < K, other=0.0).to(tl.float32)
        x_hi = tl.load(x_ptr + row * sxm + e_hi, mask=e_hi < K, other=0.0).to(tl.float32)
        # (s*lo + m)*x_lo + (s*hi + m)*x_hi, factored to save a multiply per element.
        acc += sc * (lo * x_lo[None, :] + hi * x_hi[None, :]) + mn * (x_lo + x_hi)[None, :]
    y = tl.sum(acc, axis=1)
    if SPLIT:
        tl.store(out_ptr + (pid_k * M + row) * N + n64, y, mask=nmask)
    else:
        if HAS_BIAS:
            y += tl.load(bias_ptr + n64, mask=nmask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * N + n64, y.to(out_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def qgemv_int8_kernel(
    x_ptr, q_ptr, s_ptr, bias_ptr, out_ptr,
    M, N, K, KP, K_PER_SPLIT,
    sxm, sqn, ssn,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    pid_k = tl.program_id(2)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    n64 = n.to(tl.int64)
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, KP)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k = k0 + kk
        wmask = nmask[:, None] & (k < KP)[None, :]
        q = tl.load(q_ptr + n64[:, None] * sqn + k[None, :], mask=wmask, other=0).to(tl.float32)
        sc = tl.load(s_ptr + n64[:, None] * ssn + (k // GROUP)[None, :], mask=wmask, other=0.0).to(tl.float32)
        xv = tl.load(x_ptr + row * sxm + k, mask=k < K, other=0.0).to(tl.float32)
        acc += q * sc * xv[None, :]
    y = tl.sum(acc, axis=1)
    if SPLIT:
        tl.store(out_ptr + (pid_k * M + row) * N + n64, y, mask=nmask)
    else:
        if HAS_BIAS:
            y += tl.load(bias_ptr + n64, mask=nmask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * N + n64, y.to(out_ptr.dtype.element_ty), mask=nmask)
