"""Read a GGUF file (llama.cpp's format) into a ModelConfig and an HF-layout state dict.

Quantised tensors (Q4_0, Q4_1, Q8_0, K-quants, …) are dequantised with the `gguf` package's own
reference code. llama.cpp's converter permutes the rows of Q and K for its interleaved RoPE; we undo
that here so the model code has one RoPE convention (rotate-half).

With ``keep_blocks``, Q4_0 / Q4_1 / Q8_0 matrices are also kept as their raw ggml blocks (rows
permuted the same way), for the native CPU decode step, which multiplies them without expanding.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..kernels.ggml import BLOCK_BYTES, GGMLWeight
from .config import ModelConfig
from .errors import ModelFileError

GGUF_MAGIC = b"GGUF"
# Architectures whose converter applies the Q/K permutation (llama.cpp's LLM_ARCH_LLAMA family).
_PERMUTED_ARCHS = {"llama", "mistral", "granite"}
_SUPPORTED_ARCHS = _PERMUTED_ARCHS | {"qwen2"}

_TENSOR_MAP = {
    "attn_q": "attn.wq",
    "attn_k": "attn.wk",
    "attn_v": "attn.wv",
    "attn_output": "attn.wo",
    "attn_norm": "attn_norm",
    "ffn_norm": "ffn_norm",
    "ffn_gate": "ffn.w_gate",
    "ffn_up": "ffn.w_up",
    "ffn_down": "ffn.w_down",
}


@dataclass
class GGUFContents:
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any]
    # HF-layout name -> raw ggml blocks, for the matrices stored as Q4_0 / Q4_1 / Q8_0 (keep_blocks)
    blocks: dict[str, GGMLWeight] = field(default_factory=dict)


def _raw_blocks(tensor) -> GGMLWeight | None:
    """The tensor's bytes as [rows, row_bytes] blocks, when it is a Q4_0 / Q4_1 / Q8_0 matrix."""
    kind = int(tensor.tensor_type)
    if kind not in BLOCK_BYTES or len(tensor.shape) != 2:
        return None
    cols, rows = (int(d) for d in tensor.shape)
    raw = np.array(tensor.data, dtype=np.uint8, copy=True).reshape(rows, -1)
    return GGMLWeight(torch.from_numpy(raw), kind, rows, cols)


def _field_value(field) -> Any:
    from gguf import GGUFValueType

    types = field.types
    if not types:
        return None
    if types[0] == GGUFValueType.ARRAY:
        inner = types[-1]
        if inner == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        return [field.parts[i].tolist()[0] if len(field.parts[i]) == 1 else field.parts[i].tolist() for i in field.data]
    if types[0] == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    value = field.parts[field.data[0]].tolist()
    return value[0] if len(value) == 1 else value


def _check_header(path: Path) -> None:
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise ModelFileError(f"{path.name} is not a GGUF file (magic {head!r}, expected b'GGUF')")


def read_metadata(path: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    path = Path(path)
    _check_header(path)
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        meta = {name: _field_value(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    except ModelFileError:
        raise
    except Exception as exc:  # the gguf package raises assorted errors on truncated/corrupt files
        raise ModelFileError(f"{path.name} is a damaged or truncated GGUF file ({type(exc).__name__}: {exc})") from None
    return reader, meta


def config_from_metadata(meta: dict[str, Any], tensor_names: set[str]) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in _SUPPORTED_ARCHS:
        raise ModelFileError(f"unsupported GGUF architecture {arch!r}; Rejoinder runs {sorted(_SUPPORTED_ARCHS)}")

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ModelFileError(f"GGUF metadata lacks {arch}.{name}")
        return value

    n_heads = int(key("attention.head_count"))
    dim = int(key("embedding_length"))
    n_kv = key("attention.head_count_kv", n_heads)
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or [])
    head_dim = int(meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count")
                   or dim // n_heads)
    scaling = None
    if meta.get(f"{arch}.rope.scaling.type") == "linear":
        raise ModelFileError("linear RoPE scaling GGUFs are not supported")
    return ModelConfig(
        vocab_size=int(vocab),
        dim=dim,
        n_layers=int(key("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(n_kv),
        ffn_dim=int(key("feed_forward_length")),
        head_dim=head_dim,
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        max_position=int(meta.get(f"{arch}.context_length", 4096)),
        tie_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        rope_scaling=scaling,
        architecture=arch,
    )


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp convert's `permute`: interleaved RoPE rows -> rotate-half rows."""
    rows = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest)


def _dequantize(tensor) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = tensor.tensor_type
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
        arr = dequantize(tensor.data, qtype) if qtype == GGMLQuantizationType.BF16 else np.asarray(tensor.data)
        return arr.astype(np.float32, copy=False).reshape(shape)
    return dequantize(tensor.data, qtype).reshape(shape)


def load_gguf(
    path: str | os.PathLike,
    progress: Callable[[int, int], None] | None = None,
    keep_blocks: bool = False,
) -> GGUFContents:
    reader, meta = read_metadata(path)
    names = {t.name for t in reader.tensors}
    cfg = config_from_metadata(meta, names)
    state: dict[str, torch.Tensor] = {}
    blocks: dict[str, GGMLWeight] = {}
    rope_freqs = None
    total = len(reader.tensors)
    for i, tensor in enumerate(reader.tensors):
        try:
            arr = _dequantize(tensor)
        except Exception as exc:
            raise ModelFileError(f"cannot decode tensor {tensor.name} ({tensor.tensor_type.name}): {exc}") from None
        t = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True))  # the reader memory-maps read-only
        name = tensor.name
        raw = _raw_blocks(tensor) if keep_blocks else None
        if name == "token_embd.weight":
            state["embed.weight"] = t
            if raw is not None:
                blocks["embed.weight"] = raw
        elif name == "output_norm.weight":
            state["norm.weight"] = t
        elif name == "output.weight":
            state["output.weight"] = t
            if raw is not None:
                blocks["output.weight"] = raw
        elif name == "rope_freqs.weight":
            rope_freqs = t
        elif name.startswith("blk."):
            _, idx, kind, param = name.split(".", 3)
            if kind not in _TENSOR_MAP:
                raise ModelFileError(f"unexpected tensor {name} in a {cfg.architecture} GGUF")
            if cfg.architecture in _PERMUTED_ARCHS and kind in ("attn_q", "attn_k"):
                heads = cfg.n_heads if kind == "attn_q" else cfg.n_kv_heads
                t = unpermute_qk(t, heads)
                if raw is not None:  # whole rows move, and a row is whole blocks
                    raw = GGMLWeight(unpermute_qk(raw.data, heads).contiguous(), raw.type, raw.rows, raw.cols)
            state[f"layers.{idx}.{_TENSOR_MAP[kind]}.{param}"] = t
            if raw is not None:
                blocks[f"layers.{idx}.{_TENSOR_MAP[kind]}.{param}"] = raw
        else:
            raise ModelFileError(f"unexpected tensor {name} in GGUF")
        if progress:
            progress(i + 1, total)
    if rope_freqs is not None:
        # Llama 3.x GGUFs carry the long-context scaling as explicit per-frequency divisors.
        cfg.extra["rope_freq_divisors"] = rope_freqs
    if cfg.tie_embeddings:
        state["output.weight"] = state["embed.weight"]
        if "embed.weight" in blocks:
            blocks["output.weight"] = blocks["embed.weight"]
    _check_shapes(cfg, state, Path(path).name)
    return GGUFContents(cfg, state, meta, blocks)


def _check_shapes(cfg: ModelConfig, state: dict[str, torch.Tensor], name: str) -> None:
    want = {
        "embed.weight": (cfg.vocab_size, cfg.dim),
        "layers.0.attn.wq.weight": (cfg.n_heads * cfg.head_dim, cfg.dim),
        "layers.0.attn.wk.weight": (cfg.n_kv_heads * cfg.head_dim, cfg.dim),
        "layers.0.ffn.w_gate.weight": (cfg.ffn_dim, cfg.dim),
    }
    for key, shape in want.items():
        got = tuple(state[key].shape) if key in state else None
        if got != shape:
            raise ModelFileError(f"{name}: tensor {key} has shape {got}, metadata implies {shape}")
    missing = [f"layers.{i}" for i in range(cfg.n_layers) if f"layers.{i}.attn.wq.weight" not in state]
    if missing:
        raise ModelFileError(f"{name}: missing tensors for {missing[:3]}…")
