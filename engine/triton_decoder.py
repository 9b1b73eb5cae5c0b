"""Decode step built from the fused kernels -- one token for each of B sessions -- replayable as CUDA graphs.

The eager `Transformer` does prefill (many tokens, compute bound); this module does the decode step
(one token per sequence, bound by weight reads and launch overhead). Per layer a step is:

    add_rms_norm -> qkv GEMV -> rope_kv_write -> decode_attention -> wo GEMV
    add_rms_norm -> gate_up GEMV -> swiglu_fused -> down GEMV

so each layer reads 4 weights (q/k/v and gate/up fused into one matrix each). The step writes into
the model's own KV cache tensors, so eager prefill and this decode step interleave freely and the
engine's prefix reuse keeps working.

Batches: B sequences, sequence b at position pos[b] of cache slot rows[b], run as one step: the
GEMVs apply each dequantised weight tile to up to `GEMV_BLOCK_M` sequences, rope_kv_write and
decode_attention index the per-session cache slots through `rows`.

Everything the step reads that changes per token (token ids, positions, slots) lives in static
device buffers and nothing syncs with the host, so on CUDA the step is captured as one
`torch.cuda.CUDAGraph` per batch size 1..max_batch (all sharing one memory pool) and replayed:
~10 launches per layer collapse into one graph launch. Off CUDA (CPU twins, or Triton's
interpreter in tests) the same code runs eagerly.
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
    """Decode one token per sequence with the fused kernels, into the KV cache the eager model also
    uses (a `Decoder`).

    `model.setup_cache(max_seq, slots)` must have been called; calling it again reallocates the
    cache, so build a new decoder afterwards. `packed` optionally maps HF-layout weight names
    ("layers.0.attn.wq.weight", "output.weight", ...) to packed weights used instead of the dense
    ones. Note that the model's wq/wk/wv and w_gate/w_up weights are rebound to views of the fused
    matrices (same values, no extra memory). A batch holds at most one sequence per cache slot.

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
        self.max_batch = self.layers[0].k_cache.shape[0]  # one sequence per cache slot
        # Static inputs/outputs: a captured graph reads and writes these very tensors on replay.
        n = self.max_batch
        self.tokens = torch.zeros(n, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(n, dtype=torch.long, device=self.device)
        self.rows = torch.arange(n, dtype=torch.long, device=self.device)  # batch row -> cache slot
        self.logits = torch.zeros(n, cfg.vocab_size, dtype=torch.float32, device=self.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}  # batch size -> captured step

    @property
    def graph(self) -> torch.cuda.CUDAGraph | None:
        """The captured single-sequence step (None before `capture`, and off CUDA)."""
        return self.graphs.get(1)

    def _run(self, b: int) -> None:
        """The step for the first `b` batch rows: reads tokens / pos / rows, writes the caches and logits."""
        cfg, be, hd = self.cfg, self.backend, self.cfg.head_dim
        nq, nkv = cfg.n_heads * hd, cfg.n_kv_heads * hd
        eps = cfg.norm_eps
        pos, rows = self.pos[:b], self.rows[:b]
        seq_lens = pos + 1  # each new token attends to itself too
        h = F.embedding(self.tokens[:b], self.embed)  # [b, dim], the residual stream
        x = K.rms_norm(h, self.layers[0].attn_norm, eps, backend=be)
        delta: Tensor | None = None
        for layer in self.layers:
            if delta is not None:  # the previous layer's FFN output joins the stream here
                x, h = K.add_rms_norm(delta, h, layer.attn_norm, eps, backend=be)
            qkv = layer.qkv(x)  # [b, nq + 2 nkv]
            q = qkv[:, :nq].view(b, 1, cfg.n_heads, hd)
            k = qkv[:, nq : nq + nkv].view(b, 1, cfg.n_kv_heads, hd)
            v = qkv[:, nq + nkv :].view(b, 1, cfg.n_kv_heads, hd)
            q = K.rope_kv_write(q, k, v, self.rope_cos, self.rope_sin, pos, layer.k_cache, layer.v_cache, rows,
                                backend=be)
            y = K.decode_attention(q.view(b, cfg.n_heads, hd), layer.k_cache, layer.v_cache, seq_lens,
                                   cache_rows=rows, backend=be)
            x, h = K.add_rms_norm(layer.wo(y.view(b, nq)), h, layer.ffn_norm, eps, backend=be)
            delta = layer.down(K.swiglu_fused(layer.gate_up(x), backend=be))
        assert delta is not None
        x, _ = K.add_rms_norm(delta, h, self.norm, eps, backend=be)
        self.logits[:b].copy_(self.output(x))

    def _launch(self, b: int) -> Tensor:
        graph = self.graphs.get(b)
        if graph is not None:
            graph.replay()
        else:
            self._run(b)
        return self.logits[:b]

    @torch.inference_mode()
    def step(self, token: Tensor | int, pos: Tensor | int, slot: int = 0) -> Tensor:
        """Run one decode token at position `pos` of cache slot `slot` (token and pos as int64 [1]
        device tensors, or Python ints, which are written with `fill_` so they need no host-to-device
        copy either). Returns the logits [V] (fp32) in a static buffer that the next step overwrites:
        clone it to keep it."""
        if isinstance(pos, int) and not 0 <= pos < self.max_seq:  # a tensor pos is not checked: no sync
            raise ValueError(f"position {pos} outside the KV cache of {self.max_seq}")
        if not 0 <= slot < self.max_batch:
            raise ValueError(f"slot {slot} is not one of the cache's {self.max_batch}")
        for buf, val in ((self.tokens, token), (self.pos, pos), (self.rows, slot)):
            if isinstance(val, Tensor):
                buf[:1].copy_(val.reshape(1), non_blocking=True)
            else:
                buf[:1].fill_(val)
        return self._launch(1)[0]

    @torch.inference_mode()
    def step_batch(self, tokens: Sequence[int], positions: Sequence[int], slots: Sequence[int]) -> Tensor:
        """One token for each of B sequences (distinct slots) -> logits [B, V] in the static buffer."""
        b = len(tokens)
        if not 0 < b <= self.max_batch or len(positions) != b or len(slots) != b:
            raise ValueError(f"a batch is 1..{self.max_batch} tokens with a position and a slot each")
        if len(set(slots)) != b or not all(0 <= s < self.max_batch for s in slots):
            raise ValueError(f"slots {list(slots)} must be distinct, each one of the cache's {self.max_batch}")
        if not all(0 <= p < self.max_seq for p in positions):
            raise ValueError(f"positions {list(positions)} outside the KV cache of {self.max_seq}")
        host = torch.tensor([list(tokens), list(positions), list(slots)], dtype=torch.long)
        for buf, row in zip((self.tokens, self.pos, self.rows), host):
            buf[:b].copy_(row, non_blocking=True)
        return self._launch(b)

    def prefill(self, tokens: Sequence[int], pos: int, slot: int = 0) -> Tensor:
        """Run `tokens` at positions pos.. of `slot`, one decode step each; the last one's logits [V]
        (the static buffer, as for `step`). The engine leaves prompts to the eager model (`prefill_max`)."""
        for i, token in enumerate(tokens):
            self.step(token, pos + i, slot)
        return self.logits[0]

    @torch.inference_mode()
    def capture(self, warmup: int = 2, batch_sizes: Sequence[int] | None = None) -> None:
        """Capture the step as CUDA graphs, one per batch size (default 1..max_batch); later steps of
        those sizes replay them. No-op off CUDA.

        Warm-up (which compiles the Triton kernels and lets the allocator settle) runs real steps,
        so it writes the last position of the slots it uses: saved and restored around it, so a
        cache that already holds prefixes is left untouched. The graphs share one memory pool
        (captured largest first), so several sizes cost little more memory than one.
        """
        if self.device.type != "cuda":
            return
        sizes = sorted(set(batch_sizes or range(1, self.max_batch + 1)) - set(self.graphs), reverse=True)
        if not sizes:
            return
        last = self.max_seq - 1
        saved = [(layer.k_cache[:, :, last].clone(), layer.v_cache[:, :, last].clone()) for layer in self.layers]
        self.tokens.zero_()
        self.pos.fill_(last)
        self.rows.copy_(torch.arange(self.max_batch, device=self.device))
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                for b in sizes:
                    self._run(b)
        torch.cuda.current_stream(self.device).wait_stream(side)
        pool = None
        for b in sizes:
            graph = torch.cuda.CUDAGraph()
            # thread_local: other threads (ASR, TTS) may use CUDA meanwhile
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                self._run(b)
            pool = graph.pool()
            self.graphs[b] = graph
        for layer, (k, v) in zip(self.layers, saved):
            layer.k_cache[:, :, last] = k
            layer.v_cache[:, :, last] = v


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
