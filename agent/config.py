"""One typed configuration object for the whole agent, with sane defaults.

Precedence: CLI flag > environment variable (REJOINDER_<FIELD>, e.g. REJOINDER_LLM_MODEL) > default.
Model paths left empty mean "the embedded model" (resolved by rejoinder.streaming.assets).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from typing import Any, Mapping

DEFAULT_PERSONA = (
    "You are a helpful AI assistant named Rejoinder. Keep every answer short: one or two sentences, "
    "suitable to be spoken aloud."
)


@dataclass(frozen=True)
class AgentConfig:
    # models (empty: embedded default)
    llm_model: str = ""
    asr_model: str = ""
    tts_model: str = ""
    vad_model: str = ""
    # conversation
    persona: str = DEFAULT_PERSONA
    greeting: str = "Hi, I'm Rejoinder. How can I help?"
    # generation
    max_new_tokens: int = 120
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_context: int = 2048
    device: str = "cpu"
    threads: int = 0  # 0: all cores
    llm_backend: str = "auto"  # decode steps: auto, native (compiled CPU step), triton (CUDA), eager
    # audio input limits
    max_input_seconds: float = 120.0
    language: str = "en"
    # ASR: Whisper's encoder sees the audio plus a few seconds (2.6x faster, same accuracy: see
    # streaming/asr.py); True restores faster-whisper's fixed 30 s window.
    asr_full_window: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "AgentConfig":
        """Defaults, then REJOINDER_* environment variables, then explicit overrides (CLI flags)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"REJOINDER_{f.name.upper()}")
            if raw is not None and raw != "":
                values[f.name] = _coerce(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes: Any) -> "AgentConfig":
        return dataclasses.replace(self, **changes)


def _coerce(f: dataclasses.Field, raw: str) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
        if kind.startswith("bool"):
            return raw.lower() in ("1", "true", "yes", "on")
    except ValueError:
        raise ValueError(f"REJOINDER_{f.name.upper()}={raw!r} is not a valid {kind}") from None
    return raw
