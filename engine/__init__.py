"""Rejoinder's generation engine: Llama-family decoding with a KV-cache slot per session.

    from rejoinder.engine import Engine, SamplingParams
    engine = Engine.load("model.gguf")            # or an HF safetensors folder
    async for ev in engine.stream(messages, SamplingParams(temperature=0.7, seed=1), slot="session-1"):
        print(ev.text, end="")
    engine.release_slot("session-1")              # the session ended

Generations of different sessions (`slot=`) run concurrently, their decode steps batched into one
pass over the weights; each session's follow-up prefills only what its slot does not hold yet.
"""
from .config import ModelConfig
from .engine import Engine, EngineOptions, GenerationStats, TokenEvent, TokenStream
from .errors import ContextOverflow, ModelFileError
from .kv_slots import SlotKey
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
    "SlotKey",
    "TokenEvent",
    "TokenStream",
]
