"""PlayoutBuffer: real-time pacing, instant flush, and sample-accurate "what was played"."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from rejoinder.streaming.frames import AudioFrame
from rejoinder.streaming.playout import PlayoutBuffer, PlayoutConfig, _voiced_span
from rejoinder.streaming.streamed_tts import SpeechChunk, StreamedTTS
from rejoinder.streaming.tts import PiperTTS

RATE = 22050
FRAME = RATE * 20 // 1000  # 441 samples


def tone_chunk(seconds: float = 0.0, text: str = "tone", *, samples: int | None = None, start: int = 0) -> SpeechChunk:
    n = samples if samples is not None else int(seconds * RATE)
    t = np.arange(n) / RATE
    audio = (0.3 * 32767 * np.sin(2 * np.pi * 220 * t)).astype(np.int16)
    return SpeechChunk(audio=audio, sample_rate=RATE, text=text, text_start=start, text_end=start + len(text),
                       segment_index=0)


class Recorder:
    """A sink that notes when each frame arrived."""

    def __init__(self) -> None:
        self.frames: list[AudioFrame] = []
        self.arrivals: list[float] = []

    def __call__(self, frame: AudioFrame) -> None:
        self.frames.append(frame)
        self.arrivals.append(time.monotonic())


@pytest.fixture(scope="module")
def tts() -> PiperTTS:
    # noise off: phoneme durations are deterministic, so a prefix of the text is spoken in the same
    # time alone as inside the whole sentence (the reference for played_text below)
    return PiperTTS(noise_scale=0.0, noise_w_scale=0.0)


async def test_pacing_is_real_time_and_drift_free() -> None:
    rec = Recorder()
    async with PlayoutBuffer(rec) as pb:
        pb.push(tone_chunk(samples=50 * FRAME))
        pb.finish_answer()
        t0 = time.monotonic()
        await asyncio.wait_for(pb.wait_idle(), 3.0)
        elapsed = time.monotonic() - t0
    assert len(rec.frames) == 50
    assert all(f.samples.shape == (FRAME,) and f.samples.dtype == np.int16 and f.sample_rate == RATE
               for f in rec.frames)
    # frame n is stamped anchor + n * 20 ms exactly: no accumulated drift
    stamps = np.array([f.timestamp for f in rec.frames])
    np.testing.assert_allclose(np.diff(stamps), 0.02, atol=1e-9)
    # 50 frames take ~49 x 20 ms (the first goes out at once); loose bound for a busy machine
    assert 0.9 < elapsed < 1.3
    # and each frame left close to its due time
    lateness = np.array(rec.arrivals) - stamps
    assert np.median(lateness) < 0.005
    assert pb.metrics.frames_out == 50 and pb.metrics.underruns == 0


async def test_played_samples_are_sample_accurate() -> None:
    rec = Recorder()
    async with PlayoutBuffer(rec) as pb:
        pb.push(tone_chunk(samples=1000, text="a"))
        pb.push(tone_chunk(samples=500, text=" b", start=1))
        pb.finish_answer()
        await asyncio.wait_for(pb.wait_idle(), 1.0)
        await asyncio.sleep(0.05)
    assert pb.played_samples == 1500  # zero padding of the last frame is not "played"
    assert pb.played_seconds == pytest.approx(1500 / RATE)
    assert len(rec.frames) == 4  # ceil(1500 / 441), chunks joined without gaps
    sent = np.concatenate([f.samples for f in rec.frames])
    expected = np.concatenate([tone_chunk(samples=1000).audio, tone_chunk(samples=500).audio])
    np.testing.assert_array_equal(sent[:1500], expected)
    assert not sent[1500:].any()
    assert pb.played_text() == "a b"


async def test_flush_stops_output_within_one_frame() -> None:
    rec = Recorder()
    async with PlayoutBuffer(rec) as pb:
        pb.push(tone_chunk(2.0, "first part"))
        pb.push(tone_chunk(2.0, " second part", start=10))
        await asyncio.sleep(0.3)
        flushed_at = time.monotonic()
        result = pb.flush()
        n_at_flush = len(rec.frames)
        await asyncio.sleep(0.2)
    late = [t for t in rec.arrivals if t > flushed_at]
    assert late == [] and len(rec.frames) == n_at_flush
    played = pb.played_samples
    assert 0.2 * RATE < played < 0.45 * RATE
    assert result.dropped_samples == 4 * RATE - played
    assert result.dropped_seconds == pytest.approx(result.dropped_samples / RATE)
    assert result.played_text + result.dropped_text == "first part second part"
    assert result.dropped_text.endswith(" second part")
    assert not pb.is_playing and pb.metrics.flushes == 1


async def test_underrun_sends_nothing_by_default() -> None:
    rec = Recorder()
    async with PlayoutBuffer(rec) as pb:
        pb.push(tone_chunk(samples=3 * FRAME))
        await asyncio.sleep(0.2)  # answer still "streaming": the queue ran dry
        assert len(rec.frames) == 3
        assert pb.metrics.underruns == 1
        pb.push(tone_chunk(samples=2 * FRAME, start=4))
        await asyncio.sleep(0.1)
    assert len(rec.frames) == 5
    assert all(np.abs(f.samples).max() > 1000 for f in rec.frames)  # never fake audio


async def test_silence_frames_when_configured() -> None:
    rec = Recorder()
    async with PlayoutBuffer(rec, sample_rate=RATE, config=PlayoutConfig(silence_when_idle=True)) as pb:
        await asyncio.sleep(0.2)
        pb.push(tone_chunk(samples=2 * FRAME))
        await asyncio.sleep(0.2)
    silent = [f for f in rec.frames if not f.samples.any()]
    assert len(silent) >= 10 and pb.metrics.silence_frames == len(silent)
    assert pb.metrics.frames_out == 2 and pb.played_samples == 2 * FRAME
    stamps = np.array([f.timestamp for f in rec.frames])
    np.testing.assert_allclose(np.diff(stamps), 0.02, atol=1e-9)  # one continuous clock


async def test_async_sink_and_failing_sink() -> None:
    got: list[AudioFrame] = []
    calls = 0

    async def sink(frame: AudioFrame) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise ConnectionError("peer went away")
        got.append(frame)

    async with PlayoutBuffer(sink) as pb:
        pb.push(tone_chunk(samples=4 * FRAME))
        pb.finish_answer()
        await asyncio.wait_for(pb.wait_idle(), 1.0)
        await asyncio.sleep(0.03)
    assert len(got) == 3 and pb.metrics.sink_errors == 1  # the loop survived the broken sink


async def test_reset_starts_a_new_answer() -> None:
    async with PlayoutBuffer(Recorder()) as pb:
        pb.push(tone_chunk(samples=2 * FRAME, text="old"))
        await asyncio.wait_for(pb.wait_idle(), 1.0)
        assert pb.played_text() == "old"
        pb.reset()
        assert pb.played_text() == "" and pb.played_samples == 0
        pb.push(tone_chunk(samples=FRAME, text="new"))
        await asyncio.wait_for(pb.wait_idle(), 1.0)
        assert pb.played_text() == "new"


def test_rejects_mismatched_chunks() -> None:
    pb = PlayoutBuffer(Recorder(), sample_rate=RATE)
    with pytest.raises(ValueError):
        pb.push(SpeechChunk(np.zeros(10, np.int16), 16000, "x", 0, 1, 0))
    with pytest.raises(ValueError):
        pb.push(SpeechChunk(np.zeros(10, np.float32), RATE, "x", 0, 1, 0))


SENTENCE = "The small dog ran down the long road and then sat by the old gate near the red barn."


@pytest.mark.parametrize("k", [3, 8, 13])
async def test_played_text_matches_what_was_heard(tts: PiperTTS, k: int) -> None:
    """Play the sentence for as long as its first k words take to say, then flush: played_text must
    hold k words, give or take one. The reference duration comes from synthesising those k words alone."""
    words = SENTENCE.split()
    audio = tts.synthesize(SENTENCE)
    pcm = (audio * 32767).astype(np.int16)
    prefix = (tts.synthesize(" ".join(words[:k])) * 32767).astype(np.int16)
    p0, p1 = _voiced_span(prefix, RATE)
    # where the k-th word ends in the full sentence: its speech onset plus the prefix's speech length
    target = _voiced_span(pcm, RATE)[0] + (p1 - p0)

    async with PlayoutBuffer(Recorder()) as pb:
        pb.push(SpeechChunk(pcm, RATE, SENTENCE, 0, len(SENTENCE), 0))
        while pb.played_samples < target:
            await asyncio.sleep(0.002)
        result = pb.flush()
    played = result.played_text
    assert SENTENCE.startswith(played)
    assert abs(len(played.split()) - k) <= 1, (k, played)
    assert played + result.dropped_text == SENTENCE


async def test_streamed_answer_truncated_on_barge_in(tts: PiperTTS) -> None:
    """End to end: tokens -> StreamedTTS -> playout; barge-in after ~1.5 s; history keeps what was heard."""
    answer = "Hello there. I am going to tell you a rather long story about a dog. It ran down the road."

    async def deltas():
        for i in range(0, len(answer), 3):
            yield answer[i : i + 3]
            await asyncio.sleep(0.005)

    rec = Recorder()
    stream = StreamedTTS(tts)
    async with PlayoutBuffer(rec) as pb:

        async def feed() -> None:
            async for chunk in stream.run(deltas()):
                pb.push(chunk)
            pb.finish_answer()

        feeder = asyncio.create_task(feed())
        while pb.played_seconds < 1.5:
            await asyncio.sleep(0.005)
        stream.cancel()
        result = pb.flush()
        await asyncio.wait_for(feeder, 1.0)
    heard = result.played_text
    assert answer.startswith(heard)
    assert heard.startswith("Hello there.") and len(heard) < len(answer)
    assert pb.metrics.first_frame_at is not None and stream.metrics.first_audio_at is not None
    assert pb.metrics.first_frame_at >= stream.metrics.first_audio_at


class ReserveSink:
    """A transport with a send reserve: frames wait in a queue until its own clock takes them."""

    def __init__(self) -> None:
        self.queue: list[AudioFrame] = []
        self.sent: list[AudioFrame] = []
        self.arrivals: list[float] = []

    def __call__(self, frame: AudioFrame) -> None:
        self.queue.append(frame)
        self.arrivals.append(time.monotonic())

    def send_one(self) -> None:
        if self.queue:
            self.sent.append(self.queue.pop(0))

    def recall(self) -> float:
        n, self.queue = len(self.queue), []
        return n * 0.02


async def test_lead_hands_the_reserve_over_at_once_then_paces() -> None:
    sink = ReserveSink()
    async with PlayoutBuffer(sink, config=PlayoutConfig(lead_s=0.06), recall=sink.recall) as pb:
        pb.push(tone_chunk(samples=20 * FRAME))
        pb.finish_answer()
        await asyncio.wait_for(pb.wait_idle(), 3.0)
    assert len(sink.arrivals) == 20
    gaps = np.diff(sink.arrivals)
    assert gaps[:2].max() < 0.015  # frames 0-2 (the reserve) together
    # the rest at real-time pace: 17 frame periods after the reserve (loose: a busy box)
    assert 0.25 < sink.arrivals[-1] - sink.arrivals[2] < 0.6
    stamps = np.array([f.timestamp for f in sink.queue])
    assert np.all(np.diff(stamps[3:]) == pytest.approx(0.02, abs=1e-9))


async def test_pause_takes_the_reserve_back_and_resume_sends_it_again() -> None:
    sink = ReserveSink()
    audio = tone_chunk(samples=30 * FRAME).audio.copy()
    audio += np.arange(audio.size, dtype=np.int16) % 7  # every frame different
    chunk = SpeechChunk(audio=audio, sample_rate=RATE, text="one two three", text_start=0, text_end=13,
                        segment_index=0)
    async with PlayoutBuffer(sink, config=PlayoutConfig(lead_s=0.06), recall=sink.recall) as pb:
        pb.push(chunk)
        pb.finish_answer()
        for _ in range(8):  # the transport's clock sends eight frames
            await asyncio.sleep(0.02)
            sink.send_one()
        queued_before = len(sink.queue)
        pb.pause()
        # what was queued unsent is no longer counted as played: the position is the sent audio's
        assert queued_before >= 2 and sink.queue == []
        assert pb.played_samples == len(sink.sent) * FRAME
        assert pb.metrics.recalled_frames == queued_before
        await asyncio.sleep(0.1)
        assert sink.queue == []  # paused: nothing new handed over
        pb.resume()
        while not pb.paused and (pb.is_playing or sink.queue):
            await asyncio.sleep(0.02)
            sink.send_one()
        await asyncio.wait_for(pb.wait_idle(), 3.0)
        sink.sent.extend(sink.queue)
    # the caller heard every sample once, in order, nothing doubled or lost at the pause
    heard = np.concatenate([f.samples for f in sink.sent])
    np.testing.assert_array_equal(heard[: audio.size], audio)
    assert heard.size == audio.size and pb.played_samples == audio.size


async def test_flush_with_a_reserve_drops_it_and_counts_only_what_was_sent() -> None:
    sink = ReserveSink()
    async with PlayoutBuffer(sink, config=PlayoutConfig(lead_s=0.06), recall=sink.recall) as pb:
        pb.push(tone_chunk(samples=30 * FRAME, text="one two three four five six"))
        for _ in range(10):
            await asyncio.sleep(0.02)
            sink.send_one()
        result = pb.flush()
        assert sink.queue == []
        assert pb.played_samples == len(sink.sent) * FRAME
        assert result.dropped_samples == 30 * FRAME - len(sink.sent) * FRAME
        await asyncio.sleep(0.06)
        assert sink.queue == []
