"""The livekit-agents plugins (`livekit.plugins.rejoinder`) and the `rejoinder livekit` worker, on real
models and real audio.

No LiveKit server is available here, so everything below runs without one: the plugins are driven
the way `AgentSession` drives them. The one room-level test runs only when LIVEKIT_URL points at a
server (e.g. `livekit-server --dev`). The transport's own tests are in test_livekit_transport.py,
the tool-call format's in test_tool_format.py.
"""
from __future__ import annotations

import asyncio
import json
import os
import pickle
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("livekit.agents")

from livekit import rtc  # noqa: E402
from livekit.agents import Agent, AgentSession, LanguageCode, Plugin, llm, metrics, stt, vad  # noqa: E402
from livekit.agents.voice.agent import ModelSettings  # noqa: E402
from livekit.agents.voice.turn import _StreamingTurnDetector, _StreamingTurnDetectorStream  # noqa: E402
from livekit_audio import frames_to_float, rtc_frames  # noqa: E402
from speech import RATE, long_text, piper_say, shared_whisper, silence, trim  # noqa: E402

import livekit.plugins.rejoinder as lkp  # noqa: E402
from rejoinder.streaming.audio import resample  # noqa: E402
from rejoinder.streaming.text_metrics import word_error_rate  # noqa: E402

pytestmark = pytest.mark.slow

WER_BOUND = 0.25
INSTRUCTIONS = "You are a helpful assistant. Answer in one short sentence."
UTTERANCE = "Please remind me to call my sister after lunch tomorrow."


# --- shared models (loaded once for this module) -----------------------------------------------


@pytest.fixture(scope="module")
def whisper():
    return shared_whisper()


@pytest.fixture(scope="module")
def voice():
    from rejoinder.streaming.tts import PiperTTS

    return PiperTTS()


@pytest.fixture(scope="module")
def lk_stt(whisper):
    return lkp.STT(asr=whisper)


@pytest.fixture(scope="module")
def lk_llm(engine):
    return lkp.LLM(engine=engine)


def transcribe(whisper, x: np.ndarray, rate: int) -> str:
    return whisper.transcribe(resample(x, rate, RATE)).text


# --- STT ---------------------------------------------------------------------------------------


async def test_stt_stream_emits_interim_then_final_matching_the_utterance(lk_stt):
    speech = trim(piper_say(UTTERANCE))
    frames = rtc_frames(np.concatenate([silence(0.5), speech, silence(1.5)]))
    collected: list = []
    lk_stt.on("metrics_collected", collected.append)
    stream = lk_stt.stream()
    events: list[stt.SpeechEvent] = []

    async def read() -> None:
        async for ev in stream:
            events.append(ev)

    reader = asyncio.create_task(read())
    for f in frames:  # 48 kHz 10 ms frames like a WebRTC track, at (roughly) real-time pace
        stream.push_frame(f)
        await asyncio.sleep(0.01)
    stream.end_input()
    await asyncio.wait_for(reader, 60)
    await stream.aclose()
    lk_stt.off("metrics_collected", collected.append)

    kinds = [e.type for e in events]
    assert kinds[0] == stt.SpeechEventType.START_OF_SPEECH, kinds
    assert kinds.count(stt.SpeechEventType.FINAL_TRANSCRIPT) == 1, kinds
    i_final = kinds.index(stt.SpeechEventType.FINAL_TRANSCRIPT)
    interims = [e for e in events[:i_final] if e.type == stt.SpeechEventType.INTERIM_TRANSCRIPT]
    assert interims, f"no interim before the final: {kinds}"
    assert stt.SpeechEventType.END_OF_SPEECH in kinds[i_final + 1 :]
    final = events[i_final].alternatives[0]
    assert word_error_rate(UTTERANCE, final.text) <= WER_BOUND, final.text
    assert str(final.language) == "en"
    # The interims were hypotheses of the same utterance, not noise.
    assert word_error_rate(UTTERANCE, interims[-1].alternatives[0].text) <= 0.6, interims[-1].alternatives[0].text
    usage = [e.recognition_usage for e in events if e.type == stt.SpeechEventType.RECOGNITION_USAGE]
    assert usage and usage[0].audio_duration >= 0.8 * speech.size / RATE
    assert any(isinstance(m, metrics.STTMetrics) and m.streamed for m in collected)


async def test_stt_stream_brackets_each_utterance_when_the_next_starts_before_the_final(lk_stt):
    """Two utterances 0.9 s apart, pushed faster than real time: the second begins while the first's
    final is still decoding. Each final still gets its own START_OF_SPEECH before it and
    END_OF_SPEECH after it, and the second's timestamps are its own, not 0."""
    first = "Please remind me to call my sister after lunch tomorrow, and book a table for two."
    second = "Also turn off the lights in the kitchen."
    a, b = trim(piper_say(first)), trim(piper_say(second))
    lead, gap = 0.5, 0.9
    frames = rtc_frames(np.concatenate([silence(lead), a, silence(gap), b, silence(1.5)]))
    stream = lk_stt.stream()
    events: list[stt.SpeechEvent] = []

    async def read() -> None:
        async for ev in stream:
            events.append(ev)

    reader = asyncio.create_task(read())
    for i, f in enumerate(frames):
        stream.push_frame(f)
        if i % 8 == 0:
            await asyncio.sleep(0)  # ~0.1 s of audio per turn of the loop: far faster than speech
    stream.end_input()
    await asyncio.wait_for(reader, 90)
    await stream.aclose()

    T = stt.SpeechEventType
    kinds = [e.type for e in events]
    brackets = [k for k in kinds if k in (T.START_OF_SPEECH, T.FINAL_TRANSCRIPT, T.END_OF_SPEECH)]
    assert brackets == [T.START_OF_SPEECH, T.FINAL_TRANSCRIPT, T.END_OF_SPEECH] * 2, kinds
    # Every transcript lies inside its utterance's brackets and carries that utterance's request id.
    open_rid = None
    rids = []
    for e in events:
        if e.type == T.START_OF_SPEECH:
            assert open_rid is None, kinds
            open_rid = e.request_id
            rids.append(open_rid)
        elif e.type == T.END_OF_SPEECH:
            assert e.request_id == open_rid, kinds
            open_rid = None
        else:
            assert open_rid is not None and e.request_id == open_rid, (e.type, kinds)
    assert len(set(rids)) == 2
    f1, f2 = [e.alternatives[0] for e in events if e.type == T.FINAL_TRANSCRIPT]
    assert word_error_rate(first, f1.text) <= WER_BOUND, f1.text
    assert word_error_rate(second, f2.text) <= WER_BOUND, f2.text
    # Real timestamps: each utterance's own speech start in the stream (VAD pre-roll and onset
    # detection move it by a few tenths of a second at most).
    t2 = lead + a.size / RATE + gap
    assert f1.start_time == pytest.approx(lead, abs=0.35), (f1.start_time, f1.end_time)
    assert f2.start_time == pytest.approx(t2, abs=0.35), (f2.start_time, t2)
    assert f1.end_time == pytest.approx(lead + a.size / RATE, abs=0.7)
    assert f1.end_time <= f2.start_time + 0.2 and f2.end_time > f2.start_time + 0.8 * b.size / RATE
    for e in events:
        if e.type == T.INTERIM_TRANSCRIPT:
            assert e.alternatives[0].start_time in (f1.start_time, f2.start_time)


async def test_stt_recognize_one_shot(lk_stt):
    ref = "The library closes early on the weekend, so we should hurry."
    frames = rtc_frames(piper_say(ref), rate=22_050, frame_ms=20)
    ev = await lk_stt.recognize(frames)
    assert ev.type == stt.SpeechEventType.FINAL_TRANSCRIPT
    alt = ev.alternatives[0]
    assert word_error_rate(ref, alt.text) <= WER_BOUND, alt.text
    assert 0.0 < alt.confidence <= 1.0
    assert alt.end_time == pytest.approx(sum(f.duration for f in frames), abs=0.01)


# --- VAD ---------------------------------------------------------------------------------------


async def test_vad_stream_one_segment_with_its_audio():
    speech = trim(piper_say("Turn left at the bakery and walk straight for a few minutes."))
    lead, tail = 0.6, 1.2
    frames = rtc_frames(np.concatenate([silence(lead), speech, silence(tail)]))
    stream = lkp.VAD().stream()
    for f in frames:
        stream.push_frame(f)
    stream.end_input()
    events = [ev async for ev in stream]
    await stream.aclose()

    starts = [e for e in events if e.type == vad.VADEventType.START_OF_SPEECH]
    ends = [e for e in events if e.type == vad.VADEventType.END_OF_SPEECH]
    assert len(starts) == 1 and len(ends) == 1
    assert events.index(starts[0]) < events.index(ends[0])
    # The start is decided min_speech_s after the onset, and dated back to it.
    onset = starts[0].samples_index / RATE - starts[0].speech_duration
    assert abs(onset - lead) < 0.25, onset
    # END_OF_SPEECH carries the whole utterance (pre-roll and hang-over included), at 16 kHz.
    seg, rate = frames_to_float(ends[0].frames)
    assert rate == RATE
    assert speech.size / RATE - 0.1 <= seg.size / RATE <= speech.size / RATE + 0.9
    assert ends[0].speech_duration == pytest.approx(speech.size / RATE, abs=0.35)
    inference = [e for e in events if e.type == vad.VADEventType.INFERENCE_DONE]
    t_of = lambda e: e.samples_index / RATE  # noqa: E731
    assert max(e.probability for e in inference if lead + 0.3 < t_of(e) < lead + 1.0) > 0.8
    assert max(e.probability for e in inference if t_of(e) < lead - 0.1) < 0.3
    assert all(not e.speaking for e in inference if t_of(e) > lead + speech.size / RATE + 0.7)


# --- TTS ---------------------------------------------------------------------------------------


async def test_tts_synthesize_frames_at_the_declared_rate(voice, whisper):
    tts_ = lkp.TTS(voice=voice)
    text = "We planted tomatoes and beans in the garden last spring."
    collected: list = []
    tts_.on("metrics_collected", collected.append)
    frames = [ev.frame async for ev in tts_.synthesize(text)]
    assert tts_.sample_rate == voice.sample_rate == 22_050 and tts_.num_channels == 1
    assert frames and all(f.sample_rate == tts_.sample_rate and f.num_channels == 1 for f in frames)
    audio, rate = frames_to_float(frames)
    assert 1.5 < audio.size / rate < 8.0
    assert word_error_rate(text, transcribe(whisper, audio, rate)) <= WER_BOUND
    await asyncio.sleep(0)
    assert any(isinstance(m, metrics.TTSMetrics) and m.audio_duration > 1.0 for m in collected)


async def test_tts_stream_speaks_pushed_text_and_marks_the_segment_end(voice, whisper):
    tts_ = lkp.TTS(voice=voice)
    text = "The meeting has been moved to the afternoon. She opened the window to let some fresh air in."
    stream = tts_.stream()
    for word in text.split(" "):  # token by token, as an LLM delivers it
        stream.push_text(word + " ")
    stream.end_input()
    events = [ev async for ev in stream]
    await stream.aclose()
    assert all(e.frame.sample_rate == tts_.sample_rate and e.frame.num_channels == 1 for e in events)
    assert events[-1].is_final and not any(e.is_final for e in events[:-1])
    assert len({e.segment_id for e in events}) == 1
    audio, rate = frames_to_float([e.frame for e in events])
    assert word_error_rate(text, transcribe(whisper, audio, rate)) <= WER_BOUND


async def test_tts_stream_stops_on_aclose(voice):
    # A dedicated synthesis thread: if closing did not stop synthesis, this thread would stay busy
    # with the rest of a ~20 s answer.
    executor = ThreadPoolExecutor(max_workers=1)
    tts_ = lkp.TTS(voice=voice, executor=executor)
    stream = tts_.stream()
    for word in long_text(70).split(" "):
        stream.push_text(word + " ")
    stream.flush()
    first = await asyncio.wait_for(stream.__anext__(), 30)
    assert first.frame.sample_rate == tts_.sample_rate
    t0 = time.monotonic()
    await stream.aclose()
    assert time.monotonic() - t0 < 1.0
    t0 = time.monotonic()
    await asyncio.get_running_loop().run_in_executor(executor, lambda: None)
    assert time.monotonic() - t0 < 0.3, "the synthesis thread kept working after aclose()"
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(stream.__anext__(), 1.0)
    executor.shutdown()


# --- LLM ---------------------------------------------------------------------------------------


def chat(*turns: tuple[str, str], system: str = INSTRUCTIONS) -> llm.ChatContext:
    ctx = llm.ChatContext()
    ctx.add_message(role="system", content=system)
    for role, text in turns:
        ctx.add_message(role=role, content=text)
    return ctx


async def test_llm_streams_chunks_and_honours_the_chat_context(lk_llm):
    history = [("user", "I have a dog called Rex."), ("assistant", "Rex is a great name for a dog!")]
    question = ("user", "What is my dog called?")
    collected: list = []
    lk_llm.on("metrics_collected", collected.append)
    async with lk_llm.chat(chat_ctx=chat(*history, question)) as stream:  # closing waits for its metrics
        chunks = [c async for c in stream]
    lk_llm.off("metrics_collected", collected.append)
    content = [c.delta.content for c in chunks if c.delta and c.delta.content]
    assert len(content) >= 3, "the answer came in one piece, not streamed"
    answer = "".join(content)
    assert "rex" in answer.lower(), answer
    # Without the earlier turns the model cannot know the name: the context is what made the answer.
    alone = (await lk_llm.chat(chat_ctx=chat(question)).collect()).text
    assert "rex" not in alone.lower(), alone
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens >= len(content) and usage.prompt_tokens > 20
    m = [m for m in collected if isinstance(m, metrics.LLMMetrics)]
    assert len(m) == 1 and m[0].ttft > 0 and m[0].completion_tokens == usage.completion_tokens


async def test_llm_honours_temperature(engine):
    ctx = chat(("user", "Write a short poem about the sea."))
    greedy = lkp.LLM(engine=engine, max_new_tokens=20)
    a = (await greedy.chat(chat_ctx=ctx).collect()).text
    assert a == (await greedy.chat(chat_ctx=ctx).collect()).text
    hot = lkp.LLM(engine=engine, temperature=1.2, max_new_tokens=20, seed=1)
    h1 = (await hot.chat(chat_ctx=ctx).collect()).text
    assert h1 == (await hot.chat(chat_ctx=ctx).collect()).text  # seeded: reproducible
    h2 = (await hot.chat(chat_ctx=ctx, extra_kwargs={"seed": 2}).collect()).text
    cold = (await hot.chat(chat_ctx=ctx, extra_kwargs={"temperature": 0.0}).collect()).text
    assert h1 != h2 and a not in (h1, h2)
    assert cold == a  # per-request override back to greedy


async def test_llm_never_answers_a_follow_up_with_its_last_answer(engine):
    from rejoinder.agent.config import DEFAULT_PERSONA
    from rejoinder.engine.end_of_turn import strip_trailing_punctuation

    previous = "The capital of France is Paris."
    ctx = chat(("user", "What is the capital of France?"), ("assistant", previous),
               ("user", "And what is it famous for?"), system=DEFAULT_PERSONA)
    text = (await lkp.LLM(engine=engine, max_new_tokens=40).chat(chat_ctx=ctx).collect()).text
    assert text.strip()
    assert strip_trailing_punctuation(text).lower() != strip_trailing_punctuation(previous).lower(), text


def test_llm_prompt_fits_the_context_dropping_the_oldest_exchanges(engine):
    from livekit.plugins.rejoinder.chat import fit, render
    from rejoinder.engine import ContextOverflow

    def tokens(msgs: list[dict]) -> int:
        return len(engine.tokenizer.encode(render(engine, msgs)))

    system = {"role": "system", "content": INSTRUCTIONS}
    msgs = [system]
    for i in range(80):
        msgs += [{"role": "user", "content": f"Tell me fact number {i} about the sea."},
                 {"role": "assistant", "content": f"Fact {i}: the sea is deep, wide and full of fish."}]
    msgs.append({"role": "user", "content": "And one more?"})
    room = 160
    assert tokens(msgs) + room >= engine.max_seq_len
    kept = fit(engine, msgs, room)
    assert tokens(kept) + room < engine.max_seq_len
    assert kept[0] == system and kept[1]["role"] == "user" and kept[-1] == msgs[-1]
    assert kept[1:] == msgs[len(msgs) - len(kept) + 1 :]  # the newest exchanges, whole
    longer = [system, *msgs[len(msgs) - len(kept) + 1 - 2 :]]  # one exchange more would not have fitted
    assert tokens(longer) + room >= engine.max_seq_len
    assert fit(engine, msgs[-5:], room) == msgs[-5:]  # what fits is left alone
    with pytest.raises(ContextOverflow):
        fit(engine, [system, {"role": "user", "content": "word " * 3000}], room)


@llm.function_tool
async def get_weather(city: str) -> dict:
    """Get the current weather in a city.

    Args:
        city: The city name
    """
    return {"city": city, "forecast": "sunny", "temperature_c": 23}


async def test_llm_forced_tool_call_round_trip(lk_llm):
    ctx = chat(("user", "What's the weather like in Paris today?"))
    choice = {"type": "function", "function": {"name": "get_weather"}}
    resp = await lk_llm.chat(chat_ctx=ctx, tools=[get_weather], tool_choice=choice).collect()
    assert resp.text == ""
    assert len(resp.tool_calls) == 1
    call = resp.tool_calls[0]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    # The framework executes the call and puts call + result into the context, as AgentSession does.
    result = await llm.execute_function_call(call, llm.ToolContext([get_weather]))
    assert result.raw_exception is None
    ctx.insert(result.fnc_call)
    ctx.insert(result.fnc_call_out)
    rendered = lkp.chat_messages(ctx)
    assert rendered[-1]["role"] == "tool" and "sunny" in rendered[-1]["content"]
    answer = await lk_llm.chat(chat_ctx=ctx, tools=[get_weather], tool_choice="auto").collect()
    assert not answer.tool_calls
    assert "sunny" in answer.text.lower() or "23" in answer.text, answer.text


async def test_llm_required_tool_choice_picks_among_several_tools(lk_llm):
    @llm.function_tool
    async def set_alarm(hour: int) -> str:
        """Set an alarm clock.

        Args:
            hour: Hour of the day, 0-23
        """
        return f"alarm set for {hour}"

    ctx = chat(("user", "Please set an alarm for 7 in the morning."))
    resp = await lk_llm.chat(chat_ctx=ctx, tools=[get_weather, set_alarm], tool_choice="required").collect()
    assert len(resp.tool_calls) == 1
    call = resp.tool_calls[0]
    assert call.name in ("get_weather", "set_alarm")
    args = json.loads(call.arguments)
    if call.name == "set_alarm":  # the schema types the value: an integer, not a string
        assert isinstance(args["hour"], int)
    else:
        assert isinstance(args["city"], str)


# --- turn detector -----------------------------------------------------------------------------


async def test_turn_detector_scores_complete_above_incomplete(engine):
    td = lkp.TurnDetector(engine=engine)
    # The framework picks the non-streaming protocol by these runtime checks.
    assert not isinstance(td, _StreamingTurnDetectorStream) and not isinstance(td, _StreamingTurnDetector)
    threshold = await td.unlikely_threshold(None)
    assert threshold is not None and await td.supports_language(None)
    assert await td.supports_language(LanguageCode("en-US"))
    assert not await td.supports_language(LanguageCode("fr"))
    assert await td.unlikely_threshold(LanguageCode("fr")) is None
    complete = [await td.predict_end_of_turn(chat(("user", t)))
                for t in ("What time is it?", "How are you doing today")]
    incomplete = [await td.predict_end_of_turn(chat(("user", t)))
                  for t in ("I'd like to book a table for", "I want to go to.")]
    assert min(complete) > threshold > max(incomplete), (complete, incomplete)


# --- AgentSession with our plugins ---------------------------------------------------------------


def agent_session(engine, lk_stt, voice) -> AgentSession:
    return AgentSession(
        stt=lk_stt,
        vad=lkp.VAD(),
        llm=lkp.LLM(engine=engine),
        tts=lkp.TTS(voice=voice),
        turn_handling={"turn_detection": lkp.TurnDetector(engine=engine)},
    )


async def test_agent_session_answers_in_text_run_mode(engine, lk_stt, voice):
    async with agent_session(engine, lk_stt, voice) as session:
        await session.start(Agent(instructions=INSTRUCTIONS))
        result = await session.run(user_input="What is the capital of France?")
        msg = result.expect.next_event().is_message(role="assistant")
        assert "paris" in msg.event().item.text_content.lower()
        result.expect.no_more_events()


class WeatherAgent(Agent):
    """Forces the weather tool on the first step of a turn (the embedded model never calls tools itself)."""

    def __init__(self) -> None:
        super().__init__(instructions=INSTRUCTIONS, tools=[get_weather])

    async def llm_node(self, chat_ctx, tools, model_settings):  # type: ignore[override]
        if not any(item.type == "function_call_output" for item in chat_ctx.items):
            model_settings = ModelSettings(tool_choice={"type": "function", "function": {"name": "get_weather"}})
        async for chunk in Agent.default.llm_node(self, chat_ctx, tools, model_settings):
            yield chunk


async def test_agent_session_tool_round_trip(engine, lk_stt, voice):
    async with agent_session(engine, lk_stt, voice) as session:
        await session.start(WeatherAgent())
        result = await session.run(user_input="What's the weather like in Paris today?")
        result.expect.next_event().is_function_call(name="get_weather", arguments={"city": "Paris"})
        out = result.expect.next_event().is_function_call_output()
        assert "sunny" in out.event().item.output
        msg = result.expect.next_event().is_message(role="assistant")
        text = msg.event().item.text_content
        assert "sunny" in text.lower() or "23" in text, text


# --- plugin registration ---------------------------------------------------------------------------


def test_importable_as_livekit_plugin_and_registered():
    from livekit.plugins import rejoinder as plugin

    from livekit.plugins.rejoinder import llm as llm_mod
    from livekit.plugins.rejoinder import stt as stt_mod
    from livekit.plugins.rejoinder import tts as tts_mod
    from livekit.plugins.rejoinder import vad as vad_mod
    from livekit.plugins.rejoinder.turn_detector import TurnDetector
    from rejoinder.streaming.livekit import LiveKitTransport

    # One module per plugin, as livekit-agents' own plugin packages; the package exports them all.
    assert plugin.STT is stt_mod.STT and plugin.LLM is llm_mod.LLM and plugin.TTS is tts_mod.TTS
    assert plugin.VAD is vad_mod.VAD and plugin.TurnDetector is TurnDetector
    assert plugin.LiveKitTransport is LiveKitTransport  # the transport lives in streaming, re-exported
    assert set(plugin.__all__) <= set(dir(plugin))
    ours = [p for p in Plugin.registered_plugins if isinstance(p, lkp.RejoinderPlugin)]
    assert len(ours) == 1 and ours[0].package == "rejoinder" and ours[0].title == "livekit.plugins.rejoinder"
    assert ours[0].version == plugin.__version__ and ours[0].logger.name.startswith("rejoinder.")


# --- the worker ----------------------------------------------------------------------------------


def test_worker_cli_and_entrypoint(monkeypatch):
    from rejoinder.agent.cli import build_parser
    from rejoinder.agent.cli import livekit as worker
    from rejoinder.agent.config import from_args
    from rejoinder.errors import ConfigError

    parser = build_parser()
    for var in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"):
        monkeypatch.delenv(var, raising=False)
    args = parser.parse_args(["livekit", "dev"])
    assert args.func is worker.run
    assert worker.credentials(from_args(args), dev=True) == (worker.DEV_URL, worker.DEV_KEY, worker.DEV_SECRET)
    args = parser.parse_args(["livekit", "start", "--url", "wss://example.invalid"])
    with pytest.raises(ConfigError, match="LIVEKIT_API_KEY"):
        worker.run(args)
    monkeypatch.setenv("LIVEKIT_API_KEY", "k")
    monkeypatch.setenv("LIVEKIT_API_SECRET", "s")
    monkeypatch.delenv("REJOINDER_TEMPERATURE", raising=False)
    monkeypatch.delenv("REJOINDER_MQTT_URL", raising=False)  # monkeypatch restores what export_config sets
    monkeypatch.delenv("REJOINDER_HANGOVER_S", raising=False)
    args = parser.parse_args(["livekit", "start", "--url", "wss://example.invalid", "--temperature", "0.3",
                              "--mqtt", "mqtt://127.0.0.1:1883", "--hangover-s", "0.25"])
    cfg = from_args(args)
    assert worker.credentials(cfg, dev=False) == ("wss://example.invalid", "k", "s")
    worker.export_config(cfg)
    # How job processes learn the flags: the same loader reads them back there.
    assert os.environ["REJOINDER_TEMPERATURE"] == "0.3"
    from rejoinder.agent.config import load

    back = load()
    assert (back.temperature, back.mqtt.url, back.turns.hangover_s) == (0.3, "mqtt://127.0.0.1:1883", 0.25)
    # Job processes receive the entrypoint by reference: it must pickle as an importable name.
    assert pickle.loads(pickle.dumps(worker.entrypoint)) is worker.entrypoint
    assert pickle.loads(pickle.dumps(worker.prewarm)) is worker.prewarm
    # Public livekit-agents API only.
    import inspect

    assert "_run_worker" not in inspect.getsource(worker)


# --- a real room (only with a LiveKit server) ----------------------------------------------------


@pytest.mark.skipif(not os.environ.get("LIVEKIT_URL"), reason="LIVEKIT_URL is not set: no LiveKit server to join "
                    "(run `livekit-server --dev` and export LIVEKIT_URL=ws://localhost:7880 LIVEKIT_API_KEY=devkey "
                    "LIVEKIT_API_SECRET=secret)")
async def test_worker_answers_a_participant_in_a_room(whisper):
    from livekit import api

    url = os.environ["LIVEKIT_URL"]
    key = os.environ.get("LIVEKIT_API_KEY", "devkey")
    secret = os.environ.get("LIVEKIT_API_SECRET", "secret")
    env = {**os.environ, "LIVEKIT_API_KEY": key, "LIVEKIT_API_SECRET": secret}
    worker = subprocess.Popen(
        [sys.executable, "-m", "rejoinder.agent.cli", "livekit", "start", "--idle-processes", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    room = rtc.Room()
    try:
        await asyncio.sleep(20)  # registration and one warm job process with the models loaded
        assert worker.poll() is None, worker.stdout.read().decode()[-3000:] if worker.stdout else ""
        name = f"rejoinder-test-{uuid.uuid4().hex[:8]}"
        token = (api.AccessToken(key, secret).with_identity("caller")
                 .with_grants(api.VideoGrants(room_join=True, room=name)).to_jwt())
        transcripts: list[tuple[str, str, dict]] = []
        agent_audio: list[np.ndarray] = []
        agent_joined = asyncio.Event()

        def on_text(reader: rtc.TextStreamReader, identity: str) -> None:
            async def read() -> None:
                transcripts.append((identity, await reader.read_all(), dict(reader.info.attributes or {})))
            asyncio.ensure_future(read())

        def on_track(track: rtc.Track, pub, participant) -> None:
            if track.kind == rtc.TrackKind.KIND_AUDIO:
                agent_joined.set()

                async def pull() -> None:
                    async for ev in rtc.AudioStream(track, sample_rate=16_000):
                        agent_audio.append(np.frombuffer(ev.frame.data, np.int16).astype(np.float32) / 32768)
                asyncio.ensure_future(pull())

        room.register_text_stream_handler("lk.transcription", on_text)
        room.on("track_subscribed", on_track)
        await room.connect(url, token)
        mic = rtc.AudioSource(48_000, 1)
        await room.local_participant.publish_track(
            rtc.LocalAudioTrack.create_audio_track("mic", mic),
            rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE),
        )
        await asyncio.wait_for(agent_joined.wait(), 60)
        question = "What is the capital of France?"
        speech = np.concatenate([silence(6.0), piper_say(question), silence(12.0)])  # after the greeting
        for f in rtc_frames(speech):
            await mic.capture_frame(f)  # paced by the source's queue: real time
        user_finals = [t for t in transcripts if t[2].get("lk.segment_id", "").startswith("user-")
                       and t[2].get("lk.transcription_final") == "true"]
        agent_finals = [t for t in transcripts if t[2].get("lk.segment_id", "").startswith("agent-")
                        and t[2].get("lk.transcription_final") == "true"]
        assert any(word_error_rate(question, t[1]) <= WER_BOUND for t in user_finals), transcripts
        assert len(agent_finals) >= 2, transcripts  # the greeting, then the answer
        heard = np.concatenate(agent_audio)
        assert np.sqrt(np.mean(heard**2)) > 0.01  # the agent's voice came through its track
    finally:
        await room.disconnect()
        worker.terminate()
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            worker.kill()
