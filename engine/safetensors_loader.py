"""Load an HF-style folder: config.json + *.safetensors (+ tokenizer.json) into our layout."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig, RopeScaling
from .errors import ModelFileError

_SUPPORTED = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}
_LAYER_MAP = {
    "self_attn.q_proj": "attn.wq",
    "self_attn.k_proj": "attn.wk",
    "self_attn.v_proj": "attn.wv",
    "self_attn.o_proj": "attn.wo",
    "mlp.gate_proj": "ffn.w_gate",
    "mlp.up_proj": "ffn.w_up",
    "mlp.down_proj": "ffn.w_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def read_config(folder: Path) -> tuple[ModelConfig, dict[str, Any]]:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelFileError(f"{folder} has no config.json (expected an HF-style model folder)")
    try:
        raw = json.loads(path.read_text())
    except ValueError as exc:
        raise ModelFileError(f"{path} is not valid JSON: {exc}") from None
    archs = set(raw.get("architectures") or [])
    if not archs & _SUPPORTED:
        raise ModelFileError(f"unsupported architecture {sorted(archs)}; Rejoinder runs {sorted(_SUPPORTED)}")
    try:
        return _config(raw, archs), raw
    except ModelFileError:
        raise
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:  # a field missing, or not a number
        raise ModelFileError(f"{path} lacks or garbles a field the model needs ({type(exc).__name__}: {exc})") from None


def _config(raw: dict[str, Any], archs: set[str]) -> ModelConfig:
    scaling = None
    # transformers >= 5 writes `rope_parameters` (theta included); older configs `rope_scaling` + `rope_theta`
    rs = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    theta = raw.get("rope_theta") or rs.get("rope_theta") or 10000.0
    if rs and (rs.get("rope_type") or rs.get("type")) == "llama3":
        scaling = RopeScaling(
            factor=float(rs["factor"]),
            low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
            original_max_position=int(rs.get("original_max_position_embeddings", 8192)),
        )
    elif rs and (rs.get("rope_type") or rs.get("type")) not in (None, "default"):
        raise ModelFileError(f"RoPE scaling {rs} is not supported")
    n_heads = int(raw["num_attention_heads"])
    is_qwen = "Qwen2ForCausalLM" in archs
    return ModelConfig(
        vocab_size=int(raw["vocab_size"]),
        dim=int(raw["hidden_size"]),
        n_layers=int(raw["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(raw.get("num_key_value_heads") or n_heads),
        ffn_dim=int(raw["intermediate_size"]),
        head_dim=int(raw.get("head_dim") or raw["hidden_size"] // n_heads),
        rope_theta=float(theta),
        norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        max_position=int(raw.get("max_position_embeddings", 4096)),
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", is_qwen)),
        rope_scaling=scaling,
        architecture="qwen2" if is_qwen else "llama",
    )


def generation_eos_ids(folder: Path, raw_config: dict[str, Any]) -> list[int]:
    ids: list[int] = []
    for source in (raw_config, _read_json(folder / "generation_config.json")):
        eos = source.get("eos_token_id")
        ids.extend(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
    return ids


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}


def load_safetensors_folder(folder: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg, raw = read_config(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelFileError(f"{folder} has no *.safetensors weight files")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors = load_file(str(f))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelFileError(f"{f.name} is not a valid safetensors file: {exc}") from None
        for name, t in tensors.items():
            state[_rename(name)] = t
    state = {k: v for k, v in state.items() if k}
    if cfg.tie_embeddings or "output.weight" not in state:
        state["output.weight"] = state["embed.weight"]
        cfg = ModelConfig(**{**cfg.__dict__, "tie_embeddings": True})
    return cfg, state, raw


def _rename(name: str) -> str:
    if name == "model.embed_tokens.weight":
        return "embed.weight"
    if name == "model.norm.weight":
        return "norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_MAP:
        return f"layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}.{m.group(3)}"
    if name.endswith("rotary_emb.inv_freq"):
        return ""  # recomputed from the config
    raise ModelFileError(f"unexpected tensor {name!r} in safetensors checkpoint")
