"""Triton kernel behind :mod:`rejoinder.kernels.activations` (imported lazily)."""

import triton
import triton.language as tl


@triton.jit
def swiglu_kernel(g_ptr, u_ptr, out_ptr, sg, su, so, width, BLOCK: tl.constexpr):
    # Grid (rows, column blocks): row strides let gate/up be the two halves of one fused tensor.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    g = tl.load(g_ptr + row * sg + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * su + cols, mask=mask, other=0.0).to(tl.float32)
    # silu(g) = g * sigmoid(g), with sigmoid from exp(-|g|) so nothing overflows for large |g|.
    e = tl.exp(-tl.abs(g))
    sig = tl.where(g >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    y = g * sig * u
    tl.store(out_ptr + row * so + cols, y.to(out_ptr.dtype.element_ty), mask=mask)
