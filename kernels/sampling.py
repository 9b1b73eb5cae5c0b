"""Token sampling on the device: temperature, top-k, top-p, greedy -- no host round trip.

``sample(logits [B, V], temperature, top_k, top_p, uniform [B]) -> token ids [B] (int64)``.

Randomness comes in as ``uniform``, a [B] fp32 tensor of U[0, 1) draws already on the device
(e.g. ``torch.rand(B, device=dev, generator=g)``, which CUDA graphs capture and replay with fresh
Philox offsets). Given the same draws, the Triton kernel and its torch twin pick the same token.

Semantics per row (all comparisons in logit space, which temperature does not reorder):

1. ``temperature <= 0``: greedy, the first index of the maximum logit.
2. top-k (active when ``0 < top_k < V``): keep logits >= the k-th largest (ties at the threshold
   are all kept).
3. probabilities ``e_i = exp((l_i - max) / T)`` over the kept set, unnormalised.
4. top-p (active when ``0 < top_p < 1``): keep the smallest set of highest logits whose mass is
   >= ``top_p`` of the kept mass (again ties kept), as Hugging Face's TopPLogitsWarper does.
5. inverse CDF in vocabulary order: the first kept index whose running mass exceeds
   ``uniform * total_kept_mass``.

How the kernel avoids sorting: thresholds are found by a multi-way search over the fp32 logits'
bit patterns mapped to order-preserving int32 keys. Each pass over the row evaluates 16 pivots
at once (count of keys >= pivot for top-k, mass for top-p) and narrows the interval 17-fold, so
an exact threshold costs at most 8 passes whatever the vocabulary. One program per row; the row
is re-read from L2. Every parameter is a device tensor, so the launch is CUDA-graph safe.
"""

from __future__ import annotations

import torch

from ._backend import Backend, gpu_config, next_pow2, use_triton

__all__ = ["sample", "sample_ref", "sample_triton", "logit_keys"]

_LOG2E = 1.4426950408889634


def logit_keys(logits: torch.Tensor) -> torch.Tensor:
    """Order-preserving int32 keys of fp32 values: ``a < b  <=>  key(a) < key(b)`` (and -0 < +0)."""
    bits = logits.float().contiguous().view(torch.int32)
    return torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


def _param(x: torch.Tensor | float | int, batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.reshape(-1).to(device=device, dtype=dtype).expand(batch).contiguous()
    return torch.full((batch,), x, dtype=dtype, device=device)


def sample_ref(
    logits: torch.Tensor,
    temperature: torch.Tensor | float,
    top_k: torch.Tensor | int,
    top_p: torch.Tensor | float,
    uniform: torch.Tensor,
) -> torch.Tensor:
    """Torch twin of :func:`sample_triton` (same thresholds, same inverse-CDF walk)."""
    b, v = logits.shape
    dev = logits.device
    temp = _param(temperature, b, torch.float32, dev)
    k = _param(top_k, b, torch.int64, dev)
    p = _param(top_p, b, torch.float32, dev)
    u = _param(uniform, b, torch.float32, dev)
    lf = logits.float()
    keys = logit_keys(lf)
    mx = lf.max(dim=-1, keepdim=True).values
    greedy = torch.argmax(lf, dim=-1)  # first maximal index

    sorted_keys = keys.sort(dim=-1, descending=True).values
    use_k = (k > 0) & (k < v)
    kth = sorted_keys.gather(1, (k.clamp(1, v) - 1)[:, None])
    tau = torch.where(use_k[:, None], kth, torch.iinfo(torch.int32).min)
    kept = keys >= tau

    # Guard temperature <= 0 (greedy rows) against division by zero; their e is never used.
    safe_t = torch.where(temp > 0, temp, 1.0)[:, None]
    e = torch.exp2((lf - mx) * (_LOG2E / safe_t))
    e = torch.where(kept, e, 0.0)

    # top-p, computed for every row (no data-dependent host branch, so the twin is graph-safe too).
    use_p = (p > 0) & (p < 1)
    ek, order = torch.sort(torch.where(kept, keys, torch.iinfo(torch.int32).min), dim=-1, descending=True)
    mass = torch.cumsum(e.gather(1, order), dim=-1)
    target = p[:, None] * e.sum(dim=-1, keepdim=True)
    n = (mass < target).sum(dim=-1, keepdim=True).clamp(max=v - 1)
    tau_p = ek.gather(1, n)
    kept = kept & torch.where(use_p[:, None], keys >= tau_p, True)
    e = torch.where(kept, e, 0.0)

    csum = torch.cumsum(e, dim=-1)
    r = u[:, None] * e.sum(dim=-1, keepdim=True)
    hit = kept & (csum > r)
    idx = torch.arange(v, device=dev)
    first = torch.where(hit, idx, v).min(dim=-1).values
    last_kept = torch.where(kept, idx, -1).max(dim=-1).values
    token = torch.where(first < v, first, last_kept)
    return torch.where(temp > 0, token, greedy)


def sample_triton(
    logits: torch.Tensor,
    temperature: torch.Tensor | float,
    top_k: torch.Tensor | int,
    top_p: torch.Tensor | float,
    uniform: torch.Tensor,
) -> torch.Tensor:
    """Triton launch: one program per row, see the module docstring."""
    from . import _sampling_triton as kern

    b, v = logits.shape
    dev = logits.device
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    temp = _param(temperature, b, torch.float32, dev)
    k = _param(top_k, b, torch.int32, dev)
    p = _param(top_p, b, torch.float32, dev)
    u = _param(uniform, b, torch.float32, dev)
    out = torch.empty((b,), dtype=torch.int64, device=dev)
    gpu = gpu_config(logits)
    block = min(1024, max(16, next_pow2(v))) if gpu else min(128, max(16, next_pow2(v)))
    if b:
        kern.sample_kernel[(b,)](
            logits, logits.stride(0), v, temp, k, p, u, out,
            BLOCK=block, NPIV=16, num_warps=8 if gpu else 1,
        )
    return out


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor | float = 1.0,
    top_k: torch.Tensor | int = 0,
    top_p: torch.Tensor | float = 1.0,
    uniform: torch.Tensor | None = None,
    *,
    backend: Backend | None = None,
) -> torch.Tensor:
    """Sample one token per row of logits [B, V] (any float dtype) -> int64 [B].

    ``temperature``, ``top_k``, ``top_p``: per-row [B] tensors or Python scalars (0 disables top-k,
    >= 1 disables top-p, temperature <= 0 means greedy). ``uniform``: [B] U[0,1) draws on the
    device; drawn with ``torch.rand`` when omitted.
    """
    if uniform is None:
        uniform = torch.rand(logits.shape[0], device=logits.device)
    if use_triton(logits, backend=backend):
        return sample_triton(logits, temperature, top_k, top_p, uniform)
    return sample_ref(logits, temperature, top_k, top_p, uniform)
