"""Semantic end of turn: how likely the user's words so far complete their turn.

The already-loaded chat model is asked what comes after the user's text, rendered into the chat
template as an open user message: if the next token is likely the end of the message, or a
sentence-final punctuation mark, the turn reads as complete ("What time is it"); if the model
expects more words ("I'd like to book a table for"), it does not. Trailing punctuation is removed
from the text first: Whisper puts a period after fragments too, which would tell the model the
sentence ended. Ellipsis tokens do not count as an end (they announce more to come).

Measured on the embedded SmolLM2-135M (persona as system prompt): complete turns score 0.008-0.9
("What time is it" 0.21, "Tell me a joke" 0.05, "Can you recommend a good book" 0.008), incomplete
ones 0.0000-0.006 ("I'd like to book a table for" 0.0007). The scoring prompt shares its prefix
with the reply prompt, so the KV cache it fills is reused when the answer is generated -- provided
both run in the same session's cache slot: pass the session's `slot` to `ascore` / `score` and to
`Engine.stream`.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import cast

import torch

from .engine import Engine
from .kv_slots import SlotKey
from .tokenizer import Message

_TRAILING = re.compile(r"[\s.,;:!?…\-–—\"'”’)]+$")
_SENTINEL = "\u2063REJOINDER_USER_TEXT\u2063"


def strip_trailing_punctuation(text: str) -> str:
    return _TRAILING.sub("", text.strip())


def _is_sentence_end(piece: str) -> bool:
    s = piece.strip()
    return bool(s) and s[0] in ".?!" and not s.startswith("..") and len(s) <= 3 and s.rstrip("\"'”’)") != ""


class EndOfTurnScorer:
    """P(the user's turn is complete | conversation so far, user's words), on the engine's own model."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        tok = engine.tokenizer
        ends = set(tok.stop_ids)
        for i in range(tok.vocab_size):
            if _is_sentence_end(tok.decode([i], skip_special=False)):
                ends.add(i)
        self.end_ids = torch.tensor(sorted(ends), dtype=torch.long)

    @classmethod
    def shared(cls, engine: Engine) -> EndOfTurnScorer:
        """One scorer per engine (building the end-token set walks the whole vocabulary), kept in
        the slot the engine declares for it, so it lives exactly as long as the engine."""
        if engine._end_of_turn_scorer is None:
            engine._end_of_turn_scorer = cls(engine)
        return cast(EndOfTurnScorer, engine._end_of_turn_scorer)

    def prompt_ids(self, history: Sequence[Message], user_text: str) -> list[int]:
        """The chat rendered up to the end of `user_text`, the user message left open."""
        tok = self.engine.tokenizer
        rendered = tok.render_chat(list(history) + [{"role": "user", "content": _SENTINEL}],
                                   add_generation_prompt=False)
        cut = rendered.index(_SENTINEL)
        return tok.encode(rendered[:cut] + strip_trailing_punctuation(user_text))

    def score(self, history: Sequence[Message], user_text: str, slot: SlotKey = None) -> float:
        """Runs the model in the session's cache `slot` (blocks until the engine thread has run it;
        from asyncio use `ascore`)."""
        if not strip_trailing_punctuation(user_text):
            return 0.0
        probs = self.engine.next_token_probs(self.prompt_ids(history, user_text), slot=slot)
        return float(probs[self.end_ids.to(probs.device)].sum())

    async def ascore(self, history: Sequence[Message], user_text: str, slot: SlotKey = None) -> float:
        """`score` on the engine thread, after the work queued before it for the same slot and between
        the decode steps of other sessions."""
        return await self.engine.run_async(self.score, list(history), user_text, slot, slot=slot)
