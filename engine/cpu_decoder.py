"""The native CPU decode step: one token per sequence per ctypes call into ``kernels/cpu_decode.c``.

It runs over the eager model's own memory -- embedding, norms, RoPE tables and, above all, the
static KV cache with its per-session slots -- so the eager fp32 model and the native code
interleave freely and prefix reuse keeps working. `step_batch` runs one token for each of several
sequences (each at its own position in its own slot) in one pass over the weights: every weight
block is unpacked once for up to 4 (AVX2) or 8 (AVX-512) of them, and each sequence's logits are
bit for bit those of a `step` on its own.

Prompts of up to `PREFILL_MAX` new tokens (what a turn adds after the reused prefix: an end-of-turn
check, the reply header, the words heard since the last prefill) are prefilled natively too, with
the step's own kernels: each weight row is unpacked once per 8 tokens (AVX-512; 4 on AVX2) and each
token's logits are those a step would give it. Measured here (2 threads, AVX-512, after a cached
35-token prefix, `bench/decode.py --prefill-sweep` for the peers): 2 new tokens 18 ms vs 100-150 eager,
8 tokens 41-47 vs ~105, 16 tokens 77 vs ~115, 32 tokens 137 vs ~155, 48 tokens 220 vs ~185: past
about 32 tokens MKL's register-blocked GEMM wins (this kernel reloads activations for every FMA), so
longer prompts go to the eager model.
Matrices that came from a GGUF as Q4_0 / Q4_1 / Q8_0 are multiplied in those blocks (4-8x less
memory traffic than fp32, dequantised in registers); every other matrix is read as fp32.
"""
from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch

from ..kernels.cpu_native import RjLayer, RjModel, RjWeight, load_library
from ..kernels.ggml import GGMLWeight
from .model import Transformer

_LAYER_WEIGHTS = {
    "wq": "attn.wq",
    "wk": "attn.wk",
    "wv": "attn.wv",
    "wo": "attn.wo",
    "w_gate": "ffn.w_gate",
    "w_up": "ffn.w_up",
    "w_down": "ffn.w_down",
}


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


PREFILL_CHUNK = 64  # tokens per native prefill call (bounds its work buffer)
PREFILL_MAX = 32  # past this many new tokens the eager GEMM is faster (module docstring)


class NativeDecoder:
    """Decode steps for a `Transformer` (fp32, CPU, cache set up) in compiled C (a `Decoder`)."""

    name = "native"  # what Engine.backend reports
    prefill_max = PREFILL_MAX  # the engine prefills prompts up to this many new tokens here

    def __init__(self, model: Transformer, blocks: dict[str, GGMLWeight] | None = None, threads: int = 1,
                 lib: ctypes.CDLL | None = None):
        cfg = model.cfg
        p = next(model.parameters())
        if p.dtype != torch.float32 or p.device.type != "cpu":
            raise ValueError("the native decoder is the float32 CPU path")
        if model.layers[0].attn.cache is None or model.rope_cos is None:
            raise ValueError("call model.setup_cache() before building a NativeDecoder")
        if cfg.head_dim % 2:
            raise ValueError("head_dim must be even for RoPE")
        self.lib = lib or load_library()  # or a kernels/cpu_native.load_variant build (tests)
        self.model = model
        blocks = blocks or {}
        self._keep: list[torch.Tensor] = []  # everything the C side points at stays alive with us

        def weight(name: str) -> RjWeight:
            w = blocks.get(name)
            if w is None:
                w = GGMLWeight.dense(model.get_parameter(name))
            else:
                self.quantized_bytes += w.nbytes()
            self._keep.append(w.data)
            return RjWeight.of(w)

        def vec(t: torch.Tensor | None) -> int | None:
            if t is None:
                return None
            t = t.detach().float().contiguous()
            self._keep.append(t)
            return t.data_ptr()

        self.quantized_bytes = 0  # bytes of the matrices read in ggml blocks rather than fp32
        layers = (RjLayer * cfg.n_layers)()
        for i, layer in enumerate(model.layers):
            attn = layer.attn
            fields = {f: weight(f"layers.{i}.{name}.weight") for f, name in _LAYER_WEIGHTS.items()}
            bias = {f"b{c}": vec(getattr(attn, f"w{c}").bias) for c in "qkv"}
            layers[i] = RjLayer(
                **fields,
                **bias,
                attn_norm=vec(layer.attn_norm.weight),
                ffn_norm=vec(layer.ffn_norm.weight),
                k_cache=_ptr(attn.cache.k),
                v_cache=_ptr(attn.cache.v),
            )
        self._layers = layers
        self._cache_ptr = attn.cache.k.data_ptr()
        self.max_batch = attn.cache.k.shape[0]  # one sequence per KV-cache slot
        self.m = RjModel(
            dim=cfg.dim,
            n_layers=cfg.n_layers,
            n_heads=cfg.n_heads,
            n_kv_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim,
            ffn_dim=cfg.ffn_dim,
            vocab=cfg.vocab_size,
            max_seq=model.max_seq,
            threads=max(1, threads),
            n_slots=self.max_batch,
            norm_eps=cfg.norm_eps,
            embed=vec(model.embed.weight),
            rope_cos=vec(model.rope_cos),
            rope_sin=vec(model.rope_sin),
            final_norm=vec(model.norm.weight),
            output=weight("output.weight"),
            layers=layers,
        )
        self._mref = ctypes.byref(self.m)
        self._work = torch.empty(self.lib.rj_decode_floats(self._mref, self.max_batch), dtype=torch.float32)
        self._logits = torch.empty(self.max_batch, cfg.vocab_size, dtype=torch.float32)
        self._args = torch.empty(3, self.max_batch, dtype=torch.int32)  # tokens, positions, slots
        self._prefill_work = torch.empty(self.lib.rj_prefill_floats(self._mref, PREFILL_CHUNK), dtype=torch.float32)

    def step(self, token: int, pos: int, slot: int = 0) -> torch.Tensor:
        """Run `token` at position `pos` of cache slot `slot` (which holds 0..pos-1); returns logits
        [V] fp32. The returned tensor is reused by the next step: copy it to keep it."""
        return self.step_batch([token], [pos], [slot])[0]

    def step_batch(self, tokens: Sequence[int], positions: Sequence[int], slots: Sequence[int]) -> torch.Tensor:
        """One token for each of B sequences (distinct slots, B <= max_batch) -> logits [B, V],
        in a buffer the next step reuses."""
        n = len(tokens)
        if not 0 < n <= self.max_batch or len(positions) != n or len(slots) != n:
            raise ValueError(f"a batch is 1..{self.max_batch} tokens with a position and a slot each")
        self._check_cache()
        args = self._args[:, :n]
        args.copy_(torch.tensor([list(tokens), list(positions), list(slots)], dtype=torch.int32))
        if self.lib.rj_decode_batch(self._mref, n, args[0].data_ptr(), args[1].data_ptr(), args[2].data_ptr(),
                                    self._logits.data_ptr(), self._work.data_ptr()) != 0:
            raise ValueError(f"tokens {list(tokens)}, positions {list(positions)} or slots {list(slots)} out of "
                             f"range (vocab {self.m.vocab}, cache {self.m.max_seq}, {self.max_batch} slots) "
                             "or a slot given twice")
        return self._logits[:n]

    def prefill(self, tokens: Sequence[int], pos: int, slot: int = 0) -> torch.Tensor:
        """Run `tokens` at positions pos.. of slot `slot` (which holds 0..pos-1); returns the last
        one's logits [V]. Reused buffer, as for `step`."""
        self._check_cache()
        for i in range(0, len(tokens), PREFILL_CHUNK):
            chunk = torch.tensor(tokens[i : i + PREFILL_CHUNK], dtype=torch.int32)
            rc = self.lib.rj_prefill(self._mref, chunk.data_ptr(), chunk.numel(), pos + i, slot,
                                     self._logits.data_ptr(), self._prefill_work.data_ptr())
            if rc != 0:
                raise ValueError(f"tokens out of range (vocab {self.m.vocab}), slot {slot} not one of "
                                 f"{self.max_batch} or positions {pos + i}..{pos + i + chunk.numel() - 1} "
                                 f"past the cache ({self.m.max_seq})")
        return self._logits[0]

    def _check_cache(self) -> None:
        if self.model.layers[-1].attn.cache.k.data_ptr() != self._cache_ptr:
            raise RuntimeError("the model's KV cache was reallocated; build a new NativeDecoder")
