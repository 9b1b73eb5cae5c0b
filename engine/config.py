"""Shape and numerics of a Llama-family decoder, independent of the file format it came from."""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ModelFileError


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling (`rope_type: llama3`); factor 1 means none."""

    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    head_dim: int = 0  # 0: dim // n_heads
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_position: int = 4096
    tie_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 has q/k/v biases
    rope_scaling: RopeScaling | None = None
    architecture: str = "llama"
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ModelFileError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
