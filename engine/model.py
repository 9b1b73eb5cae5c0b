"""A Llama-family decoder with a static KV cache (gpt-fast style: plain modules, one forward).

Weights are always in the Hugging Face layout: Q/K rows in "rotate-half" order. Loaders for formats
that store them otherwise (GGUF permutes them for llama.cpp's interleaved RoPE) undo that on load,
so this file has a single RoPE.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig, RopeScaling


def rope_frequencies(cfg: ModelConfig, device: torch.device | str | None = None) -> Tensor:
    half = cfg.head_dim // 2
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, half, dtype=torch.float64, device=device) / half))
    sc: RopeScaling | None = cfg.rope_scaling
    if sc is not None and sc.factor != 1.0:
        # Llama 3.x: long wavelengths are slowed by `factor`, short ones kept, a smooth ramp between.
        low_wl = sc.original_max_position / sc.low_freq_factor
        high_wl = sc.original_max_position / sc.high_freq_factor
        wl = 2 * math.pi / inv
        smooth = (sc.original_max_position / wl - sc.low_freq_factor) / (sc.high_freq_factor - sc.low_freq_factor)
        scaled = torch.where(wl > low_wl, inv / sc.factor, inv)
        mid = (wl <= low_wl) & (wl >= high_wl)
        scaled = torch.where(mid, (1 - smooth) * inv / sc.factor + smooth * inv, scaled)
        inv = scaled
    divisors = cfg.extra.get("rope_freq_divisors")  # Llama 3 GGUFs store the same scaling as a tensor
    if divisors is not None:
        inv = inv / divisors.to(inv)
    return inv.float()


def rope_tables(cfg: ModelConfig, max_seq: int, device=None) -> tuple[Tensor, Tensor]:
    inv = rope_frequencies(cfg, device)
    t = torch.arange(max_seq, dtype=torch.float32, device=device)
    angles = torch.outer(t, inv)  # [S, hd/2]
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, H, T, hd]; cos/sin: [T, hd/2]. Rotate-half convention."""
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos[None, None], sin[None, None]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class KVCache(nn.Module):
    """K and V of `slots` independent sequences (one per session): [slots, n_kv, max_seq, head_dim].

    Allocated uninitialised: a sequence only ever reads the positions it has written."""

    def __init__(self, slots: int, n_kv: int, max_seq: int, head_dim: int, dtype: torch.dtype, device=None):
        super().__init__()
        shape = (slots, n_kv, max_seq, head_dim)
        self.register_buffer("k", torch.empty(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.empty(shape, dtype=dtype, device=device), persistent=False)

    def write(self, start: int, k: Tensor, v: Tensor, slot: int = 0) -> tuple[Tensor, Tensor]:
        """Store k, v [B, n_kv, T, hd] at positions start.. of slots slot..slot+B-1; returns those
        slots' K and V up to the last position written."""
        rows, end = slice(slot, slot + k.shape[0]), start + k.shape[2]
        self.k[rows, :, start:end] = k
        self.v[rows, :, start:end] = v
        return self.k[rows, :, :end], self.v[rows, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=cfg.attention_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.attention_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.attention_bias)
        self.wo = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x: Tensor, start: int, cos: Tensor, sin: Tensor, slot: int = 0) -> Tensor:
        b, t, _ = x.shape
        hd = self.cfg.head_dim
        q = self.wq(x).view(b, t, self.cfg.n_heads, hd).transpose(1, 2)
        k = self.wk(x).view(b, t, self.cfg.n_kv_heads, hd).transpose(1, 2)
        v = self.wv(x).view(b, t, self.cfg.n_kv_heads, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is not None:
            k, v = self.cache.write(start, k, v, slot)
        total = k.shape[2]
        if t == 1:
            mask = None  # one new query sees the whole (already causal) cache
            causal = False
        elif total == t:
            mask, causal = None, True
        else:
            q_pos = torch.arange(start, start + t, device=x.device)[:, None]
            mask = torch.arange(total, device=x.device)[None, :] <= q_pos
            causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w_gate = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w_up = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w_down = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = FeedForward(cfg)

    def forward(self, x: Tensor, start: int, cos: Tensor, sin: Tensor, slot: int = 0) -> Tensor:
        x = x + self.attn(self.attn_norm(x), start, cos, sin, slot)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.embed.weight
        self.max_seq = 0
        self.rope_cos: Tensor | None = None
        self.rope_sin: Tensor | None = None

    def setup_cache(self, max_seq: int, slots: int = 1) -> None:
        """Allocate the static KV cache once, `slots` sequences of up to `max_seq` tokens each;
        decoding then allocates nothing per token for it."""
        p = self.output.weight
        self.max_seq = max_seq
        for layer in self.layers:
            layer.attn.cache = KVCache(slots, self.cfg.n_kv_heads, max_seq, self.cfg.head_dim, p.dtype, p.device)
        self.rope_cos, self.rope_sin = rope_tables(self.cfg, max_seq, p.device)

    def copy_cache_prefix(self, src: int, dst: int, n: int) -> None:
        """Cache slot `dst` gets the K/V of positions 0..n-1 of slot `src` (the same tokens there)."""
        for layer in self.layers:
            cache = layer.attn.cache
            cache.k[dst, :, :n] = cache.k[src, :, :n]
            cache.v[dst, :, :n] = cache.v[src, :, :n]

    def forward(self, tokens: Tensor, start: int = 0, last_only: bool = False, slot: int = 0) -> Tensor:
        """tokens [B, T] at positions start..start+T-1 -> logits [B, T, V] (or [B, 1, V]); with a
        cache, row b reads and writes cache slot `slot + b`."""
        t = tokens.shape[1]
        if self.max_seq and start + t > self.max_seq:
            raise ValueError(f"context overflow: {start + t} tokens > cache of {self.max_seq}")
        if self.rope_cos is None or self.rope_cos.shape[0] < start + t:  # no cache: plain full forward
            self.rope_cos, self.rope_sin = rope_tables(self.cfg, start + t, tokens.device)
        cos = self.rope_cos[start : start + t]
        sin = self.rope_sin[start : start + t]
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, start, cos, sin, slot)
        x = self.norm(x)
        if last_only:
            x = x[:, -1:]
        return self.output(x).float()
