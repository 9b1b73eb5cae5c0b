"""Triton kernel behind :mod:`rejoinder.kernels.swiglu` (imported lazily)."""

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
    # silu(g) = g * sigmoid(g); 1 / (1 + exp(-g)) saturates cleanly to 0 or 1 for large |g|.
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + row * so + cols, y.to(out_ptr.dtype.element_ty), mask=mask)
