"""Call-center features on the real session and models: typed text, idle prompts, hold, transfer,
hold audio for slow tools, recording (including a recording that survives SIGKILL), retention."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from agent_harness import live_session, wait_for
from speech import espeak_say, have_espeak, shared_whisper, silence

from rejoinder.agent.config import AgentConfig, CallSettings
from rejoinder.agent.control import run_command
from rejoinder.agent.events import SessionState
from rejoinder.agent.recording import prune
from rejoinder.agent.tools import Tool
from rejoinder.streaming.audio import write_wav
from rejoinder.streaming.text_metrics import normalized_words, word_error_rate

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")]


@contextlib.asynccontextmanager
async def call(models, *, tools=(), **call_settings):
    cfg = AgentConfig.from_env(max_new_tokens=40)
    cfg = cfg.replace(call=dataclasses.replace(cfg.call, **call_settings))
    async with live_session(models, cfg, tools=tools) as running:
        yield running


def finals(transport, role="agent_text"):
    return [e for e in transport.events_of(role) if e["final"]]


def loud_frames(transport, t0: float, t1: float) -> list:
    return [s for s in transport.sent_audio if t0 <= s.sent_at < t1
            and np.abs(s.frame.samples.astype(np.int32)).max() > 300]


async def test_typed_text_is_a_turn_like_a_spoken_one(models):
    async with call(models) as (session, transport, mic):
        assert (await run_command(session, "user_text", {"text": "What is the capital of France?"}))["ok"]
        assert await wait_for(lambda: len(session.turns) == 1 and session.state == SessionState.LISTENING, 40)
        assert not (await run_command(session, "user_text", {"text": "   "}))["ok"]
    (typed,) = [e for e in transport.events_of("transcript") if e["source"] == "text"]
    assert typed["final"] and typed["text"] == "What is the capital of France?"
    turn = session.turns[0]
    assert turn.user_text == "What is the capital of France?" and len(normalized_words(turn.agent_text)) >= 3
    assert [m["role"] for m in session.conversation.turns] == ["user", "assistant"]
    assert loud_frames(transport, 0, time.monotonic()), "the answer was not spoken"


async def test_a_silent_caller_is_prompted_then_the_call_ends(models):
    async with call(models, idle_prompt_s=1.0, idle_max_prompts=1) as (session, transport, mic):
        assert await wait_for(lambda: session.end_reason != "", 40), "the session did not end for silence"
    idle = transport.events_of("user_idle")
    assert [e["prompts"] for e in idle] == [1, 2] and [e["ending"] for e in idle] == [False, True]
    assert all(e["idle_s"] >= 1.0 for e in idle)
    said = [e["text"] for e in finals(transport)]
    assert said == [CallSettings().idle_prompt, CallSettings().idle_goodbye]
    assert session.end_reason == "user idle"


async def test_speech_resets_the_idle_count(models):
    async with call(models, idle_prompt_s=1.5, idle_max_prompts=1) as (session, transport, mic):
        assert await wait_for(lambda: transport.events_of("user_idle"), 20)
        await mic.speak(espeak_say("Yes, I am here."))
        assert await wait_for(lambda: len(session.turns) >= 1 and session.state == SessionState.LISTENING, 40), \
            (session.state, session.turns, session.barge_ins, transport.events_of("transcript"),
             transport.events_of("state")[-6:])
        assert session.idle_watcher.prompts == 0
        assert await wait_for(lambda: len(transport.events_of("user_idle")) >= 2, 20)
    # The prompt after the answer counts from 1 again: not a goodbye.
    assert transport.events_of("user_idle")[1]["prompts"] == 1


async def test_operator_hold_plays_hold_audio_ignores_the_caller_and_resumes(models):
    async with call(models) as (session, transport, mic):
        assert (await run_command(session, "hold", {}, "mqtt"))["on_hold"] is True
        assert session.state == SessionState.ON_HOLD
        t_hold = time.monotonic()
        await mic.speak(espeak_say("Hello? Is anybody there?"))
        await asyncio.sleep(1.0)
        t_resume = time.monotonic()
        assert (await run_command(session, "resume", {}, "mqtt"))["on_hold"] is False
        assert not (await run_command(session, "resume", {}, "mqtt"))["ok"]  # not on hold any more
        assert session.state == SessionState.LISTENING
        await asyncio.sleep(0.5)
        quiet_after = loud_frames(transport, time.monotonic() - 0.3, time.monotonic())
        await mic.speak(espeak_say("What is the capital of France?"))
        assert await wait_for(lambda: len(session.turns) >= 1 and session.state == SessionState.LISTENING, 40)
    holds = transport.events_of("hold")
    assert [(e["on"], e["reason"]) for e in holds] == [(True, "operator"), (False, "operator")]
    # Hold audio went out while on hold (a soft chime: audible, well below speech level), and stopped.
    during = loud_frames(transport, t_hold, t_resume)
    assert len(during) > 10
    assert max(np.abs(s.frame.samples.astype(np.int32)).max() for s in during) < 0.15 * 32768
    assert not quiet_after
    # What the caller said on hold was not acted on; the question after the resume was.
    assert [e["text"] for e in transport.events_of("transcript") if e["final"]][:1] != ["Hello? Is anybody there?"]
    assert "capital" in normalized_words(session.turns[0].user_text)


async def test_operator_transfer_says_the_line_holds_and_reports_the_conversation(models):
    async with call(models) as (session, transport, mic):
        assert (await run_command(session, "user_text", {"text": "I want to speak to a person."}))["ok"]
        assert await wait_for(lambda: len(session.turns) == 1 and session.state == SessionState.LISTENING, 40)
        reply = await run_command(session, "transfer", {"target": "billing", "reason": "asked for a person"}, "mqtt")
        assert reply["ok"] and reply["target"] == "billing"
        assert await wait_for(lambda: session.state == SessionState.ON_HOLD, 20)
        assert not (await run_command(session, "transfer", {"target": "x"}, "data_channel"))["ok"]  # operators only
    (ev,) = transport.events_of("transfer_requested")
    assert ev["target"] == "billing" and ev["by"] == "operator" and ev["reason"] == "asked for a person"
    assert [m["role"] for m in ev["summary"]] == ["user", "assistant"]
    assert ev["summary"][0]["content"] == "I want to speak to a person."
    assert finals(transport)[-1]["text"] == CallSettings().transfer_line
    assert transport.events_of("hold")[0]["reason"] == "transfer"


async def test_the_llm_can_transfer_when_targets_are_configured(models):
    async with call(models, transfer_targets=("sales", "support")) as (session, transport, mic):
        assert "transfer_call" in session.tools
        assert (await run_command(session, "force_tool", {"name": "transfer_call"}))["ok"]
        assert (await run_command(session, "user_text", {"text": "Please put me through to sales."}))["ok"]
        assert await wait_for(lambda: transport.events_of("transfer_requested"), 40)
        assert await wait_for(lambda: session.state == SessionState.ON_HOLD, 40)
    (ev,) = transport.events_of("transfer_requested")
    assert ev["by"] == "llm" and ev["target"] in ("sales", "support")
    (tool,) = transport.events_of("tool_call")
    assert tool["name"] == "transfer_call" and tool["error"] is None


async def test_hold_audio_covers_a_slow_tool_and_stops_for_the_answer(models):
    async def slow_lookup() -> str:
        await asyncio.sleep(2.5)
        return "order 42 ships tomorrow"

    tool = Tool("order_status", "Look up the caller's order.", slow_lookup)
    async with call(models, tools=[tool], hold_after_s=0.5) as (session, transport, mic):
        assert (await run_command(session, "force_tool", {"name": "order_status"}))["ok"]
        assert (await run_command(session, "user_text", {"text": "Where is my order?"}))["ok"]
        assert await wait_for(lambda: len(session.turns) == 1 and session.state == SessionState.LISTENING, 60)
    on, off = transport.events_of("hold")
    assert (on["on"], on["reason"], off["on"]) == (True, "tool", False)
    assert off["at"] - on["at"] > 1.5  # the tool ran 2.5 s, hold audio from 0.5 s on, until the answer speaks
    turn = session.turns[0]
    assert turn.tool_calls == ("order_status",)
    assert turn.first_audio_sent_at is None or turn.first_audio_sent_at >= off["at"]
    assert loud_frames(transport, on["at"], off["at"]), "no hold audio during the tool call"


async def test_recording_holds_both_sides_on_one_timeline_and_a_transcript(models, tmp_path):
    question = "What is the capital of France?"
    async with call(models, record_dir=str(tmp_path / "rec")) as (session, transport, mic):
        await mic.speak(espeak_say(question))
        assert await wait_for(lambda: len(session.turns) == 1 and session.state == SessionState.LISTENING, 40)
    (ready,) = transport.events_of("recording_ready")
    wav, doc_path = Path(ready["audio_path"]), Path(ready["transcript_path"])
    audio, rate = sf.read(wav, dtype="float32")
    assert rate == 16_000 and audio.ndim == 2 and audio.shape[1] == 2
    assert abs(audio.shape[0] / rate - ready["seconds"]) < 0.05
    whisper = shared_whisper()
    caller = whisper.transcribe(audio[:, 0]).text
    agent = whisper.transcribe(audio[:, 1]).text
    assert "capital" in normalized_words(caller), caller
    # The agent's channel says its answer; the caller's channel does not (the two are apart).
    assert word_error_rate(session.turns[0].agent_text, agent) <= 0.5, (session.turns[0].agent_text, agent)
    assert not set(normalized_words(session.turns[0].agent_text)) - {"the", "of", "is", "capital", "france"} <= set(
        normalized_words(caller)), caller
    # One timeline: the agent's voice starts after the caller's question ends.
    loud = lambda x: np.flatnonzero(np.abs(x) > 0.05)  # noqa: E731
    assert loud(audio[:, 1])[0] > loud(audio[:, 0])[-1]
    doc = json.loads(doc_path.read_text())
    assert doc["session_id"] == session.session_id and doc["audio"] == wav.name
    assert [t["role"] for t in doc["transcript"]] == ["user", "agent"]
    assert doc["turns"][0]["voice_to_voice_s"] == pytest.approx(session.turns[0].voice_to_voice_s)


def test_a_killed_call_leaves_a_playable_recording(tmp_path):
    """SIGKILL mid-call: the WAV opens and holds the audio up to about the last half second."""
    conv = tmp_path / "conv.wav"
    write_wav(conv, np.concatenate([silence(0.5), espeak_say("Tell me a long story about a brave knight."),
                                    silence(30.0)]), 16_000)
    rec = tmp_path / "rec"
    proc = subprocess.Popen([sys.executable, "-m", "rejoinder.agent.cli", "talk", "--in", str(conv), "--out",
                             str(tmp_path / "out.wav"), "--record", str(rec)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            wavs = list(rec.glob("*.wav"))
            if wavs and wavs[0].stat().st_size > 16_000 * 4 * 8:  # 8 s of stereo 16-bit
                break
            time.sleep(0.25)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    (wav,) = rec.glob("*.wav")
    info = sf.info(wav)
    assert info.channels == 2 and info.samplerate == 16_000 and info.frames / 16_000 >= 7.5
    audio, _ = sf.read(wav, dtype="float32")
    assert np.abs(audio[:, 0]).max() > 0.05  # the caller's speech is in it
    doc = json.loads(wav.with_suffix(".json").read_text())  # valid JSON even though nobody closed it
    assert doc["audio"] == wav.name


def test_retention_keeps_the_newest_and_drops_the_old(tmp_path):
    now = time.time()
    for i in range(6):
        wav = tmp_path / f"r{i}.wav"
        wav.write_bytes(b"RIFF")
        wav.with_suffix(".json").write_text("{}")
        age = (10 - i) * 86400 if i < 2 else (6 - i) * 60
        os.utime(wav, (now - age, now - age))
    removed = prune(tmp_path, max_files=3, max_days=5)
    left = sorted(p.name for p in tmp_path.glob("*.wav"))
    # r0, r1 are older than 5 days; of the rest, room is kept for one new recording: 2 stay.
    assert removed == 4 and left == ["r4.wav", "r5.wav"]
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["r4.json", "r5.json"]


def test_call_settings_from_flags_and_environment():
    from rejoinder.agent.cli import build_parser
    from rejoinder.agent.config import from_args
    from rejoinder.errors import ConfigError

    args = build_parser().parse_args(["serve", "--record", "/tmp/r", "--idle-prompt-s", "9", "--transfer-target",
                                      "sales", "--transfer-target", "support"])
    cfg = from_args(args, {"REJOINDER_IDLE_MAX_PROMPTS": "3"}).call
    assert (cfg.record_dir, cfg.idle_prompt_s, cfg.idle_max_prompts) == ("/tmp/r", 9.0, 3)
    assert cfg.transfer_targets == ("sales", "support")
    with pytest.raises(ConfigError):
        from_args(args, {"REJOINDER_RECORD_MAX_FILES": "0"})
