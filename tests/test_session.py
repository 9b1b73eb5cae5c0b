"""The full-duplex session on a real clock, with real models and synthesised speech.

The user speaks with espeak-ng (a voice unlike the agent's Piper voice); the agent's answer is
transcribed back with Whisper where the test needs to know what was heard. Bounds are loose: the
machine is a shared 2-core CPU, and these tests check behaviour, the benchmark measures speed.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import resource
import time

import numpy as np
import pytest
from agent_harness import frames_sent_between, wait_for
from agent_harness import live_session as harness_session
from speech import espeak_say, have_espeak, shared_whisper, words_heard

from rejoinder.agent.config import AgentConfig
from rejoinder.agent.control import run_command
from rejoinder.agent.events import SessionState
from rejoinder.agent.session import Session
from rejoinder.agent.tools import Tool
from rejoinder.streaming.audio import resample
from rejoinder.streaming.text_metrics import normalized_words

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")]

LONG_QUESTION = "Tell me a long story about a brave knight and a dragon."
BARGE_BOUND_S = 0.6  # onset -> audio stopped; the target (p95 0.25 s) is measured by bench/agent_latency.py


@contextlib.asynccontextmanager
async def live_session(models, *, echo_gain: float = 0.0, max_new_tokens: int = 60, **kw):
    async with harness_session(models, AgentConfig.from_env(max_new_tokens=max_new_tokens), echo_gain=echo_gain,
                               **kw) as running:
        yield running


def speaking(session: Session) -> bool:
    return session.state == SessionState.SPEAKING


async def until_played(session: Session, seconds: float, timeout: float = 20.0) -> None:
    """Wait until the agent has been audible for `seconds` of the current answer."""
    assert await wait_for(lambda: speaking(session) and session.speaker.playout.played_seconds >= seconds, timeout), \
        session.state


async def test_question_gets_a_spoken_answer_with_voice_to_voice_latency(models):
    async with live_session(models) as (session, transport, mic):
        await mic.speak(espeak_say("What is the capital of France?"))
        assert await wait_for(lambda: len(session.turns) == 1, 30), "no answer"
        assert await wait_for(lambda: session.state == SessionState.LISTENING, 5)
    turn = session.turns[0]
    assert "capital" in normalized_words(turn.user_text)
    assert len(normalized_words(turn.agent_text)) >= 3, turn.agent_text
    assert not turn.interrupted
    # Every stage happened, in order, after the user stopped speaking.
    stamps = [turn.user_speech_end_at, turn.asr_final_at, turn.end_of_turn_at, turn.llm_first_token_at,
              turn.first_clause_at, turn.first_tts_audio_at, turn.first_audio_sent_at]
    assert all(s is not None for s in stamps), stamps
    assert stamps == sorted(stamps), stamps
    assert 0.2 < turn.voice_to_voice_s < 5.0
    # What went out is the answer: Whisper hears it.
    audio = transport.output_audio()
    heard = shared_whisper().transcribe(resample(audio.astype(np.float32) / 32768, models.tts.sample_rate, 16_000)).text
    assert words_heard(turn.agent_text, heard) >= 0.5, (turn.agent_text, heard)
    # History holds the exchange; events went to the transport in order.
    roles = [m["role"] for m in session.conversation.turns]
    assert roles == ["user", "assistant"]
    types = [e["type"] for e in transport.sent_events]
    assert types[0] == "session_started" and types[-1] == "session_ended"
    assert types.index("metrics") > types.index("agent_speech")
    assert transport.events_of("metrics")[0]["voice_to_voice_s"] == pytest.approx(turn.voice_to_voice_s)


async def test_interruption_stops_audio_and_truncates_history(models):
    async with live_session(models, max_new_tokens=120) as (session, transport, mic):
        await mic.speak(espeak_say(LONG_QUESTION))
        await until_played(session, 1.5)
        first_answer = session.speaker.answer
        t_speak, _ = await mic.speak(espeak_say("Stop, what is two plus two?"))
        assert await wait_for(lambda: len(session.turns) >= 2, 40)
    barges = [b for b in session.barge_ins if b.outcome == "interruption"]
    assert len(barges) == 1, session.barge_ins
    b = barges[0]
    assert 0 < b.reaction_s < BARGE_BOUND_S, b.reaction_s
    # Nothing of the old answer went out after the stop (the next frames are the new answer's).
    new_answer_start = session.turns[1].first_audio_sent_at
    assert frames_sent_between(transport, b.stopped_at + 0.001, new_answer_start - 0.001) == 0
    interrupted = session.turns[0]
    assert interrupted.interrupted
    # History keeps what was played, which is a strict prefix of what had been prepared.
    assistant = [m["content"] for m in session.conversation.turns if m["role"] == "assistant"]
    assert assistant[0] == interrupted.agent_text == b.played_text.strip()
    assert len(assistant[0]) < len(first_answer.speech_text.strip())
    assert (first_answer.speech_text.startswith(assistant[0])
            or first_answer.speech_text.strip().startswith(assistant[0]))
    assert "two" in normalized_words(session.turns[1].user_text) or "2" in session.turns[1].user_text


async def test_noise_burst_and_own_voice_do_not_interrupt(models):
    rng = np.random.default_rng(3)
    burst = (0.3 * rng.standard_normal(int(0.15 * 16000))).astype(np.float32)
    async with live_session(models, echo_gain=0.5, max_new_tokens=100) as (session, transport, mic):
        await mic.speak(espeak_say(LONG_QUESTION))
        await until_played(session, 1.0)
        await mic.speak(burst)
        assert await wait_for(lambda: len(session.turns) == 1, 60)
    assert [b.outcome for b in session.barge_ins if b.outcome not in ("echo",)] == []
    turn = session.turns[0]
    assert not turn.interrupted
    # The whole prepared answer was played and kept.
    assert session.conversation.turns[-1]["content"] == turn.agent_text
    assert len(turn.agent_text) > 40


async def test_backchannel_resumes_the_answer(models):
    async with live_session(models, max_new_tokens=100) as (session, transport, mic):
        await mic.speak(espeak_say(LONG_QUESTION))
        await until_played(session, 1.2)
        await mic.speak(espeak_say("uh-huh"))
        assert await wait_for(lambda: len(session.turns) == 1, 60)
    outcomes = [b.outcome for b in session.barge_ins]
    assert outcomes and outcomes[0] in ("backchannel", "noise"), outcomes
    assert session.barge_ins[0].resumed
    turn = session.turns[0]
    assert not turn.interrupted
    # It went on past the point where it was paused.
    assert len(turn.agent_text) > len(session.barge_ins[0].played_text) + 10
    assert session.conversation.turns[-1] == {"role": "assistant", "content": turn.agent_text}


async def test_backchannel_after_the_answer_was_made_resumes_and_closes_the_turn(models):
    # The whole answer is generated and synthesised before the backchannel: nothing is left to
    # produce, and the exchange must still close once the queued audio has played (CI once hung here).
    async with live_session(models, max_new_tokens=40) as (session, transport, mic):
        await mic.speak(espeak_say(LONG_QUESTION))
        await until_played(session, 1.0)
        answer = session.speaker.answer
        assert await wait_for(lambda: answer.complete, 30), "the answer was never fully made"
        assert speaking(session), "the answer ended before the backchannel could pause it"
        await mic.speak(espeak_say("uh-huh"))
        assert await wait_for(lambda: len(session.turns) == 1, 60), (session.state, session.barge_ins)
    outcomes = [b.outcome for b in session.barge_ins]
    assert outcomes and outcomes[0] in ("backchannel", "noise"), outcomes
    assert session.barge_ins[0].resumed
    turn = session.turns[0]
    assert not turn.interrupted
    assert session.conversation.turns[-1] == {"role": "assistant", "content": turn.agent_text}
    assert turn.agent_text.strip() == answer.speech_text.strip()


async def test_mid_sentence_pause_is_waited_for(models):
    async with live_session(models) as (session, transport, mic):
        await mic.speak(espeak_say("I would like to book a table for"))
        await asyncio.sleep(1.0)
        spoke_during_pause = session.speaker.playout.metrics.frames_out > 0
        second_half = espeak_say("two people tonight.")
        trailing_s = (second_half.size - 1 - np.flatnonzero(np.abs(second_half) > 0.01)[-1]) / 16000  # after the words
        _, clip_end = await mic.speak(second_half)
        second_half_end = clip_end - trailing_s  # when the voice stopped (the answer may start in the clip's tail)
        assert await wait_for(lambda: len(session.turns) >= 1, 30)
    assert not spoke_during_pause
    turn = session.turns[0]
    w = normalized_words(turn.user_text)
    # Both halves in one turn (Whisper's reading of espeak varies: check words of each half).
    assert "table" in w and "people" in w, turn.user_text
    # The turn was scored as a whole and answered only after its second half. (How complete it
    # reads depends on Whisper's confidence in the last word: an unsure "tonight." counts as much as
    # the model finds it likely after "two people"; see agent.turns.)
    assert turn.end_of_turn_prob is not None
    assert turn.first_audio_sent_at > second_half_end
    assert len([t for t in session.turns if t.user_text]) == 1


async def test_interruption_storms_always_return_to_listening_and_never_play_stale_audio(models):
    violations: list[str] = []

    async with live_session(models, max_new_tokens=80) as (session, transport, mic):
        async def watchdog():
            silent_since = None
            while True:
                await asyncio.sleep(0.05)
                now = time.monotonic()
                last = transport.sent_audio[-1].sent_at if transport.sent_audio else 0
                if session.state == SessionState.SPEAKING and now - last > 0.3:
                    silent_since = silent_since or now
                    if now - silent_since > 1.5:
                        violations.append(f"speaking but silent for {now - silent_since:.1f}s")
                        silent_since = now
                else:
                    silent_since = None

        dog = asyncio.create_task(watchdog())
        # Barge-in during thinking (or, when the answer was held ready at the pause, during its first
        # words): speak again as soon as the turn is over.
        await mic.speak(espeak_say("What is the tallest mountain?"))
        assert await wait_for(lambda: session.state in (SessionState.THINKING, SessionState.SPEAKING), 10)
        await mic.speak(espeak_say("in Europe, I mean."))
        # Barge-in during the first clause.
        assert await wait_for(lambda: speaking(session), 20)
        await mic.speak(espeak_say("No wait. Tell me about rivers."))
        # Rapid repeated barge-ins during synthesis.
        for phrase in ("Actually, stop.", "Tell me about lakes.", "No, about oceans."):
            assert await wait_for(lambda: speaking(session), 20), [
                (b.turn, b.outcome, b.text) for b in session.barge_ins]
            await asyncio.sleep(0.4)
            await mic.speak(espeak_say(phrase))
        assert await session.wait_idle(timeout=40)
        dog.cancel()
    assert not violations, violations
    assert session.state == SessionState.ENDED
    # Every answer that was heard belongs to the user turn it followed: agent text events never go
    # back to an older turn once a newer one has ended.
    turns_spoken = [e["turn"] for e in transport.events_of("agent_text") if not e["final"]]
    assert turns_spoken == sorted(turns_spoken)
    assert len({b.turn for b in session.barge_ins if b.outcome == "interruption"}) >= 2, \
        [(b.turn, b.outcome, b.text) for b in session.barge_ins]
    assert session.turns[-1].user_text and not session.turns[-1].interrupted


async def test_forced_tool_call_round_trip_ends_the_call(models):
    calls: list[dict] = []

    def end_call() -> str:
        calls.append({})
        return "call ended"

    tool = Tool("end_call", "End the phone call.", end_call, ends_call=True)
    async with live_session(models, tools=[tool]) as (session, transport, mic):
        assert (await run_command(session, "force_tool", {"name": "end_call"}))["ok"]
        await mic.speak(espeak_say("Please hang up now."))
        assert await wait_for(lambda: session.end_reason != "", 40)
    assert calls == [{}]
    (ev,) = transport.events_of("tool_call")
    assert ev["name"] == "end_call" and ev["result"] == "call ended" and ev["error"] is None
    roles = [m["role"] for m in session.conversation.turns]
    assert roles[:3] == ["user", "assistant", "tool"]
    assert "<tool_call>" in session.conversation.turns[1]["content"]
    # The follow-up was generated after the result and spoken; no markup was spoken.
    follow = session.turns[-1]
    assert follow.agent_text and "<" not in follow.agent_text and follow.tool_calls == ("end_call",)
    assert session.end_reason == "end_call"


async def test_control_say_mute_and_bad_commands(models):
    async with live_session(models) as (session, transport, mic):
        assert (await run_command(session, "say", {"text": "Hello there, caller."}))["ok"]
        assert await wait_for(lambda: any(e["final"] for e in transport.events_of("agent_text")), 15)
        assert (await run_command(session, "mute"))["muted"] is True
        await mic.speak(espeak_say("What is the capital of France?"))
        await asyncio.sleep(1.5)
        assert (await run_command(session, "unmute"))["muted"] is False
        assert not (await run_command(session, "say", {"text": "  "}))["ok"]
        assert not (await run_command(session, "fly", {}))["ok"]
        assert not (await run_command(session, "say", {"text": "x", "mode": "sideways"}))["ok"]
        status = await run_command(session, "status")
    assert status["ok"] and status["state"] == "listening"
    final_texts = [e["text"] for e in transport.events_of("agent_text") if e["final"]]
    assert final_texts == ["Hello there, caller."]
    assert transport.events_of("transcript") == []  # muted: the question was not heard
    assert [m["content"] for m in session.conversation.turns] == ["Hello there, caller."]


async def test_fifty_turns_keep_history_and_memory_bounded(models):
    cfg_context = 640
    questions = ["Hello.", "How are you?", "What is your name?", "Thank you.", "Goodbye."]
    async with live_session(models, max_new_tokens=16) as (session, transport, mic):
        session.conversation.budget_tokens = cfg_context
        rss = []
        for i in range(50):
            await mic.speak(espeak_say(questions[i % len(questions)]))
            assert await wait_for(lambda: len(session.turns) >= i + 1
                                  and session.state == SessionState.LISTENING, 30), \
                f"turn {i + 1} not answered (state {session.state})"
            if i in (9, 49):
                gc.collect()
                rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        n_tokens = len(session.conversation.prompt_ids())
    assert len(session.turns) == 50
    assert n_tokens <= cfg_context
    assert session.conversation.dropped_messages > 0
    assert session.conversation.messages()[0]["role"] == "system"
    assert rss[1] - rss[0] < 200 * 1024, rss  # KiB: peak RSS grew < 200 MB over 40 turns


async def test_two_sessions_keep_their_own_cached_prefix(models):
    """Each session has its own KV-cache slot: A's follow-up prefills only what its last turn
    added although B talked in between (one shared cache would keep only the common system prompt)."""
    async with live_session(models, max_new_tokens=16) as (a, _, mic_a), \
            live_session(models, max_new_tokens=16) as (b, _, mic_b):
        await mic_a.speak(espeak_say("What is the capital of France?"))
        assert await wait_for(lambda: len(a.turns) == 1 and a.state == SessionState.LISTENING, 40)
        await mic_b.speak(espeak_say("Tell me a joke about cats."))
        assert await wait_for(lambda: len(b.turns) == 1 and b.state == SessionState.LISTENING, 40)
        assert {a.session_id, b.session_id} <= set(models.engine.slot_keys())
        await mic_a.speak(espeak_say("And what is it famous for?"))
        assert await wait_for(lambda: len(a.turns) == 2 and a.state == SessionState.LISTENING, 40)
    first, follow = a.turns
    first_prompt = first.llm_prompt_reused + first.llm_prompt_run
    assert first.llm_prompt_run > 0 and first_prompt > 20, first
    assert follow.llm_prompt_reused >= first_prompt, (first, follow)
    assert follow.llm_prompt_run < follow.llm_prompt_reused, follow
    # Ended sessions give their slots back.
    assert await wait_for(lambda: not {a.session_id, b.session_id} & set(models.engine.slot_keys()), 10)


# --- the speculative hand-over ------------------------------------------------------------------------
# A long VAD hang-over makes the order of things certain on a loaded box: the pause is decoded and
# the answer prepared well before the hang-over would end the utterance.

def slow_hangover(hangover_s: float = 1.0, **kw):
    from rejoinder.agent.config import TurnTakingConfig

    return TurnTakingConfig(hangover_s=hangover_s, pause_pass_s=0.05, fast_hangover_s=0.15, **kw)


async def test_a_complete_question_is_handed_over_before_the_hang_over_ends(models):
    # Thresholds low enough that the question reads complete whatever Whisper makes of espeak: this
    # checks the hand-over, not the end-of-turn score (tests/test_agent_units.py does).
    turn_taking = slow_hangover(5.0, complete_prob=1e-3, incomplete_prob=1e-4)
    async with live_session(models, turn_taking=turn_taking) as (session, transport, mic):
        await mic.speak(espeak_say("What is the capital of France?"))
        assert await wait_for(lambda: len(session.turns) == 1 and session.state == SessionState.LISTENING, 40)
        # The VAD's own end of speech comes 5 s into the silence, whenever the answer is over.
        assert await wait_for(lambda: any(not e["started"] for e in transport.events_of("user_speech")), 20)
    sp = session.turn_taker.speculation
    assert sp.started >= 1 and sp.used == 1, sp
    turn = session.turns[0]
    assert turn.preemptive and not turn.interrupted
    # The turn was handed over before the VAD declared the end of speech (5 s of silence): from the
    # pause transcript, not the final. (How soon after is the benchmark's business.)
    speech_end = next(e for e in transport.events_of("user_speech") if not e["started"])
    assert turn.asr_final_at < turn.end_of_turn_at < speech_end["at"], turn.stage_latencies()
    # History holds the question once, as the words handed over (or the final that corrected them).
    users = [m["content"] for m in session.conversation.turns if m["role"] == "user"]
    assert len(users) == 1 and "capital" in normalized_words(users[0]), users
    assert sp.started == sp.used + sp.discarded


async def test_a_held_answer_whose_final_comes_first_is_used_once(models):
    # The words read unfinished (thresholds above any score), so the held answer waits 1 + 2 s of
    # silence, and the utterance's final transcript (after the 1 s hang-over) comes first: the turn
    # must take its words once, and the held answer (same words) is the one that plays.
    turn_taking = slow_hangover(1.0, complete_prob=0.999, incomplete_prob=0.998, max_extra_wait_s=2.0)
    async with live_session(models, turn_taking=turn_taking) as (session, transport, mic):
        await mic.speak(espeak_say("What is the capital of France?"))
        assert await wait_for(lambda: len(session.turns) == 1 and session.state == SessionState.LISTENING, 40)
    sp = session.turn_taker.speculation
    assert sp.started >= 1, "no answer was prepared at the pause"
    turn = session.turns[0]
    assert normalized_words(turn.user_text).count("capital") == 1, turn.user_text
    users = [m["content"] for m in session.conversation.turns if m["role"] == "user"]
    assert users == [turn.user_text], users
    assert turn.preemptive and sp.used == 1 and sp.started == sp.used + sp.discarded, sp


async def test_an_answer_held_for_a_pause_is_discarded_when_the_user_goes_on(models):
    async with live_session(models, turn_taking=slow_hangover(8.0)) as (session, transport, mic):
        await mic.speak(espeak_say("Could you tell me the capital of"))
        # Within the hang-over the same utterance goes on; resume once the pause's answer is held.
        held = await wait_for(lambda: session.turn_taker.speculation.started >= 1, 7.0)
        spoke_during_pause = session.speaker.playout.metrics.frames_out > 0
        await mic.speak(espeak_say("France, please?"))
        assert await wait_for(lambda: len(session.turns) == 1 and session.state == SessionState.LISTENING, 40)
    sp = session.turn_taker.speculation
    assert held, "no answer was prepared at the pause"
    assert sp.discarded >= 1 and not spoke_during_pause
    # Nothing of the discarded answer reached the events or the history.
    assert len([e for e in transport.events_of("agent_speech") if e["started"]]) == 1
    finals = [e for e in transport.events_of("agent_text") if e["final"]]
    assert len(finals) == 1 and finals[0]["text"] == session.turns[0].agent_text
    roles = [m["role"] for m in session.conversation.turns]
    assert roles == ["user", "assistant"]
    w = normalized_words(session.conversation.turns[0]["content"])
    assert "capital" in w and "please" in w, w  # both halves, as one user message
