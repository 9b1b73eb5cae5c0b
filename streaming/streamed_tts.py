"""Speak an LLM's answer while it is still being generated: text deltas in, audio chunks out.

`StreamedTTS.run(tokens)` reads text deltas (arbitrary splits) in a background task, cuts them into
clauses with `TextSegmenter`, and synthesises each clause in a worker thread as soon as it is
complete, yielding a `SpeechChunk` per Piper sentence. Every chunk carries the exact slice of the
answer text it speaks, so the playout buffer can report which words were heard.

`cancel()` (barge-in) stops everything at once: no chunk is yielded afterwards, the onnx call in
flight is aborted through onnxruntime's terminate flag (freeing the CPU within a millisecond), no
further clause is handed to Piper, and the token reader stops.
"""
from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .frames import to_pcm16
from .text_segmenter import Segment, SegmenterConfig, TextSegmenter
from .tts import SynthesisCancel, TTSChunk

log = logging.getLogger("rejoinder.streaming.streamed_tts")

__all__ = ["SpeechChunk", "StreamedTTS", "Synthesizer", "TTSMetrics", "speech_text"]


class Synthesizer(Protocol):
    """What StreamedTTS needs from a TTS engine (PiperTTS satisfies it)."""

    sample_rate: int

    def iter_synthesize(self, text: str, cancel: SynthesisCancel | None = None) -> Iterator[TTSChunk]: ...


@dataclass(frozen=True)
class SpeechChunk:
    """Audio for one piece of the answer, and the exact text it speaks."""

    audio: np.ndarray  # int16 mono
    sample_rate: int
    text: str  # == answer_text[text_start:text_end]
    text_start: int
    text_end: int
    segment_index: int

    @property
    def num_samples(self) -> int:
        return int(self.audio.shape[0])

    @property
    def duration(self) -> float:
        return self.num_samples / self.sample_rate


@dataclass
class TTSMetrics:
    """time.monotonic() stamps of one streamed answer (None: did not happen)."""

    started_at: float | None = None  # run() began
    first_token_at: float | None = None
    first_segment_at: float | None = None  # first speakable clause complete
    first_audio_at: float | None = None  # first chunk synthesised and handed out
    finished_at: float | None = None  # all text spoken (stays None when cancelled)
    cancelled_at: float | None = None
    segments: int = 0
    chunks: int = 0
    audio_seconds: float = 0.0
    synth_seconds: float = 0.0  # worker time spent in Piper (for the real-time factor)
    segment_texts: list[str] = field(default_factory=list)

# --- text clean-up, length-preserving so chunk texts map back to the answer by offset -------------

_MARKUP = re.compile(r"[*`#~]|__|(?<=\s)_|_(?=\s)")
_TITLE_DOT = re.compile(
    r"\b(?:Mr|Mrs|Ms|Mx|Dr|Prof|Rev|Fr|Sr|Jr|St|Mt|Gen|Col|Capt|Lt|Sgt|Gov|Sen|Rep|"
    r"Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec|Inc|Ltd|Corp|Co|vs|No)\.(?=\s)"
)
_INITIALISM_DOTS = re.compile(r"\b(?!e\.g\.|i\.e\.)(?:[A-Za-z]\.){2,}(?=\s)")


def speech_text(text: str) -> str:
    """What Piper should read for `text`, with exactly the same length (offsets stay valid).

    Markdown symbols become spaces (otherwise espeak reads "asterisk"); periods of abbreviations
    inside a clause become spaces, because espeak treats "Dr." or "U.S." as the end of a sentence and
    gives it a falling, pausing intonation. A clause's own final period is kept.
    """
    out = _MARKUP.sub(lambda m: " " * len(m.group()), text)
    body_end = len(out.rstrip())
    body, tail = out[:body_end], out[body_end:]
    # Leave the clause-final punctuation alone: "... on Jan." really ends there.
    last_dot = len(body) - 1 if body.endswith(".") else len(body)
    inner = _TITLE_DOT.sub(lambda m: m.group()[:-1] + " ", body[:last_dot])
    inner = _INITIALISM_DOTS.sub(lambda m: m.group().replace(".", " "), inner)
    return inner + body[last_dot:] + tail


# --- the worker -------------------------------------------------------------------------------------

_EXECUTOR: ThreadPoolExecutor | None = None
_EXECUTOR_LOCK = threading.Lock()


def _default_executor() -> ThreadPoolExecutor:
    """One shared TTS worker thread: on a small CPU two concurrent syntheses only slow each other down."""
    global _EXECUTOR
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rejoinder-tts")
        return _EXECUTOR


@dataclass(frozen=True)
class _Step:
    chunk: TTSChunk
    pcm: np.ndarray
    seconds: float


def _next_step(it: Iterator[TTSChunk]) -> _Step | None:
    """Runs in the worker: synthesise the next Piper sentence and convert it to int16 there, off the loop."""
    t0 = time.monotonic()
    chunk = next(it, None)
    if chunk is None:
        return None
    pcm = to_pcm16(chunk.audio)
    return _Step(chunk, pcm, time.monotonic() - t0)


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_END = object()


class StreamedTTS:
    """One streamed answer. Create one per assistant turn; `run()` may be iterated once.

    Call `cancel()` from the event loop thread (the agent's barge-in path).
    """

    def __init__(
        self,
        tts: Synthesizer,
        *,
        segmenter: SegmenterConfig | None = None,
        executor: Executor | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tts = tts
        self.metrics = TTSMetrics()
        self._segmenter = TextSegmenter(segmenter)
        self._executor = executor
        self._clock = clock
        self._synth_cancel = SynthesisCancel()
        self._cancelled = asyncio.Event()
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        self._started = False

    @property
    def text(self) -> str:
        """All answer text received so far (chunk offsets index into it)."""
        return self._segmenter.text

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop now: no more chunks, abort the onnx call in flight, stop reading tokens. Idempotent."""
        if self._cancelled.is_set():
            return
        self.metrics.cancelled_at = self._clock()
        self._cancelled.set()
        self._synth_cancel.cancel()
        if self._reader is not None:
            self._reader.cancel()
        log.debug("streamed TTS cancelled after %d chunk(s)", self.metrics.chunks)

    async def run(self, tokens: AsyncIterable[str]) -> AsyncIterator[SpeechChunk]:
        """Yield speech for `tokens` clause by clause until the stream ends or `cancel()` is called."""
        if self._started:
            raise RuntimeError("StreamedTTS.run() can only be iterated once; make a new StreamedTTS per answer")
        self._started = True
        self.metrics.started_at = self._clock()
        self._reader = asyncio.create_task(self._read(tokens), name="rejoinder-tts-reader")
        try:
            while not self.cancelled:
                item = await self._wait(self._queue.get())
                if item is None or item is _END:
                    break
                if isinstance(item, _Failed):
                    raise item.exc
                assert isinstance(item, Segment)
                async with aclosing(self._speak(item)) as chunks:
                    async for chunk in chunks:
                        yield chunk
            if not self.cancelled:
                self.metrics.finished_at = self._clock()
        finally:
            # Also reached when the consumer stops iterating or its task is cancelled: make sure the
            # worker does not keep synthesising for nobody.
            self._synth_cancel.cancel()
            if self._reader is not None and not self._reader.done():
                self._reader.cancel()
            m = self.metrics
            log.debug(
                "streamed TTS done: %d segment(s), %d chunk(s), %.2f s audio in %.2f s synthesis%s",
                m.segments, m.chunks, m.audio_seconds, m.synth_seconds, " (cancelled)" if self.cancelled else "",
            )

    async def _read(self, tokens: AsyncIterable[str]) -> None:
        try:
            async for delta in tokens:
                if self.metrics.first_token_at is None:
                    self.metrics.first_token_at = self._clock()
                for seg in self._segmenter.push(delta):
                    self._enqueue(seg)
            for seg in self._segmenter.finish():
                self._enqueue(seg)
            self._queue.put_nowait(_END)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the LLM stream failed: surface it to whoever iterates run()
            self._queue.put_nowait(_Failed(exc))

    def _enqueue(self, seg: Segment) -> None:
        if not seg.speakable:
            return
        if self.metrics.first_segment_at is None:
            self.metrics.first_segment_at = self._clock()
        self.metrics.segments += 1
        self.metrics.segment_texts.append(seg.text)
        self._queue.put_nowait(seg)

    async def _wait(self, aw: object) -> object | None:
        """Await `aw` unless cancel() comes first (then None, and `aw` is abandoned)."""
        fut = asyncio.ensure_future(aw)  # type: ignore[arg-type]
        stop = asyncio.ensure_future(self._cancelled.wait())
        try:
            await asyncio.wait({fut, stop}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            fut.cancel()  # our caller was cancelled: leave no orphaned waiter behind
            raise
        finally:
            stop.cancel()
        if not fut.done():
            fut.cancel()
            return None
        return fut.result()

    async def _speak(self, seg: Segment) -> AsyncIterator[SpeechChunk]:
        loop = asyncio.get_running_loop()
        executor = self._executor or _default_executor()
        # Piper's chunk texts are slices of `spoken`, which has the same length as seg.text.
        it = self.tts.iter_synthesize(speech_text(seg.text), cancel=self._synth_cancel)
        offset = 0
        step = await self._wait(loop.run_in_executor(executor, _next_step, it))
        while isinstance(step, _Step) and not self.cancelled:
            # Queue the clause's next Piper sentence before handing this one out, so synthesis
            # overlaps with whatever the consumer does with the chunk.
            nxt = loop.run_in_executor(executor, _next_step, it)
            n = len(step.chunk.text)
            chunk = SpeechChunk(
                audio=step.pcm,
                sample_rate=step.chunk.sample_rate,
                text=seg.text[offset : offset + n],
                text_start=seg.start + offset,
                text_end=seg.start + offset + n,
                segment_index=seg.index,
            )
            offset += n
            self.metrics.synth_seconds += step.seconds
            self._account(chunk)
            yield chunk
            step = await self._wait(nxt)

    def _account(self, chunk: SpeechChunk) -> None:
        m = self.metrics
        if m.first_audio_at is None:
            m.first_audio_at = self._clock()
        m.chunks += 1
        m.audio_seconds += chunk.duration
        log.debug("chunk seg=%d %.2fs %r", chunk.segment_index, chunk.duration, chunk.text)
