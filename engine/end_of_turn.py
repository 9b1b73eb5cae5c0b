"""Semantic end of turn: how likely the user's words so far complete their turn.

The already-loaded chat model is asked what comes after the user's text, rendered into the chat
template as an open user message: if the next token is likely the end of the message, or a
sentence-final punctuation mark, the turn reads as complete ("What time is it"); if the model
expects more words ("I'd like to book a table for"), it does not. Trailing punctuation is removed
from the text first: Whisper puts a period after fragments too, which would tell the model the
sentence ended. Ellipsis tokens do not count as an end (they announce more to come).

What the model cannot see, the text still says: a turn that trails off in a hesitation ("uh", "um",
"hmm"), a connective ("and", "or", "but", "because"; "so" and "like" after a comma or alone; "well"
after hesitations only: "Hmm, well", not "Oh, well") or an
ellipsis ("Well...", "What time is it…") is unfinished, whatever the model makes of the words before
it ("What time is it, um" scores 0.18 without this rule). Such a turn's probability is multiplied by
`UNFINISHED_FACTOR`, which puts it below TurnTakingConfig's complete_prob (0.02) for any model score
while keeping the model's ordering (bench/eot_accuracy.py measures both).

Measured on the embedded SmolLM2-135M (persona as system prompt): complete turns score 0.008-0.9
("What time is it" 0.21, "Tell me a joke" 0.05, "Can you recommend a good book" 0.008), incomplete
ones 0.0000-0.006 ("I'd like to book a table for" 0.0007). The scoring prompt shares its prefix
with the reply prompt, so the KV cache it fills is reused when the answer is generated -- provided
both run in the same session's cache slot: pass the session's `slot` to `ascore` / `score` and to
`Engine.stream`.

When Whisper was unsure of the last word(s), `score_unsure_tail` weighs the two readings by how
likely the model finds that tail after the words before it (`unsure_tail_prob`).
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

UNFINISHED_FACTOR = 0.01  # P(end) of a turn that trails off (filler, connective, ellipsis) is scaled by this
_ELLIPSIS_END = re.compile(r"(\.\.|…)[\s\"'”’)]*$")
_WORD = re.compile(r"[\w'’-]+")
_HESITATIONS = frozenset({"uh", "um", "umm", "uhm", "uhh", "er", "erm", "ah", "eh", "hmm", "hm", "mm", "mmm"})
_CONNECTIVES = frozenset({"and", "or", "but", "because"})
_SOFT_CONNECTIVES = frozenset({"so", "like"})  # "I think so", "I'd like": only after a comma or alone
_PHRASES = (("you", "know"), ("i", "mean"))  # "…, you know" / "…, I mean": only after a comma


def strip_trailing_punctuation(text: str) -> str:
    return _TRAILING.sub("", text.strip())


def trails_off(text: str) -> bool:
    """Does `text` end in a hesitation, a dangling connective or an ellipsis (the speaker is not done)?

    A question mark after a connective is a question of its own ("And?", "So?"), not a trail-off.
    """
    raw = text.strip()
    if _ELLIPSIS_END.search(raw):
        return True
    body = strip_trailing_punctuation(raw)
    words = _WORD.findall(body.lower())
    if not words:
        return False
    last = words[-1].strip("-'’")
    if last in _HESITATIONS:
        return True
    if raw.rstrip("\"'”’) ").endswith("?"):
        return False
    before = body[: body.lower().rfind(last)].rstrip()  # what precedes the last word
    after_break = not before or before.endswith((",", ";", ":", "—", "–", "-")) or (
        len(words) >= 2 and words[-2].strip("-'’") in _HESITATIONS
    )
    if last in _CONNECTIVES:
        return True
    if last in _SOFT_CONNECTIVES:
        return after_break
    if last == "well":
        return all(w.strip("-'’") in _HESITATIONS or w == "well" for w in words)
    for phrase in _PHRASES:
        n = len(phrase)
        if tuple(words[-n:]) == phrase:
            head = body[: body.lower().rfind(phrase[0])].rstrip()
            return bool(head) and head.endswith(",")
    return False


def unsure_tail_prob(p_text: float, p_sure: float, p_tail: float) -> float:
    """P(the turn is complete) when Whisper was unsure of the last word(s) of the text.

    `p_text`: P(end) after the whole text; `p_sure`: P(end) after the words before the unsure tail;
    `p_tail`: how likely the model finds the tail's first token right after those words. The user
    either stopped after the sure words, or went on with the tail (as likely as the model finds it)
    and stopped there:

        P = p_sure + p_tail * p_text      (at most 1)

    Unlike min(p_text, p_sure) (which reads "...for two people [tonight.]" as unfinished whenever
    "for two people" is), a likely tail keeps the whole sentence's score, and an unlikely guess
    ("...book a table for [it.]") gets little of it.
    """
    for name, p in (("p_text", p_text), ("p_sure", p_sure), ("p_tail", p_tail)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be a probability, not {p}")
    return min(1.0, p_sure + p_tail * p_text)


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

    def _end_mass(self, probs: torch.Tensor) -> float:
        return float(probs[self.end_ids.to(probs.device)].sum())

    def model_prob(self, history: Sequence[Message], user_text: str, slot: SlotKey = None) -> float:
        """The model's P(end) after the text (trailing punctuation removed), before the trail-off rule."""
        if not strip_trailing_punctuation(user_text):
            return 0.0
        return self._end_mass(self.engine.next_token_probs(self.prompt_ids(history, user_text), slot=slot))

    def score(self, history: Sequence[Message], user_text: str, slot: SlotKey = None) -> float:
        """Runs the model in the session's cache `slot` (blocks until the engine thread has run it;
        from asyncio use `ascore`)."""
        p = self.model_prob(history, user_text, slot)
        return p * UNFINISHED_FACTOR if trails_off(user_text) else p

    def unsure_tail_parts(self, history: Sequence[Message], user_text: str, sure_text: str,
                          slot: SlotKey = None) -> tuple[float, float, float | None]:
        """(p_text, p_sure, p_tail) for `unsure_tail_prob`; p_tail None when the tail does not start
        a token of its own (it merged into the last sure token)."""
        p_text = self.score(history, user_text, slot)
        sure_ids = self.prompt_ids(history, sure_text)
        text_ids = self.prompt_ids(history, user_text)
        probs = self.engine.next_token_probs(sure_ids, slot=slot)
        p_sure = self._end_mass(probs) * (UNFINISHED_FACTOR if trails_off(sure_text) else 1.0)
        grows = len(text_ids) > len(sure_ids) and text_ids[: len(sure_ids)] == sure_ids
        return p_text, p_sure, float(probs[text_ids[len(sure_ids)]]) if grows else None

    def score_unsure_tail(self, history: Sequence[Message], user_text: str, sure_text: str,
                          slot: SlotKey = None) -> float:
        """P(end) for `user_text` whose words after `sure_text` Whisper was unsure of
        (`unsure_tail_prob`); two forward passes, the second mostly from the prefix cache."""
        if sure_text == user_text or not strip_trailing_punctuation(sure_text):
            return self.score(history, user_text, slot)
        p_text, p_sure, p_tail = self.unsure_tail_parts(history, user_text, sure_text, slot)
        return min(p_text, p_sure) if p_tail is None else unsure_tail_prob(p_text, p_sure, p_tail)

    def warm(self, history: Sequence[Message], user_text: str, slot: SlotKey = None) -> None:
        """Prefill `slot` with the chat up to `user_text` (words the user is still saying), so that
        scoring the finished turn, and the answer's prompt after it, run only what comes after them."""
        self.engine.prefill(self.prompt_ids(history, user_text), slot=slot)

    async def awarm(self, history: Sequence[Message], user_text: str, slot: SlotKey = None) -> None:
        await self.engine.run_async(self.warm, list(history), user_text, slot, slot=slot)

    async def ascore(self, history: Sequence[Message], user_text: str, slot: SlotKey = None) -> float:
        """`score` on the engine thread, after the work queued before it for the same slot and between
        the decode steps of other sessions."""
        return await self.engine.run_async(self.score, list(history), user_text, slot, slot=slot)

    async def ascore_unsure_tail(self, history: Sequence[Message], user_text: str, sure_text: str,
                                 slot: SlotKey = None) -> float:
        return await self.engine.run_async(self.score_unsure_tail, list(history), user_text, sure_text, slot,
                                           slot=slot)
