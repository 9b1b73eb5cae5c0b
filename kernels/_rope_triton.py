"""Triton kernel behind :mod:`rejoinder.kernels.rope` (imported lazily)."""

import triton
import triton.language as tl


@triton.jit
def rope_kv_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, row_ptr, kc_ptr, vc_ptr, qo_ptr,
    sqb, sqt, sqh, sqd,
    skb, skt, skh, skd,
    svb, svt, svh, svd,
    skcb, skch, skcs,
    svcb, svch, svcs,
    scos_s, scos_d,
    T, HQ, HALF,
    POS_PER_ROW: tl.constexpr,
    CACHE_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Grid: (B*T, Hq + Hkv). Programs with head < Hq rotate a query head; the others rotate one
    # key head, write it to the cache and copy the matching value head (same cache slot), so the
    # new token's q/k/v cost a single launch.
    bt = tl.program_id(0)
    head = tl.program_id(1)
    b = (bt // T).to(tl.int64)
    t = bt % T
    if POS_PER_ROW:
        pos = tl.load(pos_ptr + b).to(tl.int64) + t
    else:
        pos = tl.load(pos_ptr).to(tl.int64) + t
    offs = tl.arange(0, BLOCK)
    mask = offs < HALF
    c = tl.load(cos_ptr + pos * scos_s + offs * scos_d, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + pos * scos_s + offs * scos_d, mask=mask, other=0.0).to(tl.float32)
    if head < HQ:
        src = q_ptr + b * sqb + t * sqt + head * sqh
        x1 = tl.load(src + offs * sqd, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + (offs + HALF) * sqd, mask=mask, other=0.0).to(tl.float32)
        # q_out is contiguous [B, T, Hq, D].
        dst = qo_ptr + (bt.to(tl.int64) * HQ + head) * (2 * HALF)
        tl.store(dst + offs, (x1 * c - x2 * s).to(qo_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + HALF + offs, (x2 * c + x1 * s).to(qo_ptr.dtype.element_ty), mask=mask)
    else:
        if CACHE_ROWS:  # batch row b writes its session's cache slot
            cb = tl.load(row_ptr + b).to(tl.int64)
        else:
            cb = b
        kh = head - HQ
        src = k_ptr + b * skb + t * skt + kh * skh
        x1 = tl.load(src + offs * skd, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + (offs + HALF) * skd, mask=mask, other=0.0).to(tl.float32)
        dst = kc_ptr + cb * skcb + kh * skch + pos * skcs
        tl.store(dst + offs, (x1 * c - x2 * s).to(kc_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + HALF + offs, (x2 * c + x1 * s).to(kc_ptr.dtype.element_ty), mask=mask)
        vsrc = v_ptr + b * svb + t * svt + kh * svh
        vdst = vc_ptr + cb * svcb + kh * svch + pos * svcs
        v1 = tl.load(vsrc + offs * svd, mask=mask, other=0.0)
        v2 = tl.load(vsrc + (offs + HALF) * svd, mask=mask, other=0.0)
        tl.store(vdst + offs, v1.to(vc_ptr.dtype.element_ty), mask=mask)
        tl.store(vdst + HALF + offs, v2.to(vc_ptr.dtype.element_ty), mask=mask)
