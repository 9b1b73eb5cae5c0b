"""Triton kernel behind :mod:`rejoinder.kernels.rmsnorm` (imported lazily)."""

import triton
import triton.language as tl


@triton.jit
def rmsnorm_kernel(
    x_ptr, r_ptr, w_ptr, out_ptr, res_out_ptr,
    stride_x, stride_r, stride_out,
    hidden, eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program per row; the whole row sits in registers (hidden <= 16k in practice), so the
    # row is read once and both outputs are written in the same pass.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_out + cols, h, mask=mask)
        # Normalise the *rounded* residual, as an unfused model would.
        x = h.to(tl.float32)
    mean_sq = tl.sum(x * x, axis=0) / hidden
    inv = 1.0 / tl.sqrt(mean_sq + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (x * inv * w).to(out_ptr.dtype.element_ty), mask=mask)
