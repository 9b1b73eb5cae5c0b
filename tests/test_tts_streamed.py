"""StreamedTTS with the real Piper voice: early first audio, exact text per chunk, instant cancel."""
from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest

from rejoinder.streaming.streamed_tts import SpeechChunk, StreamedTTS, _default_executor
from rejoinder.streaming.tts import PiperTTS

LONG_TEXT = (
    "Sure, I can help with that. Dr. Smith paid $3.50 on Jan. 5, and then he left the office. "
    "The weather was cold, so he walked quickly towards the station near the old market square. "
    "When the train finally arrived, it was almost completely full of tired commuters going home. "
    "He found a seat by the window and watched the city lights pass by in the rain. "
    "It had been a long day, but he was happy to be going home at last."
)


@pytest.fixture(scope="module")
def tts() -> PiperTTS:
    voice = PiperTTS()
    voice.synthesize("Warm up.")  # first onnx run allocates; keep it out of the timings
    return voice


async def tokens(text: str, *, delay: float = 0.0, seed: int = 0) -> AsyncIterator[str]:
    """LLM-like deltas: random 1-7 character pieces, optionally paced."""
    rng = random.Random(seed)
    i = 0
    while i < len(text):
        k = rng.randint(1, 7)
        yield text[i : i + k]
        i += k
        await asyncio.sleep(delay)


async def test_chunks_cover_the_text_exactly(tts: PiperTTS) -> None:
    stream = StreamedTTS(tts)
    chunks = [c async for c in stream.run(tokens(LONG_TEXT, seed=1))]
    assert stream.text == LONG_TEXT
    assert "".join(c.text for c in chunks) == LONG_TEXT
    for c in chunks:
        assert LONG_TEXT[c.text_start : c.text_end] == c.text
        assert c.audio.dtype == np.int16 and c.sample_rate == 22050 and c.num_samples > 0
    # no lead-in here: "with", which shows the break before it, came in the same delta as the period
    assert chunks[0].text.strip() == "Sure, I can help with that."
    m = stream.metrics
    assert m.chunks == len(chunks) and m.segments >= 5
    assert m.started_at <= m.first_token_at <= m.first_segment_at <= m.first_audio_at <= m.finished_at
    assert m.cancelled_at is None
    assert m.audio_seconds == pytest.approx(sum(c.duration for c in chunks))


async def test_first_audio_is_a_fraction_of_full_synthesis(tts: PiperTTS) -> None:
    t0 = time.monotonic()
    tts.synthesize(LONG_TEXT)
    full = time.monotonic() - t0

    stream = StreamedTTS(tts)
    t0 = time.monotonic()
    first = None
    async for _ in stream.run(tokens(LONG_TEXT, seed=2)):
        if first is None:
            first = time.monotonic() - t0
    assert first is not None
    # the first clause is ~6 % of the text; 40 % leaves room for a slow, busy CI machine
    assert first < 0.4 * full, f"first audio after {first:.3f}s, full synthesis {full:.3f}s"


async def test_cancel_stops_output_within_a_frame(tts: PiperTTS) -> None:
    stream = StreamedTTS(tts)
    got: list[SpeechChunk] = []
    after_cancel: list[SpeechChunk] = []
    cancelled_at: list[float] = []
    ended_at: list[float] = []

    async def consume() -> None:
        async for c in stream.run(tokens(LONG_TEXT, seed=3)):
            (after_cancel if cancelled_at else got).append(c)
        ended_at.append(time.monotonic())

    task = asyncio.create_task(consume())
    while not got:
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.03)  # now inside the next clause's onnx call
    cancelled_at.append(time.monotonic())
    stream.cancel()
    await asyncio.wait_for(task, 2.0)
    assert after_cancel == []
    assert ended_at[0] - cancelled_at[0] < 0.02  # within one 20 ms frame
    assert stream.metrics.cancelled_at is not None and stream.metrics.finished_at is None
    assert sum(len(c.text) for c in got) < len(LONG_TEXT)

    # The worker thread is free again at once: the running onnx call was aborted, and no further
    # clause was handed to Piper.
    t0 = time.monotonic()
    await asyncio.get_running_loop().run_in_executor(_default_executor(), time.monotonic)
    assert time.monotonic() - t0 < 0.05


async def test_the_token_producer_is_held_while_each_piece_is_synthesised(tts: PiperTTS) -> None:
    """synthesis_hold brackets every piece's synthesis (the agent pauses the LLM meanwhile): every
    chunk comes out inside a hold, holds never nest, and a cancel mid-piece still releases."""
    calls: list[tuple[bool, float]] = []
    stream = StreamedTTS(tts, synthesis_hold=lambda on: calls.append((on, time.monotonic())))
    chunks: list[tuple[SpeechChunk, float]] = []
    async for c in stream.run(tokens(LONG_TEXT, delay=0.002, seed=5)):
        chunks.append((c, time.monotonic()))
    assert [on for on, _ in calls] == [True, False] * stream.metrics.segments, calls
    spans = [(calls[i][1], calls[i + 1][1]) for i in range(0, len(calls), 2)]
    for c, at in chunks:
        assert any(a <= at <= b for a, b in spans), (c.text, at, spans)
    assert len({c.segment_index for c, _ in chunks}) == stream.metrics.segments > 3

    calls.clear()
    stream = StreamedTTS(tts, synthesis_hold=lambda on: calls.append((on, time.monotonic())))

    async def consume() -> None:
        async for _ in stream.run(tokens(LONG_TEXT, seed=6)):
            pass

    task = asyncio.create_task(consume())
    while not calls:
        await asyncio.sleep(0.001)
    stream.cancel()
    await asyncio.wait_for(task, 2.0)
    assert [on for on, _ in calls] == [True, False]


async def test_cancel_before_any_token(tts: PiperTTS) -> None:
    async def silent() -> AsyncIterator[str]:
        await asyncio.sleep(10)
        yield "never"

    stream = StreamedTTS(tts)
    results: list[SpeechChunk] = []

    async def consume() -> None:
        async for c in stream.run(silent()):
            results.append(c)

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.05)
    stream.cancel()
    await asyncio.wait_for(task, 0.5)
    assert results == []


async def test_consumer_breaking_out_stops_synthesis(tts: PiperTTS) -> None:
    stream = StreamedTTS(tts)
    async for _ in stream.run(tokens(LONG_TEXT, seed=4)):
        break
    await asyncio.sleep(0)  # let the generator's cleanup run
    t0 = time.monotonic()
    await asyncio.get_running_loop().run_in_executor(_default_executor(), time.monotonic)
    assert time.monotonic() - t0 < 0.05


async def test_token_stream_error_propagates(tts: PiperTTS) -> None:
    async def broken() -> AsyncIterator[str]:
        yield "Hello there. "
        raise RuntimeError("engine died")

    stream = StreamedTTS(tts)
    with pytest.raises(RuntimeError, match="engine died"):
        async for _ in stream.run(broken()):
            pass


async def test_run_is_single_use(tts: PiperTTS) -> None:
    stream = StreamedTTS(tts)
    assert [c async for c in stream.run(tokens("Hi."))]
    with pytest.raises(RuntimeError):
        async for _ in stream.run(tokens("Again.")):
            pass
