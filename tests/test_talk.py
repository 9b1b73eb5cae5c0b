"""`rejoinder talk` end to end: a recorded multi-turn conversation in, the agent's side and metrics out."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from speech import espeak_say, have_espeak, silence

from rejoinder.streaming.audio import read_wav, resample, write_wav

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")]


def rejoinder(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rejoinder.agent.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_talk_runs_a_conversation_with_pauses_and_an_interruption(tmp_path):
    parts = [silence(0.5), espeak_say("Tell me a long story about a brave knight and a dragon."), silence(4.5),
             espeak_say("Wait, what is two plus two?"), silence(5.0), espeak_say("Where is the nearest train station?"),
             silence(4.0)]
    x = np.concatenate(parts)
    conv = tmp_path / "conversation.wav"
    # 44.1 kHz stereo: not the rate or layout the pipeline uses.
    write_wav(conv, np.stack([resample(x, 16_000, 44_100)] * 2, axis=1), 44_100)
    out, metrics = tmp_path / "reply.wav", tmp_path / "metrics.json"
    r = rejoinder("talk", "--in", str(conv), "--out", str(out), "--metrics-json", str(metrics))
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(metrics.read_text())
    turns, barges = doc["turns"], doc["barge_ins"]
    # A short pause after "Wait," may end a turn of its own (then answered, then interrupted again).
    assert 3 <= len(turns) <= 4, [t["user_text"] for t in turns]
    for t in turns:
        assert {"user_text", "agent_text", "interrupted", "voice_to_voice_s"} <= set(t)
        assert 0.2 < t["voice_to_voice_s"] < 6.0
    assert turns[0]["interrupted"] and not turns[-1]["interrupted"]
    assert barges and not any(b["resumed"] for b in barges)
    assert 0 < barges[0]["reaction_s"] < 0.6 and 5.0 < barges[0]["at_s"] < 12.0
    assert "station" in turns[-1]["user_text"].lower()
    assert doc["summary"]["voice_to_voice_p50_s"] is not None
    # The agent's side lines up with the input: it covers the whole input timeline, silent while the
    # caller asks, and ends soon after whichever ends last, the input or the agent's last answer
    # (the microphone stays open until the agent is done, as a live caller's would).
    agent, rate = read_wav(out, max_seconds=None)
    agent_s, input_s = agent.size / rate, x.size / 16_000
    last_voice_s = np.flatnonzero(np.abs(agent) > 0.01)[-1] / rate
    assert input_s - 0.5 <= agent_s <= max(input_s, last_voice_s + 1.0) + 1.0, (agent_s, input_s, last_voice_s)
    assert np.abs(agent[: int(2.0 * rate)]).max() < 0.01
    assert "voice-to-voice p50" in r.stdout


def test_talk_rejects_bad_input_before_loading_models(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    r = rejoinder("talk", "--in", str(bad), "--out", str(tmp_path / "o.wav"), timeout=60)
    assert r.returncode == 2 and "rejoinder: error:" in r.stderr and "loading models" not in r.stderr
    r = rejoinder("talk", "--in", str(tmp_path / "missing.wav"), "--out", str(tmp_path / "o.wav"), timeout=60)
    assert r.returncode == 2 and "not found" in r.stderr


@pytest.mark.timeout(300)
async def test_talk_takes_control_over_mqtt(tmp_path):
    """`talk --mqtt`: events out and control in, as in `serve` and `livekit` (one control surface)."""
    import asyncio

    from mqtt_broker import Broker, Recorder, find_mosquitto
    from speech import shared_whisper

    from rejoinder.agent.mqtt import control_topic

    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (CI installs it: .ci/run)")
    conv = tmp_path / "quiet.wav"
    write_wav(conv, silence(16.0), 16_000)  # a caller who says nothing: only the operator's say speaks
    out, metrics = tmp_path / "agent.wav", tmp_path / "metrics.json"
    agent = "desk-talk"
    said = "Please hold while I check your order."
    with Broker(tmp_path / "broker").start() as broker:
        rec = Recorder(broker.port, topics=(f"rejoinder/{agent}/#",)).connect()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "rejoinder.agent.cli", "talk", "--in", str(conv), "--out", str(out),
            "--metrics-json", str(metrics), "--mqtt", broker.url, "--agent-id", agent,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            online = (await rec.wait_for(lambda m: m.topic == f"rejoinder/{agent}/status"
                                         and m.json.get("state") == "online" and m.json.get("sessions"),
                                         timeout=120))[0].json
            (sid,) = online["sessions"]
            rec.publish(control_topic(agent, sid), {"command": "say", "args": {"text": said}, "id": "op-1"})
            ack = (await rec.wait_for(lambda m: m.topic.endswith("/events/ack") and m.json.get("id") == "op-1",
                                      timeout=20))[0].json
            assert ack["result"]["ok"] is True and ack["command"] == "say"
            spoken = (await rec.wait_for(lambda m: m.topic.endswith("/events/agent_text") and m.json.get("final"),
                                         timeout=30))[0].json
            assert spoken["text"] == said and spoken["session_id"] == sid
            # A command the operator channel does not have is refused with the reason, over MQTT too.
            rec.publish(control_topic(agent, sid), {"command": "tool", "args": {"name": "x"}, "id": "op-2"})
            err = (await rec.wait_for(lambda m: m.topic.endswith("/events/error") and m.json.get("id") == "op-2",
                                      timeout=20))[0].json
            assert "not allowed" in err["message"]
            _, stderr = await asyncio.wait_for(proc.communicate(), 120)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            rec.close()
    assert proc.returncode == 0, stderr.decode()[-2000:]
    audio, rate = read_wav(out, max_seconds=None)
    heard = shared_whisper().transcribe(resample(audio, rate, 16_000)).text.lower()
    assert "hold" in heard and "order" in heard, heard
