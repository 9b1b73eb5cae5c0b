"""Which models do the plugins run on? Rejoinder's embedded ones by default, and one engine shared.

Every plugin resolves its model through `rejoinder.streaming.assets.resolve` (the VAD, Whisper, the
LLM and the Piper voice ship in PyPI packages; a path overrides any of them). The LLM and the turn
detector run on the same `Engine` unless told otherwise: `shared_engine`.
"""
from __future__ import annotations

import functools

from rejoinder.engine import Engine, EngineOptions
from rejoinder.streaming.assets import resolve

__all__ = ["PROVIDER", "shared_engine"]

#: What every plugin reports as its `provider` (livekit-agents metrics and logs carry it).
PROVIDER = "rejoinder"


@functools.lru_cache(maxsize=4)
def shared_engine(model_path: str | None = None, max_seq_len: int = 2048, device: str = "cpu") -> Engine:
    """One Engine per model path, so the LLM and the turn detector share a KV cache by default.

    Sharing matters beyond memory: the turn detector's prompt is the chat so far plus the user's words,
    which is exactly the prefix the next answer starts with, so scoring pre-fills most of the answer's
    prompt and the answer reuses it.
    """
    return Engine.load(resolve("llm", model_path), EngineOptions(max_seq_len=max_seq_len, device=device))
