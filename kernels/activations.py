"""SwiGLU activation: ``silu(gate) * up`` (the gated MLP of Llama-family models).

Accepts either two tensors ``gate``/``up`` of equal shape [..., I] (views with a row stride are
fine, e.g. the two halves of a fused gate_up projection), or one fused tensor [..., 2I] via
:func:`swiglu_fused`, whose first half is the gate. Math in fp32, one rounding to the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import Backend, gpu_config, use_triton

__all__ = ["swiglu", "swiglu_ref", "swiglu_triton", "swiglu_fused"]


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Torch twin: ``silu(gate) * up`` in fp32, result in gate.dtype."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Triton launch of :func:`swiglu_ref`."""
    from . import _swiglu_triton as kern

    if gate.shape != up.shape:
        raise ValueError("gate and up must have the same shape")
    width = gate.shape[-1]
    g2, u2 = _rows(gate), _rows(up)
    rows = g2.shape[0]
    out = torch.empty((rows, width), dtype=gate.dtype, device=gate.device)
    block = 1024 if gpu_config(gate) else 256
    if rows and width:
        grid = (rows, -(-width // block))
        kern.swiglu_kernel[grid](
            g2, u2, out, g2.stride(0), u2.stride(0), out.stride(0), width, BLOCK=block, num_warps=4
        )
    return out.view(gate.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: Backend | None = None) -> torch.Tensor:
    """``silu(gate) * up``; gate, up [..., I] (fp32/fp16/bf16). Returns [..., I] in gate.dtype."""
    if use_triton(gate, up, backend=backend):
        return swiglu_triton(gate, up)
    return swiglu_ref(gate, up)


def swiglu_fused(gate_up: torch.Tensor, *, backend: Backend | None = None) -> torch.Tensor:
    """SwiGLU of a fused projection output [..., 2I] (gate first, then up) -> [..., I]."""
    inter = gate_up.shape[-1] // 2
    return swiglu(gate_up[..., :inter], gate_up[..., inter:], backend=backend)
