"""The conversation as the LLM sees it: persona, turns as text, a token budget.

History is text (compact, and the engine reuses the KV cache of the unchanged prefix, so a new
turn prefills only its new tokens). When the prompt outgrows the budget, the oldest exchanges are
dropped — never the system prompt — and not one at a time: the history is cut down to
`keep_fraction` of the budget, so the prefix (and its cache) then stays stable for many turns
instead of shifting, and being re-prefilled, on every turn. The rule itself is
`rejoinder.engine.history.trim_history`, shared with the LiveKit plugin.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from rejoinder.engine import ChatTokenizer
from rejoinder.engine.history import recent_answers, trim_history
from rejoinder.engine.sampling import RepetitionGuard

log = logging.getLogger("rejoinder.agent.conversation")

Message = dict[str, str]


@dataclass
class Conversation:
    tokenizer: ChatTokenizer
    persona: str
    budget_tokens: int = 1536
    keep_fraction: float = 0.6
    tool_prompt: str = ""  # appended to the persona when tools are registered
    turns: list[Message] = field(default_factory=list)
    dropped_messages: int = 0

    def system_message(self, with_tools: bool = True) -> Message:
        content = self.persona + ("\n\n" + self.tool_prompt if self.tool_prompt and with_tools else "")
        return {"role": "system", "content": content}

    def messages(self, extra: Sequence[Message] = (), with_tools: bool = True) -> list[Message]:
        return [self.system_message(with_tools), *self.turns, *extra]

    # --- editing ---------------------------------------------------------------------------------

    def add(self, role: str, content: str) -> None:
        self.turns.append({"role": role, "content": content})

    def add_user(self, text: str) -> None:
        # Two user messages in a row (the agent said nothing in between) read as one turn.
        if self.turns and self.turns[-1]["role"] == "user":
            self.turns[-1] = {"role": "user", "content": f"{self.turns[-1]['content']} {text}".strip()}
        else:
            self.add("user", text)

    def add_assistant(self, text: str) -> None:
        self.add("assistant", text)

    def last(self, role: str) -> Message | None:
        return next((m for m in reversed(self.turns) if m["role"] == role), None)

    def recent_answers(self, count: int = 3) -> list[str]:
        """The last `count` spoken assistant answers, newest first (tool-call blocks left out)."""
        return recent_answers(self.turns, count)

    def answer_guard(self, count: int = 3) -> RepetitionGuard:
        """What the next answer must not copy: the last answers (a small model answers a follow-up
        with its previous answer word for word; `SamplingParams.avoid`)."""
        return RepetitionGuard.of_texts(self.tokenizer, self.recent_answers(count))

    # --- prompts ---------------------------------------------------------------------------------

    def prompt_ids(self, extra: Sequence[Message] = (), with_tools: bool = True) -> list[int]:
        """Chat ids for the next answer (generation prompt appended), within the budget.

        `with_tools=False` leaves the tool descriptions out (the answer after a tool result: small
        models shown the tools again tend to repeat the call instead of answering).
        """
        ids = self.tokenizer.encode_chat(self.messages(extra, with_tools), add_generation_prompt=True)
        if len(ids) <= self.budget_tokens:
            return ids
        self.trim(self.keep_fraction * self.budget_tokens, extra, with_tools)
        return self.tokenizer.encode_chat(self.messages(extra, with_tools), add_generation_prompt=True)

    def trim(self, target_tokens: float, extra: Sequence[Message] = (), with_tools: bool = True) -> None:
        """Drop the oldest exchanges until the prompt fits `target_tokens` (or only the last turn is left)."""
        before = len(self.turns)

        def count(messages: Sequence[Message]) -> int:
            return len(self.tokenizer.encode_chat([*messages, *extra], add_generation_prompt=True))

        system = self.system_message(with_tools)
        self.turns = trim_history([system, *self.turns], count, target_tokens)[1:]
        self.dropped_messages += before - len(self.turns)
        log.info("history over budget: dropped %d oldest message(s), %d kept",
                 before - len(self.turns), len(self.turns))
