"""What is left of a chat when its prompt outgrows the budget? One trimming rule for every caller.

The session's `Conversation`, the LiveKit LLM plugin and the `chat` REPL all keep a history that
grows by one exchange per turn and must fit a token budget. `trim_history` is the one rule they use:

- the leading system message (persona, tool list) is never dropped;
- whole exchanges go, oldest first: an exchange is a user's message(s) and every reply that follows
  up to the next user message (assistant text, tool calls, tool results), so the history never
  starts mid-exchange, with an answer or a tool result whose question is gone;
- the last message (the one being answered) is never dropped; if the last exchange alone is still
  too long, its older messages go one at a time;
- once over `budget`, the history is cut down to `target` (≤ budget): cutting deeper than needed
  (say to 60 % of the budget) keeps the prefix, and the engine's KV cache of it, stable for many
  turns instead of shifting, and being re-prefilled, on every turn.

Tokens are counted by the caller's `count_tokens` (the rendered chat template, plus whatever the
caller appends after these messages), so this module needs no tokenizer of its own.

`recent_answers` is the other question callers ask of a history: what did the assistant last say
(the spoken text, tool calls left out)? The next answer must not copy it (`RepetitionGuard`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from .tokenizer import Message
from .tool_format import parse_tool_calls

__all__ = ["recent_answers", "trim_history"]


def trim_history(
    messages: Sequence[Message],
    count_tokens: Callable[[Sequence[Message]], int],
    budget: float,
    target: float | None = None,
) -> list[Message]:
    """The messages that fit: all of them if `count_tokens(messages) <= budget`, else the system
    message and the newest exchanges whose count is at most `target` (default: `budget`).

    The result may still be over budget when even the system message and the last message do not
    fit; callers that cannot send such a prompt check the count themselves.
    """
    msgs = list(messages)
    if count_tokens(msgs) <= budget:
        return msgs
    goal = budget if target is None else min(target, budget)
    head = msgs[:1] if msgs and msgs[0].get("role") == "system" else []
    turns = msgs[len(head) :]
    while len(turns) > 1:
        end = _exchange_end(turns)
        turns = turns[end if end < len(turns) else 1 :]  # the last exchange: one message at a time
        if count_tokens(head + turns) <= goal:
            break
    return head + turns


def _exchange_end(turns: Sequence[Message]) -> int:
    """Index just past the first exchange: its user message(s), then the replies up to the next user."""
    i = 0
    while i < len(turns) and turns[i].get("role") == "user":
        i += 1
    while i < len(turns) and turns[i].get("role") != "user":
        i += 1
    return i


def recent_answers(messages: Sequence[Message], count: int = 3) -> list[str]:
    """The last `count` assistant answers, newest first, as spoken: `<tool_call>` blocks left out,
    answers that were only a call skipped."""
    out: list[str] = []
    for m in reversed(messages):
        if len(out) >= count:
            break
        if m.get("role") != "assistant":
            continue
        spoken = parse_tool_calls(str(m.get("content") or ""), keep_broken=False)[0].strip()
        if spoken:
            out.append(spoken)
    return out
