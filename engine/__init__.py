"""Rejoinder's generation engine: Llama-family decoding with a reusable KV cache.

    from rejoinder.engine import Engine, SamplingParams
    engine = Engine.load("model.gguf")            # or an HF safetensors folder
    async for ev in engine.stream(messages, SamplingParams(temperature=0.7, seed=1)):
        print(ev.text, end="")
"""
from .config import ModelConfig
from .engine import Engine, EngineOptions, GenerationStats, TokenEvent, TokenStream
from .errors import ContextOverflow, ModelFileError
from .sampling import RepetitionGuard, SamplingParams
from .tokenizer import ChatTokenizer

__all__ = [
    "ChatTokenizer",
    "ContextOverflow",
    "Engine",
    "EngineOptions",
    "GenerationStats",
    "ModelConfig",
    "ModelFileError",
    "RepetitionGuard",
    "SamplingParams",
    "TokenEvent",
    "TokenStream",
]
