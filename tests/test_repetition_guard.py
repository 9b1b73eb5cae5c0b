"""A follow-up is never answered with the previous answer again: the n-gram guard in sampling, on the
real engine and model, and the session passing it its last answers."""
from __future__ import annotations

import asyncio
import re

import pytest
import torch

from rejoinder.agent.config import DEFAULT_PERSONA
from rejoinder.agent.conversation import Conversation
from rejoinder.engine import RepetitionGuard, SamplingParams
from rejoinder.engine.sampling import banned_tokens, block_repeats, sample
from rejoinder.engine.tool_format import format_call
from rejoinder.errors import ConfigError

FIRST, FOLLOW_UP = "What is the capital of France?", "And what is it famous for?"


def ngrams(ids, n):
    return {tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)}


def norm(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


# --- the guard on its own -----------------------------------------------------------------------------

def test_the_token_that_would_complete_a_copied_run_is_masked():
    guard = RepetitionGuard(((5, 6, 7, 8), (1, 2, 9)), ngram=3)
    params = SamplingParams(avoid=guard)
    assert banned_tokens([0, 5, 6], params) == {7}
    assert banned_tokens([6, 7], params) == {8}
    assert banned_tokens([1, 2], params) == {9}
    assert banned_tokens([5], params) == set()  # shorter than n-1: nothing to match yet
    assert banned_tokens([5, 6], SamplingParams()) == set()  # no guard, no ban
    # a word continuation is never masked: the ban would only misspell the word
    assert banned_tokens([5, 6], SamplingParams(avoid=RepetitionGuard(guard.runs, 3, frozenset({7})))) == set()
    logits = torch.zeros(1, 10)
    logits[0, 7], logits[0, 3] = 5.0, 4.0
    assert int(sample(logits, params, generated=[5, 6])[0]) == 3  # greedy takes the next best
    assert int(sample(logits, params, generated=[4, 6])[0]) == 7
    gen = torch.Generator().manual_seed(0)
    hot = SamplingParams(temperature=1.0, avoid=guard)
    drawn = {int(sample(logits, hot, gen, [5, 6])[0]) for _ in range(200)}
    assert 7 not in drawn and len(drawn) > 1


def test_a_ban_that_leaves_nothing_is_dropped():
    logits = torch.full((1, 4), float("-inf"))
    logits[0, 2] = 1.0
    params = SamplingParams(avoid=RepetitionGuard(((0, 2),), ngram=2))
    assert torch.isneginf(block_repeats(logits, params, [0])).all()
    assert int(sample(logits, params, generated=[0])[0]) == 2
    hot = SamplingParams(temperature=1.0, top_p=0.9, avoid=params.avoid)
    assert int(sample(logits, hot, torch.Generator().manual_seed(0), [0])[0]) == 2
    assert block_repeats(logits, params, [1]) is logits  # nothing banned: no copy


def test_bad_guard_settings_are_refused():
    with pytest.raises(ConfigError):
        RepetitionGuard(ngram=0)
    with pytest.raises(ConfigError):
        RepetitionGuard([[1, 2, 3]])  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        RepetitionGuard((("a", "b"),))  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        SamplingParams(avoid=((1, 2, 3),))  # type: ignore[arg-type]


def test_the_guard_of_texts_marks_word_continuations(engine):
    tok = engine.tokenizer
    guard = RepetitionGuard.of_texts(tok, ["The author is J.K. Rowling.", "  "])
    assert guard.runs == (tuple(tok.encode("The author is J.K. Rowling.")),)
    pieces = {tok.decode([i]): i for i in guard.runs[0]}
    assert pieces[" Row"] not in guard.exempt and pieces[" author"] not in guard.exempt
    assert pieces["ling"] in guard.exempt


# --- the real engine and model ------------------------------------------------------------------------

def _follow_up(engine, params_for):
    conv = Conversation(engine.tokenizer, DEFAULT_PERSONA)
    conv.add_user(FIRST)
    first = engine.tokenizer.decode([e.token_id for e in engine.generate(conv.prompt_ids(), params_for(conv))])
    conv.add_assistant(first.strip())
    conv.add_user(FOLLOW_UP)
    params = params_for(conv)
    ids = [e.token_id for e in engine.generate(conv.prompt_ids(), params)]
    return conv, first.strip(), ids, params


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_follow_up_never_copies_the_previous_answer(engine, temperature):
    def params_for(conv):
        return SamplingParams(temperature=temperature, seed=7, max_new_tokens=60, avoid=conv.answer_guard())

    conv, first, ids, params = _follow_up(engine, params_for)
    guard = params.avoid
    assert guard is not None and guard.runs == (tuple(engine.tokenizer.encode(first)),)
    assert ids, "the follow-up got an answer"
    n = guard.ngram
    copied = [g for g in ngrams(ids, n) & ngrams(guard.runs[0], n) if g[-1] not in guard.exempt]
    assert not copied, [engine.tokenizer.decode(list(g)) for g in copied]
    assert norm(engine.tokenizer.decode(ids)) != norm(first)


def test_recent_answers_skip_tool_calls_and_keep_the_newest(engine):
    tok = engine.tokenizer
    conv = Conversation(tok, DEFAULT_PERSONA)
    for i in range(4):
        conv.add_user(f"question {i}")
        conv.add_assistant(f"Answer number {i}.")
    conv.add_user("What's the weather?")
    conv.add_assistant(format_call("get_weather", {"city": "Paris"}))
    conv.add("tool", '{"name": "get_weather", "result": "sunny"}')
    assert conv.recent_answers(count=2) == ["Answer number 3.", "Answer number 2."]
    assert conv.answer_guard(count=2).runs == (tuple(tok.encode("Answer number 3.")),
                                               tuple(tok.encode("Answer number 2.")))
    assert Conversation(tok, DEFAULT_PERSONA).answer_guard().runs == ()


@pytest.mark.slow
async def test_the_session_answers_a_follow_up_with_something_new():
    from rejoinder.agent.config import AgentConfig
    from rejoinder.agent.models import Models
    from rejoinder.agent.session import Session
    from rejoinder.streaming.transport import InProcessTransport

    cfg = AgentConfig(greeting="", max_new_tokens=40)
    models = Models(cfg)
    try:
        session = Session(models, cfg, InProcessTransport(output_sample_rate=models.tts.sample_rate))
        conv = session.conversation
        previous = "The capital of France is Paris."
        conv.add_user(FIRST)
        conv.add_assistant(previous)
        conv.add_user(FOLLOW_UP)
        answer = session.speaker.new_answer(FOLLOW_UP, 1)
        assert answer.spec.params.avoid == conv.answer_guard()
        assert answer.spec.params.max_new_tokens == cfg.max_new_tokens  # the rest of the sampling as configured
        answer.start()
        await asyncio.wait_for(answer.wait(), 120)
        assert answer.error is None
        assert answer.speech_text.strip() and norm(answer.speech_text) != norm(previous)
    finally:
        models.close()
