"""Which models does the agent run on? The embedded (or configured) models, loaded once per process.

Every live session of a process shares one `Models`: one engine (its KV cache and worker thread),
one Whisper, one Piper voice, one Silero network (each session keeps its own VAD state on it:
`SileroVAD.new_stream`).
"""
from __future__ import annotations

import time

from rejoinder.engine import Engine, EngineOptions
from rejoinder.streaming.asr import DEFAULT_CONTEXT_PAD_S, WhisperASR
from rejoinder.streaming.assets import resolve
from rejoinder.streaming.tts import PiperTTS, default_tts_threads
from rejoinder.streaming.vad import SileroVAD

from .config import AgentConfig


class Models:
    """The embedded (or user-given) models, loaded once."""

    def __init__(self, cfg: AgentConfig):
        t0 = time.perf_counter()
        self.engine = Engine.load(
            resolve("llm", cfg.llm_model or None),
            EngineOptions(max_seq_len=cfg.max_context, device=cfg.device, threads=cfg.threads,
                          backend=cfg.llm_backend, kv_slots=cfg.kv_slots),
        )
        self.asr = WhisperASR(resolve("asr", cfg.asr_model or None), language=cfg.language or None,
                              context_pad_s=None if cfg.asr_full_window else DEFAULT_CONTEXT_PAD_S)
        # Piper takes every core when the answer's decoding pauses for it (synthesis_hold_s), half otherwise.
        self.tts = PiperTTS(resolve("tts", cfg.tts_model or None),
                            threads=cfg.tts_threads or default_tts_threads(share_cpu=cfg.synthesis_hold_s == 0))
        self.vad_path = resolve("vad", cfg.vad_model or None)
        self.vad = SileroVAD(self.vad_path)  # the loaded network; each session streams on it (new_stream)
        self.load_s = time.perf_counter() - t0

    def close(self) -> None:
        self.engine.close()
