"""When has the user finished their turn? `TurnDetector`, livekit-agents' turn-detector protocol on our score.

The score (`rejoinder.engine.end_of_turn`) is computed on the LLM's own engine, so with the default
`shared_engine` the scoring pass pre-fills the prefix the answer then reuses.
"""
from __future__ import annotations

import asyncio
from collections.abc import Sequence

from livekit.agents import llm
from livekit.agents.language import LanguageCode

from rejoinder.engine import Engine
from rejoinder.engine.end_of_turn import EndOfTurnScorer

from .chat import Message, chat_messages, tool_as_user
from .log import logger
from .models import PROVIDER, shared_engine

__all__ = ["TurnDetector"]


class TurnDetector:
    """livekit-agents' turn-detector protocol on our semantic end-of-turn score (`engine.end_of_turn`).

    The score is the probability that the engine's model would close the user's (still open) message
    next. Below `unlikely_threshold` the framework waits up to its max endpointing delay for more
    words; above, it ends the turn after the min delay. Measured on the embedded SmolLM2-135M:
    complete turns score 0.008-0.9, sentences cut mid-phrase 0.0000-0.006.
    """

    def __init__(
        self,
        *,
        engine: Engine | None = None,
        model_path: str | None = None,
        unlikely_threshold: float = 0.007,
        languages: Sequence[str] | None = ("en",),
        max_messages: int = 8,
    ) -> None:
        self._engine = engine if engine is not None else shared_engine(model_path)
        self._scorer = EndOfTurnScorer.shared(self._engine)
        self._threshold = unlikely_threshold
        self._languages = None if languages is None else {LanguageCode(lang).language for lang in languages}
        self._max_messages = max_messages

    @property
    def model(self) -> str:
        return "rejoinder-eot"

    @property
    def provider(self) -> str:
        return PROVIDER

    async def unlikely_threshold(self, language: LanguageCode | None) -> float | None:
        return self._threshold if await self.supports_language(language) else None

    async def supports_language(self, language: LanguageCode | None) -> bool:
        if self._languages is None or language is None:
            return True
        return LanguageCode(str(language)).language in self._languages

    async def predict_end_of_turn(self, chat_ctx: llm.ChatContext, *, timeout: float | None = 3.0) -> float:
        messages = chat_messages(chat_ctx)
        if not messages or messages[-1]["role"] != "user":
            return 1.0  # no user words pending: nothing to wait for
        # The system prompt stays: it is the prefix the answer's prompt starts with, so the KV cache
        # this pass fills is the one the answer reuses.
        system = messages[:1] if messages[0]["role"] == "system" else []
        history = system + messages[len(system) : -1][-self._max_messages :]
        text = messages[-1]["content"]
        fut = asyncio.ensure_future(self._score(history, text))
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            # The engine thread is busy (an answer is being generated): a late score is no score, and
            # holding the turn open for it would only add delay. The pass still finishes on its own.
            logger.warning("end-of-turn score not ready within %.1f s; treating the turn as complete", timeout)
            return 1.0

    async def _score(self, history: list[Message], text: str) -> float:
        try:
            return await self._scorer.ascore(history, text)
        except Exception:
            if not any(m["role"] == "tool" for m in history):
                raise
            return await self._scorer.ascore(tool_as_user(history), text)
