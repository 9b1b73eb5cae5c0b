"""RMSNorm, optionally fused with the residual add that precedes it in a Llama block.

Llama's block is ``h = x + attn(norm(x)); out = h + mlp(norm(h))``: every norm but the first is
preceded by a residual add. Fusing the two reads ``x`` and ``residual`` once and writes the new
residual and the normalised activations in the same pass (one launch instead of two, half the
memory traffic).

Numerics (kernel and twin agree): the sum ``x + residual`` is rounded to the input dtype (it *is*
the new residual stream, exactly what an unfused model stores), then normalised in fp32 and scaled
by ``weight`` in fp32, with one final rounding to the input dtype.
"""

from __future__ import annotations

import torch

from ._backend import Backend, next_pow2, use_triton

__all__ = [
    "rms_norm",
    "rms_norm_ref",
    "rms_norm_triton",
    "add_rms_norm",
    "add_rms_norm_ref",
    "add_rms_norm_triton",
]


# --------------------------------------------------------------------------- torch twins


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dim; x [..., H], weight [H]."""
    xf = x.float()
    inv = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * inv * weight.float()).to(x.dtype)


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(rms_norm(x + residual), x + residual)``; the sum is rounded to x.dtype first."""
    h = (x.float() + residual.float()).to(x.dtype)
    return rms_norm_ref(h, weight, eps), h


# --------------------------------------------------------------------------- Triton launches


def _rows(t: torch.Tensor) -> torch.Tensor:
    # The kernel walks rows with one stride and needs unit stride along the hidden dim.
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    from . import _rmsnorm_triton as k

    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"weight must be [{hidden}], got {tuple(weight.shape)}")
    x2 = _rows(x)
    rows = x2.shape[0]
    out = torch.empty((rows, hidden), dtype=x.dtype, device=x.device)
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError("residual must have the shape of x")
        r2 = _rows(residual)
        res_out = torch.empty_like(out)
    else:
        r2, res_out = x2, out  # dummies: never touched when HAS_RESIDUAL is False
    block = next_pow2(hidden)
    num_warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    if rows:
        k.rmsnorm_kernel[(rows,)](
            x2, r2, weight, out, res_out,
            x2.stride(0), r2.stride(0), out.stride(0),
            hidden, eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK=block,
            num_warps=num_warps,
        )
    shape = x.shape
    return out.view(shape), (res_out.view(shape) if residual is not None else None)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Triton launch of :func:`rms_norm_ref`."""
    return _launch(x, None, weight, eps)[0]


def add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launch of :func:`add_rms_norm_ref`."""
    out, h = _launch(x, residual, weight, eps)
    assert h is not None
    return out, h


# --------------------------------------------------------------------------- dispatchers


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, backend: Backend | None = None
) -> torch.Tensor:
    """RMSNorm over the last dim. x [..., H] (fp32/fp16/bf16), weight [H]. Returns x's shape/dtype."""
    if use_triton(x, weight, backend=backend):
        return rms_norm_triton(x, weight, eps)
    return rms_norm_ref(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    backend: Backend | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``h = x + residual; return rms_norm(h) * weight, h``. Shapes [..., H], weight [H]."""
    if use_triton(x, residual, weight, backend=backend):
        return add_rms_norm_triton(x, residual, weight, eps)
    return add_rms_norm_ref(x, residual, weight, eps)
