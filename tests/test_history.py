"""History trimming (`rejoinder.engine.history.trim_history`): the one rule Conversation and the LiveKit plugin use.

Most tests count words (a count anyone can check by eye); one counts the real chat template's tokens.
"""
from __future__ import annotations

from collections.abc import Sequence

from rejoinder.engine.history import trim_history

SYSTEM = {"role": "system", "content": "You are a helpful voice assistant on the phone."}


def words(messages: Sequence[dict]) -> int:
    return sum(len(m["content"].split()) for m in messages)


def exchange(i: int, *, tool: bool = False) -> list[dict]:
    user = {"role": "user", "content": f"question {i} about the order status please"}
    if not tool:
        return [user, {"role": "assistant", "content": f"answer {i} it has shipped"}]
    return [user,
            {"role": "assistant", "content": f'<tool_call>{{"name": "lookup", "arguments": {{"n": {i}}}}}</tool_call>'},
            {"role": "tool", "content": f'{{"order": {i}, "status": "shipped"}}'},
            {"role": "assistant", "content": f"order {i} has shipped"}]


def history(n: int) -> list[dict]:
    msgs = [SYSTEM]
    for i in range(n):
        msgs += exchange(i, tool=i % 2 == 1)
    return msgs + [{"role": "user", "content": "and what about my refund"}]


def starts_of_exchanges(msgs: Sequence[dict]) -> list[int]:
    return [i for i, m in enumerate(msgs) if m["role"] == "user" and (i == 0 or msgs[i - 1]["role"] != "user")]


def test_under_budget_nothing_changes_and_the_input_is_not_mutated():
    msgs = history(3)
    copy = [dict(m) for m in msgs]
    kept = trim_history(msgs, words, words(msgs))
    assert kept == msgs and kept is not msgs
    trim_history(msgs, words, 10)
    assert msgs == copy


def test_drops_whole_exchanges_oldest_first_never_the_system_prompt():
    msgs = history(6)
    total = words(msgs)
    for budget in range(words([SYSTEM, msgs[-1]]), total):
        kept = trim_history(msgs, words, budget)
        assert kept[0] == SYSTEM
        assert kept[-1] == msgs[-1]
        assert words(kept) <= budget
        rest = kept[1:]
        assert rest[0]["role"] == "user", (budget, rest[0])  # never an answer or a tool result whose question is gone
        assert rest == msgs[len(msgs) - len(rest):]  # a suffix: the newest exchanges, in order
        # As much as fits: one more exchange back would not have.
        starts = [s for s in starts_of_exchanges(msgs) if s < len(msgs) - len(rest)]
        if starts:
            assert words([SYSTEM, *msgs[starts[-1]:]]) > budget


def test_cuts_down_to_the_target_once_over_budget():
    msgs = history(8)
    budget = words(msgs) - 1  # just over: one exchange would do
    just = trim_history(msgs, words, budget)
    deep = trim_history(msgs, words, budget, target=0.6 * budget)
    assert words(just) <= budget and words(deep) <= 0.6 * budget < words(just)
    assert deep[0] == SYSTEM and deep[1]["role"] == "user" and deep[-1] == msgs[-1]
    # Under budget the target does not matter: a stable prefix is the point of cutting deeper.
    assert trim_history(msgs, words, words(msgs), target=10) == msgs
    # A target above the budget means the budget.
    assert trim_history(msgs, words, budget, target=10 * budget) == just


def test_the_last_message_always_stays_even_when_nothing_fits():
    msgs = history(4)
    assert trim_history(msgs, words, 1) == [SYSTEM, msgs[-1]]
    # Only one exchange (a tool round being answered): its older messages go one at a time.
    one = [SYSTEM, *exchange(1, tool=True)[:3]]
    kept = trim_history(one, words, words(one) - 1)
    assert kept == [SYSTEM, *one[2:]]
    assert trim_history(one, words, 0) == [SYSTEM, one[-1]]


def test_without_a_system_message_and_with_a_leading_greeting():
    greeting = {"role": "assistant", "content": "Hello, thanks for calling, how can I help"}
    msgs = [greeting, *exchange(1), *exchange(2)]
    # Replies before the first question are an exchange of their own: the greeting goes first, alone.
    assert trim_history(msgs, words, words(msgs) - 1) == msgs[1:]
    assert trim_history(msgs, words, words(exchange(2))) == exchange(2)


def test_with_the_real_chat_template(engine):
    def tokens(messages: Sequence[dict]) -> int:
        return len(engine.tokenizer.encode_chat(list(messages), add_generation_prompt=True))

    msgs = history(12)
    budget = tokens(msgs) // 2
    kept = trim_history(msgs, tokens, budget, target=0.6 * budget)
    assert tokens(kept) <= 0.6 * budget
    assert kept[0] == SYSTEM and kept[1]["role"] == "user" and kept[-1] == msgs[-1]
    assert len(kept) < len(msgs)
