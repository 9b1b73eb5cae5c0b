"""Triton kernel behind :mod:`rejoinder.kernels.sampling` (imported lazily)."""

import triton
import triton.language as tl

_INT32_MIN = tl.constexpr(-2147483648)


@triton.jit
def _keys(l):
    # fp32 bit pattern -> int32 with the same order (flip the magnitude bits of negatives).
    bits = l.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def sample_kernel(
    logits_ptr, stride_b, V, temp_ptr, topk_ptr, topp_ptr, u_ptr, out_ptr,
    BLOCK: tl.constexpr, NPIV: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_b
    offs = tl.arange(0, BLOCK)
    temp = tl.load(temp_ptr + row)
    top_k = tl.load(topk_ptr + row)
    top_p = tl.load(topp_ptr + row)
    u = tl.load(u_ptr + row)

    # Pass 1: maximum and its first index (the greedy token).
    mx = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
    amax = V
    for v0 in range(0, V, BLOCK):
        idx = v0 + offs
        l = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
        bm = tl.max(l, axis=0)
        bi = tl.min(tl.where(l == bm, idx, V), axis=0)
        amax = tl.where(bm > mx, bi, amax)
        mx = tl.maximum(mx, bm)

    token = amax
    if temp > 0.0:
        c = 1.4426950408889634 / temp
        piv_j = tl.arange(0, NPIV).to(tl.int64) + 1
        key_max = _keys(mx).to(tl.int64)

        # top-k threshold: largest key t with count(keys >= t) >= k. Invariant: the answer lies
        # in [lo, hi]; cnt_lo = count(keys >= lo), cnt_hi = count(keys > hi). Once a single key
        # is left in [lo, hi] the kept set {keys >= lo} is final, so the search stops early
        # (typically after 4-5 passes instead of 8).
        lo = tl.full([], _INT32_MIN, tl.int64)
        cnt_lo = V
        if (top_k > 0) & (top_k < V):
            hi = key_max
            cnt_hi = 0
            while (lo < hi) & (cnt_lo - cnt_hi > 1):
                piv = lo + (piv_j * (hi - lo + 1)) // (NPIV + 1)
                cnt = tl.zeros([NPIV], tl.int32)
                for v0 in range(0, V, BLOCK):
                    idx = v0 + offs
                    m = idx < V
                    kk = _keys(tl.load(base + idx, mask=m, other=0.0).to(tl.float32)).to(tl.int64)
                    ge = (kk[:, None] >= piv[None, :]) & m[:, None]
                    cnt += tl.sum(ge.to(tl.int32), axis=0)
                ok = cnt >= top_k
                # counts fall as pivots rise: the ok pivots are a prefix of the pivot list.
                lo = tl.maximum(lo, tl.max(tl.where(ok, piv, lo), axis=0))
                cnt_lo = tl.minimum(cnt_lo, tl.min(tl.where(ok, cnt, cnt_lo), axis=0))
                hi = tl.minimum(hi, tl.min(tl.where(ok, hi, piv - 1), axis=0))
                cnt_hi = tl.maximum(cnt_hi, tl.max(tl.where(ok, cnt_hi, cnt), axis=0))
        tau = lo

        # top-p threshold: largest key t >= tau with mass(keys >= t) >= p * mass(keys >= tau),
        # searched the same way (mass decides, counts only detect the early exit).
        if (top_p > 0.0) & (top_p < 1.0):
            z = tl.zeros([BLOCK], tl.float32)
            for v0 in range(0, V, BLOCK):
                idx = v0 + offs
                m = idx < V
                l = tl.load(base + idx, mask=m, other=float("-inf")).to(tl.float32)
                keep = m & (_keys(l).to(tl.int64) >= tau)
                z += tl.where(keep, tl.exp2((l - mx) * c), 0.0)
            target = top_p * tl.sum(z, axis=0)
            hi = key_max
            cnt_hi = 0
            while (lo < hi) & (cnt_lo - cnt_hi > 1):
                piv = lo + (piv_j * (hi - lo + 1)) // (NPIV + 1)
                mass = tl.zeros([NPIV], tl.float32)
                cnt = tl.zeros([NPIV], tl.int32)
                for v0 in range(0, V, BLOCK):
                    idx = v0 + offs
                    m = idx < V
                    l = tl.load(base + idx, mask=m, other=float("-inf")).to(tl.float32)
                    kk = _keys(l).to(tl.int64)
                    e = tl.where(m, tl.exp2((l - mx) * c), 0.0)
                    ge = (kk[:, None] >= piv[None, :]) & m[:, None]
                    mass += tl.sum(tl.where(ge, e[:, None], 0.0), axis=0)
                    cnt += tl.sum(ge.to(tl.int32), axis=0)
                ok = mass >= target
                lo = tl.maximum(lo, tl.max(tl.where(ok, piv, lo), axis=0))
                cnt_lo = tl.minimum(cnt_lo, tl.min(tl.where(ok, cnt, cnt_lo), axis=0))
                hi = tl.minimum(hi, tl.min(tl.where(ok, hi, piv - 1), axis=0))
                cnt_hi = tl.maximum(cnt_hi, tl.max(tl.where(ok, cnt_hi, cnt), axis=0))
            tau = lo

        # Total kept mass, then the inverse-CDF walk in vocabulary order.
        z = tl.zeros([BLOCK], tl.float32)
        for v0 in range(0, V, BLOCK):
            idx = v0 + offs
            m = idx < V
            l = tl.load(base + idx, mask=m, other=float("-inf")).to(tl.float32)
            z += tl.where(m & (_keys(l).to(tl.int64) >= tau), tl.exp2((l - mx) * c), 0.0)
        r = u * tl.sum(z, axis=0)
        running = tl.zeros([], tl.float32)
        first = V
        last = -1
        for v0 in range(0, V, BLOCK):
            idx = v0 + offs
            m = idx < V
            l = tl.load(base + idx, mask=m, other=float("-inf")).to(tl.float32)
            keep = m & (_keys(l).to(tl.int64) >= tau)
            e = tl.where(keep, tl.exp2((l - mx) * c), 0.0)
            cs = tl.cumsum(e, axis=0) + running
            first = tl.minimum(first, tl.min(tl.where(keep & (cs > r), idx, V), axis=0))
            last = tl.maximum(last, tl.max(tl.where(keep, idx, -1), axis=0))
            running += tl.sum(e, axis=0)
        token = tl.where(first < V, first, last)
    tl.store(out_ptr + row, token.to(tl.int64))
