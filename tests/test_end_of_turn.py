"""Is the user's turn complete? Trailing fillers and ellipses read as unfinished; a complete sentence
whose last word Whisper was unsure of still reads as complete (real engine and model)."""
from __future__ import annotations

import pytest

from rejoinder.agent.config import DEFAULT_PERSONA, TurnTakingConfig
from rejoinder.engine.end_of_turn import EndOfTurnScorer, trails_off, unsure_tail_prob
from rejoinder.streaming.asr_stream import without_tail

HISTORY = [{"role": "system", "content": DEFAULT_PERSONA}]
TRAILING_OFF = ["What time is it, um", "So the thing is, uh", "Uh", "Well, um", "It was kind of, like",
                "I need a taxi and", "My flight got cancelled, so", "What time is it…", "It's about my order...",
                "Tell me a joke...", "Hmm...", "I don't know, maybe…"]
COMPLETE = ["What time is it?", "What is the capital of France?", "Where is the nearest train station?",
            "Is it going to rain tomorrow?", "Who won the game last night?", "And what is it famous for?"]


@pytest.fixture(scope="module")
def scorer(engine):
    return EndOfTurnScorer.shared(engine)


def test_what_trails_off():
    for text in TRAILING_OFF + ["Um.", "I want to, um,", "Hmm, well", "It was great, you know", "And", "So"]:
        assert trails_off(text), text
    for text in COMPLETE + ["I think so.", "Even so.", "And?", "So?", "Oh, well.", "Mm-hmm.", "Uh-huh.",
                            "What would you like?", "I like it.", "You know what I mean", "", "Tell me more."]:
        assert not trails_off(text), text


def test_trailing_fillers_and_ellipses_read_as_unfinished(scorer):
    cfg = TurnTakingConfig()
    trailing = {t: scorer.score(HISTORY, t) for t in TRAILING_OFF}
    assert all(p < cfg.complete_prob for p in trailing.values()), trailing
    assert all(cfg.extra_wait_s(p) > 1.0 for p in trailing.values()), trailing
    # the model alone took several of these for finished turns: the rule is what holds them
    assert max(scorer.model_prob(HISTORY, t) for t in TRAILING_OFF) >= cfg.complete_prob
    complete = {t: scorer.score(HISTORY, t) for t in COMPLETE}
    assert all(p >= cfg.complete_prob for p in complete.values()), complete


def test_unsure_tail_rule():
    assert unsure_tail_prob(0.5, 0.001, 0.5) == pytest.approx(0.251)
    assert unsure_tail_prob(0.5, 0.001, 0.0) == pytest.approx(0.001)  # an impossible tail: the sure words decide
    assert unsure_tail_prob(0.9, 0.9, 0.9) == 1.0
    for bad in ((1.5, 0.1, 0.1), (0.1, -0.1, 0.1), (0.1, 0.1, float("nan"))):
        with pytest.raises(ValueError):
            unsure_tail_prob(*bad)


def test_a_likely_unsure_last_word_keeps_a_complete_turn_complete(scorer):
    cfg = TurnTakingConfig()
    text, tail = "What is the capital of France?", "France?"
    sure = without_tail(text, tail)
    p_text, p_sure, p_tail = scorer.unsure_tail_parts(HISTORY, text, sure)
    assert min(p_text, p_sure) < cfg.complete_prob  # the session's min rule: waits up to 1.6 s more
    assert scorer.score_unsure_tail(HISTORY, text, sure) >= cfg.complete_prob
    # a guess Whisper tacked onto a fragment does not make it complete
    guessed = "I'd like to book a table for it."
    assert scorer.score(HISTORY, guessed) >= cfg.complete_prob  # the whole text alone would answer
    assert scorer.score_unsure_tail(HISTORY, guessed, without_tail(guessed, "it.")) < cfg.complete_prob
    assert scorer.score_unsure_tail(HISTORY, text, text) == pytest.approx(scorer.score(HISTORY, text), rel=1e-4)


def test_prefill_while_speaking_leaves_only_the_last_words_to_score(scorer):
    """The words heard so far are prefilled into the slot while the user speaks (agent.turns): the
    score at the pause then runs only the tokens after them, and gives what a cold score gives."""
    history = [{"role": "system", "content": DEFAULT_PERSONA}]
    engine = scorer.engine
    cold = scorer.score(history, "Can you tell me the way to the train station?", slot="cold")
    cold_run = engine.last_stats.prefill_tokens
    engine.release_slot("cold")  # not a donor for the warm slot's prefix (engine/kv_slots.py)
    scorer.warm(history, "Can you tell me the way", slot="warm")
    warm = scorer.score(history, "Can you tell me the way to the train station?", slot="warm")
    warm_run = engine.last_stats.prefill_tokens
    assert warm == pytest.approx(cold, rel=1e-3, abs=1e-6)
    assert warm_run <= 6 < cold_run, (warm_run, cold_run)  # "to the train station?" only
    engine.release_slot("warm")
