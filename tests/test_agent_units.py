"""The agent's decision rules and bookkeeping, on the real tokenizer and model where they use one."""
from __future__ import annotations

import os

import numpy as np
import pytest
from speech import espeak_say, have_espeak, piper_say

from rejoinder.agent.barge_in import is_backchannel, is_echo_text
from rejoinder.agent.config import DEFAULT_PERSONA, AgentConfig, TurnTakingConfig
from rejoinder.agent.conversation import Conversation
from rejoinder.agent.tools import Tool, ToolCall, ToolCallFilter, ToolRegistry, parse_tool_call
from rejoinder.engine import Engine
from rejoinder.engine.end_of_turn import EndOfTurnScorer, strip_trailing_punctuation
from rejoinder.streaming.assets import resolve
from rejoinder.streaming.echo import EchoGuard
from rejoinder.streaming.frames import AudioFrame


@pytest.fixture(scope="module")
def engine():
    e = Engine.load(resolve("llm", None))
    yield e
    e.close()


# --- semantic end of turn ---------------------------------------------------------------------------

COMPLETE = ["What time is it?", "Tell me a joke.", "Where is the nearest train station?",
            "I'd like to book a table for two people tonight."]
INCOMPLETE = ["I'd like to book a table for", "Can you tell me about the.", "My name is", "The reason I'm calling is"]


def test_end_of_turn_scores_separate_complete_from_incomplete(engine):
    scorer = EndOfTurnScorer(engine)
    history = [{"role": "system", "content": DEFAULT_PERSONA}]
    complete = [scorer.score(history, t) for t in COMPLETE]
    incomplete = [scorer.score(history, t) for t in INCOMPLETE]
    assert min(complete) > max(incomplete), (complete, incomplete)
    cfg = TurnTakingConfig()
    # The silence timeout: at once for the complete turns, the longest wait for the cut-off ones.
    assert all(cfg.extra_wait_s(p) == 0.0 for p in complete[:3])
    assert all(cfg.extra_wait_s(p) > 1.0 for p in incomplete)


def test_end_of_turn_prompt_shares_the_reply_prefix(engine):
    scorer = EndOfTurnScorer(engine)
    history = [{"role": "system", "content": DEFAULT_PERSONA}]
    ids = scorer.prompt_ids(history, "What time is it?")
    reply = engine.chat_ids(history + [{"role": "user", "content": "What time is it?"}])
    assert reply[: len(ids)] == ids  # scoring fills the KV cache the answer reuses
    assert strip_trailing_punctuation("for...  ") == "for"


def test_extra_wait_is_monotonic_and_configurable():
    cfg = TurnTakingConfig(complete_prob=0.05, incomplete_prob=0.001, max_extra_wait_s=2.0)
    waits = [cfg.extra_wait_s(p) for p in (1e-5, 1e-3, 5e-3, 2e-2, 5e-2, 0.5)]
    assert waits == sorted(waits, reverse=True) and waits[0] == 2.0 and waits[-1] == 0.0
    assert TurnTakingConfig(semantic=False).extra_wait_s(1e-6) == 0.0
    with pytest.raises(ValueError):
        TurnTakingConfig(complete_prob=0.001, incomplete_prob=0.01)
    with pytest.raises(ValueError):
        TurnTakingConfig(min_speech_s=0.05)
    with pytest.raises(ValueError):
        TurnTakingConfig(min_speech_guard_only_s=1.5)


def test_minimum_speech_is_lower_behind_the_echo_canceller():
    # bench/echo_barge_in.py: behind the canceller 0.15 s misses no interruption and lets no echo
    # or noise barge in; the correlation guard alone needs longer (--aec off).
    cfg = AgentConfig.from_env({})
    assert cfg.turns.vad_min_speech_s(canceller=True) < cfg.turns.vad_min_speech_s(canceller=False)
    on = AgentConfig.from_env({"REJOINDER_MIN_SPEECH_S": "0.12", "REJOINDER_MIN_SPEECH_GUARD_ONLY_S": "0.3"})
    assert (on.turns.vad_min_speech_s(canceller=True), on.turns.vad_min_speech_s(canceller=False)) == (0.12, 0.3)


# --- barge-in classification ------------------------------------------------------------------------

def test_backchannels_and_echo_text():
    for t in ("Uh-huh.", "yeah", "Okay!", "mm-hmm", "Yeah, right."):
        assert is_backchannel(t), t
    for t in ("", "Yeah, but what about the price?", "Stop.", "No."):
        assert not is_backchannel(t), t
    agent = "Once upon a time there was a brave knight who lived in a castle."
    assert is_echo_text("there was a brave knight", agent)
    assert not is_echo_text("what is two plus two", agent)
    assert not is_echo_text("knight", agent)  # one word proves nothing


# --- conversation budget ----------------------------------------------------------------------------

def test_history_budget_drops_oldest_exchanges_never_the_persona(engine):
    conv = Conversation(engine.tokenizer, DEFAULT_PERSONA, budget_tokens=200, keep_fraction=0.6)
    for i in range(30):
        conv.add_user(f"Question number {i}: what is {i} plus {i}?")
        ids = conv.prompt_ids()
        assert len(ids) <= 200
        conv.add_assistant(f"{i} plus {i} is {2 * i}.")
    assert conv.dropped_messages > 0
    msgs = conv.messages()
    assert msgs[0] == {"role": "system", "content": DEFAULT_PERSONA}
    assert msgs[1]["role"] == "user"  # never starts mid-exchange
    assert "29" in msgs[-2]["content"]
    conv.add_user("and then")
    conv.add_user("one more thing")
    assert conv.turns[-1]["content"] == "and then one more thing"


# --- tools ------------------------------------------------------------------------------------------

async def test_tool_registry_runs_sync_and_async_tools_and_reports_errors():
    async def lookup(order_id: str) -> dict:
        return {"order": order_id, "status": "shipped"}

    reg = ToolRegistry([
        Tool("lookup", "Find an order.", lookup, {"type": "object", "properties": {"order_id": {"type": "string"}}}),
        Tool("end_call", "End the call.", lambda: "bye", ends_call=True),
    ])
    assert await reg.run(ToolCall("lookup", {"order_id": "A7"})) == {"order": "A7", "status": "shipped"}
    assert await reg.run(ToolCall("end_call", {})) == "bye"
    with pytest.raises(Exception, match="unknown tool"):
        await reg.run(ToolCall("fly", {}))
    with pytest.raises(Exception, match="bad arguments"):
        await reg.run(ToolCall("lookup", {"wrong": 1}))
    assert '"lookup"' in reg.system_prompt()


async def test_forced_calls_are_written_from_the_schema_on_the_real_model(engine):
    """engine.forced_call: the embedded 135M model, which cannot write arguments by itself, still makes
    well-formed calls: enum values from the choices, integers as integers, no-argument tools whole."""
    from rejoinder.engine import SamplingParams
    from rejoinder.engine.forced_call import forced_call

    prompt = engine.chat_ids([{"role": "system", "content": DEFAULT_PERSONA},
                              {"role": "user", "content": "Put me through to sales, and book 3 seats."}])
    tools = {"transfer_call": {"type": "object", "properties": {"target": {"type": "string", "enum": ["sales",
             "support"]}, "reason": {"type": "string"}}, "required": ["target"]},
             "book": {"type": "object", "properties": {"seats": {"type": "integer"}}, "required": ["seats"]},
             "end_call": {"type": "object", "properties": {}}}
    params = SamplingParams(max_new_tokens=60)
    call = await forced_call(engine, prompt, tools, "transfer_call", params)
    assert call.name == "transfer_call" and call.arguments["target"] in ("sales", "support")
    assert set(call.arguments) == {"target"}  # optional arguments are left to the tool's defaults
    call = await forced_call(engine, prompt, tools, "book", params)
    assert call.name == "book" and isinstance(call.arguments["seats"], int)
    call = await forced_call(engine, prompt, tools, "end_call", params)
    assert call == ToolCall("end_call", {})
    call = await forced_call(engine, prompt, tools, None, params)  # the model picks the tool
    assert call.name in tools


def test_tool_call_filter_keeps_markup_out_of_speech():
    f = ToolCallFilter()
    spoken = "".join(f.push(d) for d in [" <tool", "_call>{\"name\": \"end_call\",", " \"arguments\": {}}",
                                         "</tool_call>"])
    assert spoken == "" and f.call_complete and f.call() == ToolCall("end_call", {})
    f = ToolCallFilter()
    spoken = "".join(f.push(d) for d in ["<", "b>Hello", " there."]) + f.finish()
    assert spoken == "<b>Hello there." and f.call() is None
    f = ToolCallFilter()
    assert f.push("Sure") == "Sure" and f.push(", done.") == ", done."
    # Small models stop early: a call missing its closing braces still parses.
    assert parse_tool_call('<tool_call>{"name": "x", "arguments": {"a": 1}') == ToolCall("x", {"a": 1})
    assert parse_tool_call("<tool_call>not json</tool_call>") is None


# --- echo guard -------------------------------------------------------------------------------------

@pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")
def test_echo_guard_recognises_the_agents_voice_not_the_users():
    agent = piper_say("Once upon a time there was a brave knight who lived in a castle by the sea.", rate=22_050)
    user = espeak_say("Stop. What is two plus two?")
    t0 = 1000.0
    echo_in, user_in = EchoGuard(), EchoGuard()
    for g in (echo_in, user_in):
        for k in range(0, agent.size - 441, 441):
            g.add_reference(AudioFrame(agent[k : k + 441], 22_050, 1, 0.0), t0 + k / 22_050)
    ref16 = echo_in._ref.span(t0, t0 + 4.0)
    delay = int(0.15 * 16_000)
    for k in range(0, 3 * 16_000, 320):
        t = t0 + k / 16_000
        e = np.zeros(320, np.float32)
        if k >= delay:
            e += 0.4 * ref16[k - delay : k - delay + 320]
        e += 0.01 * np.random.default_rng(k).standard_normal(320).astype(np.float32)  # room noise
        echo_in.add_input(AudioFrame(e, 16_000, 1, t))
        u = user[k : k + 320] if k + 320 <= user.size else np.zeros(320, np.float32)
        user_in.add_input(AudioFrame(np.asarray(u, np.float32), 16_000, 1, t))
    for s in (0.8, 1.4, 2.0):
        assert echo_in.is_echo(t0 + s, t0 + s + 0.3), echo_in.score(t0 + s, t0 + s + 0.3)
        assert not user_in.is_echo(t0 + s, t0 + s + 0.3), user_in.score(t0 + s, t0 + s + 0.3)
    # Nothing was played in that window: nothing can be echo.
    assert EchoGuard().score(t0, t0 + 0.3) == 0.0


def test_config_precedence_flag_over_environment_over_default(monkeypatch):
    from rejoinder.agent.cli import build_parser
    from rejoinder.agent.config import AgentConfig
    from rejoinder.agent.config import from_args as _config

    assert AgentConfig.from_env({}).asr_full_window is False
    env = {"REJOINDER_ASR_FULL_WINDOW": "1", "REJOINDER_LLM_BACKEND": "eager", "REJOINDER_THREADS": "1"}
    cfg = AgentConfig.from_env(env)
    assert (cfg.asr_full_window, cfg.llm_backend, cfg.threads) == (True, "eager", 1)
    assert AgentConfig.from_env(env, threads=2).threads == 2
    with pytest.raises(ValueError, match="REJOINDER_THREADS"):
        AgentConfig.from_env({"REJOINDER_THREADS": "two"})
    for name in ("REJOINDER_ASR_FULL_WINDOW", "REJOINDER_LLM_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    args = build_parser().parse_args(["reply", "--in", "q.wav", "--out", "a.wav", "--asr-full-window",
                                      "--llm-backend", "native"])
    assert (_config(args).asr_full_window, _config(args).llm_backend) == (True, "native")
    plain = build_parser().parse_args(["reply", "--in", "q.wav", "--out", "a.wav"])
    assert _config(plain).asr_full_window is False


def test_synthesis_hold_is_configured_and_gives_piper_the_cores_it_frees():
    from rejoinder.agent.config import AgentConfig
    from rejoinder.errors import ConfigError
    from rejoinder.streaming.tts import default_tts_threads

    assert AgentConfig.from_env({}).synthesis_hold_s > 0
    assert AgentConfig.from_env({"REJOINDER_SYNTHESIS_HOLD_S": "0"}).synthesis_hold_s == 0
    with pytest.raises(ConfigError, match="synthesis-hold"):
        AgentConfig.from_env({"REJOINDER_SYNTHESIS_HOLD_S": "-1"})
    cores = os.cpu_count() or 2
    assert default_tts_threads(share_cpu=False) == max(1, min(4, cores))
    assert default_tts_threads(share_cpu=True) == max(1, min(4, cores // 2))
