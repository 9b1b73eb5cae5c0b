"""The speech detector on a live-like stream: 20 ms frames, capture timestamps, hours-long operation."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from speech import RATE, dialogue, espeak_say, piper_say, silence

from rejoinder.streaming.frames import AudioFrame, FrameChunker
from rejoinder.streaming.vad import SileroVAD, SpeechDetector, VADConfig

TOL_S = 0.3


@pytest.fixture(scope="module")
def silero() -> SileroVAD:
    return SileroVAD()


@pytest.fixture(scope="module")
def three_turns():
    return dialogue(
        0.4,
        piper_say("Good morning, I need to book a table."),
        1.2,
        espeak_say("For how many people?"),
        1.5,
        piper_say("Four people, at eight tonight please."),
        0.8,
    )


def frames_48k(audio_16k: np.ndarray, t0: float) -> list[AudioFrame]:
    """The audio as a WebRTC peer would send it: 10 ms int16 frames at 48 kHz, stamped at capture."""
    from rejoinder.streaming.audio import resample

    x = (resample(audio_16k, RATE, 48000) * 32767).astype(np.int16)
    return [AudioFrame(x[i : i + 480], 48000, 1, t0 + i / 48000) for i in range(0, x.size, 480)]


def test_events_from_transport_frames(silero, three_turns):
    t0 = 1000.0
    chunker = FrameChunker(RATE)
    det = SpeechDetector(silero, VADConfig(min_speech_s=0.2, hangover_s=0.5))
    events = []
    for f in frames_48k(three_turns.audio, t0):
        for f20 in chunker.push(f):
            events += det.process_frame(f20)
    kinds = [e.kind for e in events]
    assert kinds == ["speech_start", "speech_end"] * 3, kinds
    starts, ends = events[0::2], events[1::2]
    for (s_true, e_true), s, e in zip(three_turns.spans, starts, ends):
        assert abs(s.audio_time_s - s_true) < TOL_S
        assert abs(e.audio_time_s - e_true) < TOL_S
        # captured_at maps audio time back to the capture clock of the frames.
        assert s.captured_at == pytest.approx(t0 + s.audio_time_s, abs=0.03)
        assert e.captured_at == pytest.approx(t0 + e.audio_time_s, abs=0.03)
        assert s.emitted_at > 0 and e.emitted_at >= s.emitted_at


def test_hangover_and_min_speech_are_configurable(silero, three_turns):
    audio = np.asarray(three_turns.audio)

    def count(cfg: VADConfig) -> int:
        det = SpeechDetector(silero, cfg)
        return sum(e.kind == "speech_start" for e in det.process(audio) + det.flush())

    assert count(VADConfig(hangover_s=0.5)) == 3
    # A hang-over longer than the pauses (1.2 s, 1.5 s) merges all three turns into one.
    assert count(VADConfig(hangover_s=1.8)) == 1
    # A minimum speech length longer than any turn suppresses them all.
    assert count(VADConfig(min_speech_s=5.0)) == 0


def test_ten_minutes_streaming_stays_bounded(silero):
    """10 min of audio (speech, pauses, a long silence that triggers a model reset) in 20 ms frames:
    the right number of events, and memory that does not grow with stream length."""
    turn = np.concatenate([piper_say("Yes, that sounds right to me."), silence(1.5)])
    block = np.concatenate([turn] * 10)  # ~ 40 s
    n_blocks = int(np.ceil(600 * RATE / block.size))
    quiet_block = np.concatenate([silence(35.0), block])  # built before tracing starts
    det = SpeechDetector(silero, VADConfig(reset_after_silence_s=30.0))
    frame = 320
    starts = ends = 0
    resets_seen = 0
    tracemalloc.start()
    try:
        for b in range(n_blocks):
            audio = block if b != n_blocks // 2 else quiet_block
            for i in range(0, audio.size, frame):
                before = det.vad._state  # type: ignore[attr-defined]
                for e in det.process(audio[i : i + frame]):
                    starts += e.kind == "speech_start"
                    ends += e.kind == "speech_end"
                if det.vad._state is not before and not det.vad._state.any():  # type: ignore[attr-defined]
                    resets_seen += 1
            if b == 1:
                base, _ = tracemalloc.get_traced_memory()
                tracemalloc.reset_peak()
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert det.audio_time_s >= 600
    assert starts == ends == 10 * n_blocks
    assert resets_seen >= 1
    assert det._pending.size < silero.window_samples
    # Bounded: nothing accumulates per frame (allow a little allocator noise).
    assert current - base < 64 * 1024, (base, current)
    assert peak - base < 512 * 1024, (base, peak)
