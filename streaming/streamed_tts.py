"""Speak an LLM's answer while it is still being generated: text deltas in, audio chunks out.

`StreamedTTS.run(tokens)` reads text deltas (arbitrary splits) in a background task, cuts them into
clauses with `TextSegmenter`, and synthesises each clause in a worker thread as soon as it is
complete, yielding a `SpeechChunk` per Piper sentence. Every chunk carries the exact slice of the
answer text it speaks, so the playout buffer can report which words were heard.

`cancel()` (barge-in) stops everything at once: no chunk is yielded afterwards, the onnx call in
flight is aborted through onnxruntime's terminate flag (freeing the CPU within a millisecond), no
further clause is handed to Piper, and the token reader stops.

Joins (`JoinConfig`): Piper synthesises every piece as a whole utterance — ~50 ms of silence before
the voice, 140-260 ms after it, and a falling, final intonation at its end. Where a sentence or a
comma ends a piece that is what continuous speech has there too (Piper's own pause at a comma is
~250-390 ms), so those joins are left alone. Where a piece ends mid-phrase (a lead-in such as
"The capital", or a cut at a conjunction), it is spoken as if a comma followed (a continuation
intonation instead of a final fall; the comma is not in the chunk's text), its trailing silence is
cut to `word_gap_s - lead_s` and the next piece's leading silence to `lead_s`, so the words meet with
a gap like Piper's own between words (20-115 ms, measured); each cut edge gets a short fade. The
answer's very first chunk also loses most of its leading silence (it is latency a caller hears),
and no other piece keeps more than `max_lead_s` (Piper's leading silence is 40 ms at the median but
now and then 0.4 s, an odd pause between two sentences).
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

__all__ = [
    "JoinConfig", "SpeechChunk", "StreamedTTS", "Synthesizer", "TTSMetrics", "ends_mid_phrase", "speech_text",
    "trim_silence",
]


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
    gain: float = 1.0  # what the TTS scaled the model's output by (one value per voice by default)

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
    trimmed_seconds: float = 0.0  # silence cut at joins, net of any added (JoinConfig)

    @property
    def first_audio_latency(self) -> float | None:
        """First token -> first chunk handed out (None until both happened)."""
        if self.first_token_at is None or self.first_audio_at is None:
            return None
        return self.first_audio_at - self.first_token_at


@dataclass(frozen=True)
class JoinConfig:
    """How consecutive pieces of one answer meet (module docstring). `StreamedTTS(joins=None)`: raw Piper."""

    word_gap_s: float = 0.06  # silence between words where a piece ends mid-phrase
    lead_s: float = 0.02  # ... of it before the next piece's voice (the rest after the previous one)
    first_lead_s: float | None = 0.02  # silence kept before the answer's first word (None: Piper's ~50 ms)
    max_lead_s: float | None = 0.08  # at most this before any other piece (Piper: 40 ms median, rarely 0.45 s)
    continuation_comma: bool = True  # speak a mid-phrase end as if a comma followed
    min_lead_s: float = 0.015  # silence put before a piece whose voice starts at its first sample
    fade_s: float = 0.004  # fade at an edge that was cut
    onset_fade_s: float = 0.012  # fade where the voice itself touches an edge (Piper's abrupt fricatives)
    floor_db: float = -50.0  # below this (re the piece's peak, in 5 ms windows) counts as silence

    def __post_init__(self) -> None:
        if (not 0 <= self.lead_s <= self.word_gap_s or min(self.fade_s, self.onset_fade_s, self.min_lead_s) < 0
                or (self.first_lead_s or 0) < 0 or (self.max_lead_s or 0) < 0):
            raise ValueError(f"inconsistent join settings: {self}")

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


def ends_mid_phrase(text: str) -> bool:
    """True when `text` stops between two words of a phrase (no punctuation ends it)."""
    body = text.rstrip()
    return bool(body) and (body[-1].isalnum() or body[-1] in "%$€£'’\"”)")


# --- joins ------------------------------------------------------------------------------------------

_WINDOW_S = 0.005


def trim_silence(
    audio: np.ndarray,
    sample_rate: int,
    *,
    lead_s: float | None = None,
    trail_s: float | None = None,
    min_lead_s: float = 0.0,
    floor_db: float = -50.0,
    fade_s: float = 0.004,
    onset_fade_s: float = 0.012,
) -> tuple[np.ndarray, int]:
    """Cut the silence before the voice down to `lead_s` and after it down to `trail_s` (None: keep
    that edge as it is); returns the audio and how many samples were cut (negative: padded).

    Silence is a 5 ms window whose RMS is `floor_db` below the piece's peak. A cut edge fades over
    `fade_s` (inaudible at that level, and it guarantees the edge sample is zero). Piper sometimes
    starts a piece in the middle of a fricative ("so", "sure" begin at sample 0, a burst of noise out
    of digital silence): a voice that touches an edge fades in (out) over `onset_fade_s`, and gets
    `min_lead_s` of silence before it.
    """
    x = np.asarray(audio, dtype=np.float32)
    n = x.size
    peak = float(np.max(np.abs(x))) if n else 0.0
    if peak <= 0.0:
        return x, 0
    win = max(1, int(round(_WINDOW_S * sample_rate)))
    k = n // win
    rms = np.sqrt(np.mean(np.square(x[: k * win].reshape(k, win), dtype=np.float64), axis=1)) if k else np.zeros(0)
    voiced = np.flatnonzero(rms > peak * 10 ** (floor_db / 20))
    if voiced.size == 0:
        return x, 0
    start, stop = 0, n
    if lead_s is not None:
        start = max(0, int(voiced[0]) * win - int(round(lead_s * sample_rate)))
    if trail_s is not None:
        stop = min(n, (int(voiced[-1]) + 1) * win + int(round(trail_s * sample_rate)))
    out = x[start:stop].copy()
    onset_at_edge, offset_at_edge = start == 0 and voiced[0] == 0, stop == n and voiced[-1] == k - 1

    def ramp(seconds: float) -> np.ndarray:
        m = min(int(round(seconds * sample_rate)), out.size // 2)
        return (0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, m, dtype=np.float32))).astype(np.float32)

    if start > 0 or onset_at_edge:
        r = ramp(onset_fade_s if onset_at_edge else fade_s)
        out[: r.size] *= r
    if stop < n or offset_at_edge:
        r = ramp(onset_fade_s if offset_at_edge else fade_s)
        if r.size:
            out[-r.size :] *= r[::-1]
    pad = int(round(min_lead_s * sample_rate)) - (int(voiced[0]) * win - start)
    if pad > 0:
        out = np.concatenate([np.zeros(pad, dtype=np.float32), out])
    return out, n - out.size


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
    start: int  # the chunk's text is seg.text[start:end]
    end: int
    seconds: float
    trimmed: int  # samples of silence cut


class _SegmentSynthesis:
    """One segment through Piper, chunk by chunk; `next()` runs in the worker (synthesis, joins, int16)."""

    def __init__(
        self,
        tts: Synthesizer,
        seg: Segment,
        cancel: SynthesisCancel,
        joins: JoinConfig | None,
        *,
        first_of_answer: bool,
        after_mid_phrase: bool,
    ) -> None:
        self.seg = seg
        self.joins = joins
        # Only a lead-in or a length cut can end between two words with more to follow (a sentence
        # cut ends at punctuation or a line break, a clause cut at a comma, "end" ends the answer).
        self.mid_phrase = joins is not None and seg.reason in ("lead", "length") and ends_mid_phrase(seg.text)
        spoken = speech_text(seg.text)
        if self.mid_phrase and joins is not None and joins.continuation_comma:
            spoken += ","  # Piper's chunk texts then overrun seg.text by one: clamped in next()
        if joins is None:
            self._lead: float | None = None
        elif first_of_answer:
            self._lead = joins.first_lead_s
        else:
            self._lead = joins.lead_s if after_mid_phrase else joins.max_lead_s
        self._it = tts.iter_synthesize(spoken, cancel=cancel)
        self._offset = 0
        self._first = True
        self._first_of_answer = first_of_answer

    def next(self) -> _Step | None:
        t0 = time.monotonic()
        chunk = next(self._it, None)
        if chunk is None:
            return None
        start = self._offset
        end = min(start + len(chunk.text), len(self.seg.text))
        self._offset = end
        audio, trimmed = chunk.audio, 0
        if self.joins is not None:
            j = self.joins
            lead = self._lead if self._first else j.max_lead_s
            trail = j.word_gap_s - j.lead_s if (self.mid_phrase and end >= len(self.seg.text)) else None
            audio, trimmed = trim_silence(
                audio, chunk.sample_rate, lead_s=lead, trail_s=trail, floor_db=j.floor_db, fade_s=j.fade_s,
                onset_fade_s=j.onset_fade_s, min_lead_s=0.0 if self._first_of_answer and self._first else j.min_lead_s,
            )
        self._first = False
        return _Step(chunk, to_pcm16(audio), start, end, time.monotonic() - t0, trimmed)


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
        joins: JoinConfig | None = JoinConfig(),  # noqa: B008 (frozen, shared safely)
        executor: Executor | None = None,
        clock: Callable[[], float] = time.monotonic,
        synthesis_hold: Callable[[bool], None] | None = None,
    ) -> None:
        """`synthesis_hold(True)` is called as the synthesiser starts on a piece of speech and
        `synthesis_hold(False)` when it is done with it (or failed, or was cancelled): the producer of
        the tokens may pause meanwhile, so that the two take turns on the CPU instead of sharing it."""
        self.tts = tts
        self._synthesis_hold = synthesis_hold
        self.metrics = TTSMetrics()
        self.joins = joins
        self._segmenter = TextSegmenter(segmenter)
        self._after_mid_phrase = False  # the last segment spoken ended between two words
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
        # Piper's chunk texts are slices of the spoken text, which has seg.text's length (plus a
        # continuation comma, which no chunk text includes).
        synth = _SegmentSynthesis(
            self.tts, seg, self._synth_cancel, self.joins,
            first_of_answer=self.metrics.chunks == 0, after_mid_phrase=self._after_mid_phrase,
        )
        self._after_mid_phrase = synth.mid_phrase
        hold = self._synthesis_hold
        if hold is not None:
            hold(True)
        try:
            step = await self._wait(loop.run_in_executor(executor, synth.next))
            while isinstance(step, _Step) and not self.cancelled:
                # Queue the clause's next Piper sentence before handing this one out, so synthesis
                # overlaps with whatever the consumer does with the chunk.
                nxt = loop.run_in_executor(executor, synth.next)
                chunk = SpeechChunk(
                    audio=step.pcm,
                    sample_rate=step.chunk.sample_rate,
                    text=seg.text[step.start : step.end],
                    text_start=seg.start + step.start,
                    text_end=seg.start + step.end,
                    segment_index=seg.index,
                    gain=getattr(step.chunk, "gain", 1.0),
                )
                self.metrics.synth_seconds += step.seconds
                self.metrics.trimmed_seconds += step.trimmed / step.chunk.sample_rate
                self._account(chunk)
                yield chunk
                step = await self._wait(nxt)
        finally:
            if hold is not None:
                hold(False)

    def _account(self, chunk: SpeechChunk) -> None:
        m = self.metrics
        if m.first_audio_at is None:
            m.first_audio_at = self._clock()
        m.chunks += 1
        m.audio_seconds += chunk.duration
        log.debug("chunk seg=%d %.2fs %r", chunk.segment_index, chunk.duration, chunk.text)
