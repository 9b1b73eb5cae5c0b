"""One-token decode step built from the fused kernels, replayable as a CUDA graph.

The eager `Transformer` does prefill (many tokens, compute bound); this module does the decode step
(one token, bound by weight reads and launch overhead). Per layer a step is:

    add_rms_norm -> qkv GEMV -> rope_kv_write -> decode_attention -> wo GEMV
    add_rms_norm -> gate_up GEMV -> swiglu_fused -> down GEMV

so each layer reads 4 weights (q/k/v and gate/up fused into one matrix each). The step writes into
the model's own KV cache tensors, so eager prefill and this decode step interleave freely and the
engine's prefix reuse keeps working.

Everything the step reads that changes per token (token id, position) lives in static device
buffers and nothing syncs with the host, so on CUDA the whole step is captured once as a
`torch.cuda.CUDAGraph` and replayed: ~10 launches per layer collapse into one graph launch. Off
CUDA (CPU twins, or Triton's interpreter in tests) the same code runs eagerly.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rejoinder import kernels as K
from rejoinder.kernels._backend import Backend

from .model import Transformer
from .sampling import SamplingParams

Weight = Union[Tensor, K.QuantizedWeight]


def _cat_quantized(a: K.QuantizedWeight, b: K.QuantizedWeight) -> K.QuantizedWeight | None:
    """Stack two packed weights along N (output rows), or None when their formats differ."""
    same = (
        a.bits == b.bits
        and a.group_size == b.group_size
        and a.in_features == b.in_features
        and a.qweight.shape[1] == b.qweight.shape[1]
        and a.scales.dtype == b.scales.dtype
        and (a.mins is None) == (b.mins is None)
        and (a.mins is None or b.mins is None or a.mins.dtype == b.mins.dtype)
    )
    if not same:
        return None
    mins = None if a.mins is None or b.mins is None else torch.cat([a.mins, b.mins])
    return K.QuantizedWeight(
        torch.cat([a.qweight, b.qweight]), torch.cat([a.scales, b.scales]), mins, a.bits, a.group_size, a.in_features
    )


def _fuse_dense(mods: Sequence[nn.Linear]) -> Tensor:
    """One [sum N, K] weight. The modules' own weights become views of it, so fusing does not
    double the weight memory and eager prefill keeps reading exactly the same values."""
    if len(mods) == 1:  # nothing to fuse (and a tied output/embedding weight stays tied)
        return mods[0].weight.detach()
    fused = torch.cat([m.weight.detach() for m in mods])
    row = 0
    for m in mods:
        n = m.weight.shape[0]
        m.weight = nn.Parameter(fused[row : row + n], requires_grad=False)
        row += n
    return fused


class _Projection:
    """x @ W^T (+ bias) where W is the row-concatenation of several linears.

    Each part is dense (the model's weight) or packed (a `QuantizedWeight`); adjacent parts of the
    same kind are merged, so a fully dense or uniformly quantised projection is a single GEMV. Mixed
    files (say wq in Q4_0, wv left dense because its GGUF type has no packed kernel) still work, as
    a few GEMVs whose outputs are concatenated.
    """

    def __init__(self, mods: Sequence[nn.Linear], packed: Sequence[K.QuantizedWeight | None], backend: Backend | None):
        self.backend = backend
        device = mods[0].weight.device
        biases = [m.bias for m in mods]
        self.bias = torch.cat([b.detach() for b in biases]) if all(b is not None for b in biases) else None
        if any(b is not None for b in biases) and self.bias is None:
            raise ValueError("either every fused linear has a bias or none has")
        if all(p is None for p in packed):
            self.parts: list[Weight] = [_fuse_dense(mods)]
            return
        self.parts = []
        for m, p in zip(mods, packed):
            w: Weight = m.weight.detach() if p is None else p.to(device)
            last = self.parts[-1] if self.parts else None
            if isinstance(w, Tensor) and isinstance(last, Tensor):
                self.parts[-1] = torch.cat([last, w])
            elif isinstance(w, K.QuantizedWeight) and isinstance(last, K.QuantizedWeight) and (
                merged := _cat_quantized(last, w)
            ) is not None:
                self.parts[-1] = merged
            else:
                self.parts.append(w)

    def _linear(self, x: Tensor, w: Weight, bias: Tensor | None) -> Tensor:
        if isinstance(w, K.QuantizedWeight):
            return K.quant_linear(x, w, bias, backend=self.backend)
        return F.linear(x, w, bias)

    def __call__(self, x: Tensor) -> Tensor:
        if len(self.parts) == 1:
            return self._linear(x, self.parts[0], self.bias)
        y = torch.cat([self._linear(x, w, None) for w in self.parts], dim=-1)
        return y if self.bias is None else y + self.bias


class _Layer:
    def __init__(self, model: Transformer, i: int, packed: Mapping[str, K.QuantizedWeight], backend: Backend | None):
        block = model.layers[i]
        attn = block.attn
        if attn.cache is None:
            raise ValueError("call model.setup_cache(max_seq) before building a TritonDecoder")

        def proj(owner: str, *names: str) -> _Projection:
            module = getattr(block, owner)
            mods = [getattr(module, n) for n in names]
            return _Projection(mods, [packed.get(f"layers.{i}.{owner}.{n}.weight") for n in names], backend)

        self.attn_norm = block.attn_norm.weight.detach()
        self.ffn_norm = block.ffn_norm.weight.detach()
        self.qkv = proj("attn", "wq", "wk", "wv")
        self.wo = proj("attn", "wo")
        self.gate_up = proj("ffn", "w_gate", "w_up")
        self.down = proj("ffn", "w_down")
        self.k_cache, self.v_cache = attn.cache.k, attn.cache.v


class TritonDecoder:
    """Decode one token with the fused kernels, into the KV cache the eager model also uses (a `Decoder`).

    `model.setup_cache(max_seq)` must have been called; calling it again reallocates the cache, so
    build a new decoder afterwards. `packed` optionally maps HF-layout weight names
    ("layers.0.attn.wq.weight", "output.weight", ...) to packed weights used instead of the dense
    ones. Note that the model's wq/wk/wv and w_gate/w_up weights are rebound to views of the fused
    matrices (same values, no extra memory).

    `backend` is passed to every kernel dispatcher: None / "auto" runs Triton on CUDA and the torch
    twins elsewhere; tests force "triton" to run the kernels on the CPU interpreter.
    """

    name = "triton"  # what Engine.backend reports
    prefill_max = 0  # prompts go to the eager model (cuBLAS GEMMs)

    def __init__(
        self,
        model: Transformer,
        packed: Mapping[str, K.QuantizedWeight] | None = None,
        *,
        backend: Backend | None = None,
    ):
        if model.rope_cos is None or not model.max_seq:
            raise ValueError("call model.setup_cache(max_seq) before building a TritonDecoder")
        packed = packed or {}
        cfg = model.cfg
        self.cfg = cfg
        self.backend = backend
        self.max_seq = model.max_seq
        self.embed = model.embed.weight.detach()
        self.layers = [_Layer(model, i, packed, backend) for i in range(cfg.n_layers)]
        self.norm = model.norm.weight.detach()
        self.output = _Projection([model.output], [packed.get("output.weight")], backend)
        self.rope_cos, self.rope_sin = model.rope_cos, model.rope_sin
        self.device = self.embed.device
        # Static inputs/outputs: a captured graph reads and writes these very tensors on replay.
        self.token = torch.zeros(1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.logits = torch.zeros(cfg.vocab_size, dtype=torch.float32, device=self.device)
        self.graph: torch.cuda.CUDAGraph | None = None

    def _run(self) -> None:
        """The step itself: reads self.token / self.pos, writes the caches and self.logits."""
        cfg, be, hd = self.cfg, self.backend, self.cfg.head_dim
        nq, nkv = cfg.n_heads * hd, cfg.n_kv_heads * hd
        eps = cfg.norm_eps
        seq_lens = self.pos + 1  # the new token attends to itself too
        h = F.embedding(self.token, self.embed)  # [1, dim], the residual stream
        x = K.rms_norm(h, self.layers[0].attn_norm, eps, backend=be)
        delta: Tensor | None = None
        for layer in self.layers:
            if delta is not None:  # the previous layer's FFN output joins the stream here
                x, h = K.add_rms_norm(delta, h, layer.attn_norm, eps, backend=be)
            qkv = layer.qkv(x)  # [1, nq + 2 nkv]
            q = qkv[:, :nq].view(1, 1, cfg.n_heads, hd)
            k = qkv[:, nq : nq + nkv].view(1, 1, cfg.n_kv_heads, hd)
            v = qkv[:, nq + nkv :].view(1, 1, cfg.n_kv_heads, hd)
            q = K.rope_kv_write(q, k, v, self.rope_cos, self.rope_sin, self.pos, layer.k_cache, layer.v_cache,
                                backend=be)
            y = K.decode_attention(q.view(1, cfg.n_heads, hd), layer.k_cache, layer.v_cache, seq_lens, backend=be)
            x, h = K.add_rms_norm(layer.wo(y.view(1, nq)), h, layer.ffn_norm, eps, backend=be)
            delta = layer.down(K.swiglu_fused(layer.gate_up(x), backend=be))
        assert delta is not None
        x, _ = K.add_rms_norm(delta, h, self.norm, eps, backend=be)
        self.logits.copy_(self.output(x)[0])

    @torch.inference_mode()
    def step(self, token: Tensor | int, pos: Tensor | int) -> Tensor:
        """Run one decode token at position `pos` (int64 [1] device tensors, or Python ints, which are
        written with `fill_` so they need no host-to-device copy either). Returns the logits [V]
        (fp32) in a static buffer that the next step overwrites: clone it to keep it."""
        if isinstance(pos, int) and not 0 <= pos < self.max_seq:  # a tensor pos is not checked: no sync
            raise ValueError(f"position {pos} outside the KV cache of {self.max_seq}")
        for buf, val in ((self.token, token), (self.pos, pos)):
            if isinstance(val, Tensor):
                buf.copy_(val.reshape(1), non_blocking=True)
            else:
                buf.fill_(val)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._run()
        return self.logits

    def prefill(self, tokens: Sequence[int], pos: int) -> Tensor:
        """Run `tokens` at positions pos.., one decode step each; the last one's logits [V] (the
        static buffer, as for `step`). The engine leaves prompts to the eager model (`prefill_max`)."""
        for i, token in enumerate(tokens):
            self.step(token, pos + i)
        return self.logits

    @torch.inference_mode()
    def capture(self, warmup: int = 2) -> None:
        """Capture the step as a CUDA graph; later `step` calls replay it. No-op off CUDA.

        Warm-up (which compiles the Triton kernels and lets the allocator settle) runs real steps,
        so it writes one KV slot: the last one, saved and restored around it, so a cache that
        already holds a prefix is left untouched.
        """
        if self.device.type != "cuda" or self.graph is not None:
            return
        last = self.max_seq - 1
        saved = [(layer.k_cache[:, :, last].clone(), layer.v_cache[:, :, last].clone()) for layer in self.layers]
        self.token.zero_()
        self.pos.fill_(last)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._run()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # other threads (ASR, TTS) may use CUDA
            self._run()
        for layer, (k, v) in zip(self.layers, saved):
            layer.k_cache[:, :, last] = k
            layer.v_cache[:, :, last] = v
        self.graph = graph


def sample_on_device(
    logits: Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    *,
    backend: Backend | None = None,
) -> Tensor:
    """logits [V] -> token id int64 [1] on the device, without a host round trip.

    Uses the kernels' sampler (threshold search + inverse CDF), so for a given seed it draws
    different tokens than `engine.sampling.sample` (multinomial); greedy is identical.
    """
    uniform = torch.rand(1, device=logits.device, generator=generator)
    return K.sample(logits[None], params.temperature, params.top_k, params.top_p, uniform, backend=backend)
