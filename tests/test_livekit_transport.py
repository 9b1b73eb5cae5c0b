"""The LiveKit transport of `rejoinder livekit` (`rejoinder.streaming.livekit`), on real LiveKit SDK objects.

No LiveKit server is available here: the transport's audio goes through real `rtc.AudioSource` ->
`LocalAudioTrack` -> `AudioStream` loops inside the LiveKit SDK, and what it publishes to the room is
recorded by a stand-in for the agent's participant. The room-level test of the worker that uses this
transport is in test_livekit_plugins.py (it needs a server).
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("livekit.rtc")

from livekit import rtc  # noqa: E402
from livekit_audio import rtc_frames  # noqa: E402
from speech import RATE, piper_say, shared_whisper, silence  # noqa: E402

from rejoinder.streaming import livekit as lkt  # noqa: E402
from rejoinder.streaming.frames import AudioFrame  # noqa: E402
from rejoinder.streaming.text_metrics import word_error_rate  # noqa: E402
from rejoinder.streaming.transport import Transport, TransportClosed  # noqa: E402

pytestmark = pytest.mark.slow

WER_BOUND = 0.25
UTTERANCE = "Please remind me to call my sister after lunch tomorrow."


@pytest.fixture(scope="module")
def whisper():
    return shared_whisper()


# --- the module's footprint and frame conversion ---------------------------------------------------


def test_transport_module_needs_only_the_livekit_sdk():
    # A fresh interpreter: this test session has livekit.agents loaded already (the plugin tests).
    code = ("import sys, rejoinder.streaming.livekit; "
            "bad = sorted(m for m in sys.modules if m.startswith(('livekit.agents', 'rejoinder.agent'))); "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_rtc_frame_conversion_round_trips():
    stereo = np.array([[1, -1], [300, -300], [32767, -32768]], np.int16)
    rf = lkt.to_rtc_frame(AudioFrame(stereo, 48_000, 2))
    assert (rf.sample_rate, rf.num_channels, rf.samples_per_channel) == (48_000, 2, 3)
    back = lkt.from_rtc_frame(rf, timestamp=1.5)
    assert back.channels == 2 and back.timestamp == 1.5 and np.array_equal(back.samples, stereo)
    # Float samples are scaled to int16 and clipped, not wrapped.
    rf = lkt.to_rtc_frame(AudioFrame(np.array([0.5, -2.0, 2.0], np.float32), 16_000))
    assert np.frombuffer(rf.data, np.int16).tolist() == [16383, -32767, 32767]


# --- the LiveKit transport -----------------------------------------------------------------------


async def test_transport_audio_in_through_a_livekit_track(whisper):
    # A real LiveKit track: what is captured into `mic` comes out of an AudioStream at 16 kHz.
    mic = rtc.AudioSource(48_000, 1, queue_size_ms=200)
    stream = rtc.AudioStream(rtc.LocalAudioTrack.create_audio_track("mic", mic), sample_rate=16_000, num_channels=1)
    out = rtc.AudioSource(48_000, 1)
    transport = lkt.LiveKitTransport(source=out, audio=stream)
    speech = np.concatenate([piper_say(UTTERANCE), silence(0.3)])
    received: list[AudioFrame] = []

    async def listen() -> None:
        async for frame in transport.audio_in():
            received.append(frame)

    reader = asyncio.create_task(listen())
    for f in rtc_frames(speech):
        await mic.capture_frame(f)
    await mic.wait_for_playout()
    await asyncio.sleep(0.3)
    await transport.close()
    await asyncio.wait_for(reader, 5)  # closing ends audio_in()
    assert received and all(f.sample_rate == 16_000 and f.samples.dtype == np.int16 for f in received)
    heard = np.concatenate([f.to_float_mono() for f in received])
    assert heard.size / RATE >= speech.size / RATE - 0.1
    assert word_error_rate(UTTERANCE, whisper.transcribe(heard).text) <= WER_BOUND
    with pytest.raises(TransportClosed):
        await transport.send_audio(AudioFrame(np.zeros(441, np.int16), 22_050))


async def test_transport_audio_out_reaches_the_agent_track():
    out = rtc.AudioSource(48_000, 1, queue_size_ms=200)
    track = rtc.LocalAudioTrack.create_audio_track("agent", out)
    played = rtc.AudioStream(track, sample_rate=48_000, num_channels=1)
    transport = lkt.LiveKitTransport(source=out, audio=_never())
    assert transport.output_sample_rate == 48_000
    assert isinstance(transport, Transport)  # what the session is written against
    tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(22_050) / 22_050)).astype(np.float32)  # 1 s at 22.05 kHz
    got: list[np.ndarray] = []

    async def listen() -> None:
        async for ev in played:
            got.append(np.frombuffer(ev.frame.data, np.int16).astype(np.float32) / 32768)

    reader = asyncio.create_task(listen())
    for i in range(0, tone.size, 441):  # 20 ms float frames at the TTS rate: the transport resamples
        await transport.send_audio(AudioFrame(tone[i : i + 441], 22_050))
    await out.wait_for_playout()
    await asyncio.sleep(0.2)
    reader.cancel()
    await played.aclose()
    await transport.close()
    y = np.concatenate(got)
    loud = np.flatnonzero(np.abs(y) > 0.05)
    assert loud.size, "nothing audible came out of the track"
    y = y[loud[0] : loud[-1] + 1]
    assert abs(y.size / 48_000 - 1.0) < 0.05
    spectrum = np.abs(np.fft.rfft(y))
    assert abs(np.argmax(spectrum) * 48_000 / y.size - 440) < 5  # the same tone, at the right pitch
    assert np.sqrt(np.mean(y**2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.1)


async def _never():
    await asyncio.Event().wait()
    yield  # pragma: no cover


class RecordingLink:
    """The agent's side of a room as the transport sees it (no server here): records what is published."""

    def __init__(self) -> None:
        self.data: list[tuple[str, dict]] = []
        self.texts: list[tuple[str, str, dict, str | None]] = []
        self.attributes: list[dict] = []

    async def publish_data(self, payload, *, reliable=True, topic=""):
        self.data.append((topic, json.loads(payload)))

    async def stream_text(self, *, topic="", attributes=None, sender_identity=None):
        link = self

        class Writer:
            text = ""

            async def write(self, text):
                self.text += text

            async def aclose(self):
                link.texts.append((topic, self.text, dict(attributes or {}), sender_identity))

        return Writer()

    async def set_attributes(self, attributes):
        self.attributes.append(dict(attributes))


async def test_transport_publishes_events_transcriptions_and_state():
    out = rtc.AudioSource(48_000, 1, queue_size_ms=1000)
    link = RecordingLink()
    transport = lkt.LiveKitTransport(
        source=out, audio=_never(), link=link, user_identity="caller", user_track_sid=lambda: "TR_user",
        agent_track_sid="TR_agent",
    )
    events = [
        {"type": "state", "old": "listening", "new": "user_speaking"},
        {"type": "transcript", "text": "what time", "final": False, "utterance_id": 1},
        {"type": "transcript", "text": "What time is it?", "final": True, "utterance_id": 1},
        {"type": "state", "old": "user_speaking", "new": "thinking"},
        {"type": "agent_text", "turn": 1, "text": "It is noon.", "final": True, "interrupted": False},
        {"type": "metrics", "turn": 1, "voice_to_voice_s": 0.5},
    ]
    for ev in events:
        await transport.send_event(ev)
    await transport.close()  # flushes what is queued for publishing
    assert [d for topic, d in link.data if topic == "rejoinder.events"] == events
    user = [t for t in link.texts if t[2]["lk.segment_id"] == "user-1"]
    assert [(t[1], t[2]["lk.transcription_final"]) for t in user] == [
        ("what time", "false"), ("What time is it?", "true")]
    assert all(t[0] == "lk.transcription" and t[2]["lk.transcribed_track_id"] == "TR_user" and t[3] == "caller"
               for t in user)
    agent = [t for t in link.texts if t[2]["lk.segment_id"] == "agent-1"]
    assert agent == [("lk.transcription", "It is noon.", {
        "lk.segment_id": "agent-1", "lk.transcription_final": "true", "lk.transcribed_track_id": "TR_agent"}, None)]
    assert link.attributes == [{"lk.agent.state": "listening"}, {"lk.agent.state": "thinking"}]


async def test_transport_interruption_drops_audio_queued_in_livekit():
    out = rtc.AudioSource(48_000, 1, queue_size_ms=1000)
    transport = lkt.LiveKitTransport(source=out, audio=_never())
    for _ in range(25):  # 500 ms handed to LiveKit faster than it plays
        await transport.send_audio(AudioFrame(np.full(960, 1000, np.int16), 48_000))
    assert out.queued_duration > 0.3
    await transport.send_event({"type": "agent_speech", "turn": 1, "started": False, "interrupted": False})
    assert out.queued_duration > 0.3  # an answer that ended normally plays out
    await transport.send_event({"type": "barge_in", "turn": 1, "outcome": "interruption"})
    assert out.queued_duration == 0.0
    await transport.close()
