"""Real-time playout of synthesised speech, in 20 ms frames, with an exact record of what was played.

TTS produces audio much faster than real time; a transport must receive it at the pace it is played,
or the far end buffers seconds of speech that can no longer be taken back on barge-in. This buffer
holds the synthesised chunks and hands them out frame by frame at real-time pace, so that at any
moment everything not yet sent can be dropped instantly (`flush()`).

Pacing is drift-free: frame n is due at `anchor + n * frame_duration` on the monotonic clock, rather
than "sleep 20 ms after each frame", which would accumulate the event loop's scheduling delays. If
the loop stalls for longer than `max_lateness_s` the anchor is reset instead of sending a burst of
catch-up frames.

A transport that paces frames out by its own clock (WebRTC's encoder pulls a frame every 20 ms)
starves the moment a frame reaches it late, and a starved slot is a hole mid-word. `lead_s` hands
speech over that far ahead of its slot: a reserve that rides out stalls of a loaded CPU. What the
reserve holds is not heard yet, so pausing or flushing takes it back (`recall`, the transport's
`recall_audio`) and rewinds the played position by as much: a barge-in stops the audio as fast as
without a reserve, and a resumed answer goes on from the first frame not sent.

"Played" means handed to the sink at its due time (a frame sent cannot be recalled, so the listener
will hear it). Because each chunk carries the exact text it speaks, the played sample count maps to
the words played: `played_text()` is what the agent keeps in history after a barge-in. Within a chunk,
words are apportioned by character length across the chunk's voiced span (leading and trailing
silence excluded), which is accurate to about a word.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from .frames import AudioFrame
from .streamed_tts import SpeechChunk

log = logging.getLogger("rejoinder.streaming.playout")

__all__ = ["FlushResult", "FrameSink", "PlayoutBuffer", "PlayoutConfig", "PlayoutMetrics"]

FrameSink = Callable[[AudioFrame], "Awaitable[None] | None"]


@dataclass(frozen=True)
class PlayoutConfig:
    frame_ms: int = 20
    # Send silence frames while nothing is queued (for transports that need a continuous stream);
    # by default an underrun simply sends nothing, never fake audio.
    silence_when_idle: bool = False
    # A frame later than this (event loop stall) restarts the pacing clock instead of bursting.
    max_lateness_s: float = 0.1
    # Speech handed to the sink this far ahead of its real-time slot (the transport's send reserve).
    lead_s: float = 0.0

    @property
    def lead_frames(self) -> int:
        return max(0, round(self.lead_s * 1000 / self.frame_ms))


@dataclass(frozen=True)
class FlushResult:
    dropped_samples: int
    dropped_seconds: float
    dropped_text: str  # text of the audio that will never be played (partly-played chunk included)
    played_text: str  # what was played, as played_text() returns it


@dataclass
class PlayoutMetrics:
    first_frame_at: float | None = None  # time.monotonic() when the first speech frame went out
    last_frame_at: float | None = None
    frames_out: int = 0  # speech frames (partial ones included)
    silence_frames: int = 0
    underruns: int = 0  # the queue ran dry while the answer was still streaming in
    reanchors: int = 0
    recalled_frames: int = 0  # handed over, taken back unsent (pause/flush with a lead) and re-queued
    max_lateness_s: float = 0.0
    flushes: int = 0
    sink_errors: int = 0


@dataclass
class _Entry:
    chunk: SpeechChunk
    start: int  # first sample of this chunk in the answer's sample timeline
    voiced: tuple[int, int]  # [first, last) voiced sample within the chunk


_WORD_END = re.compile(r"\S+")


def _voiced_span(audio: np.ndarray, rate: int) -> tuple[int, int]:
    """Samples [first, last) that carry speech, on 10 ms RMS windows (Piper pads clauses with silence)."""
    win = max(1, rate // 100)
    n = audio.shape[0] // win
    if n == 0:
        return 0, int(audio.shape[0])
    rms = np.sqrt(np.mean(np.square(audio[: n * win].astype(np.float32).reshape(n, win)), axis=1))
    loud = np.flatnonzero(rms > 0.05 * float(rms.max())) if rms.max() > 0 else np.array([], dtype=int)
    if loud.size == 0:
        return 0, int(audio.shape[0])
    return int(loud[0] * win), int(min(audio.shape[0], (loud[-1] + 1) * win))


def _text_prefix(text: str, fraction: float, partial_words: bool) -> str:
    """The prefix of `text` spoken after `fraction` of its voiced audio, cut at a word boundary."""
    words = list(_WORD_END.finditer(text))
    if not words or fraction <= 0.0:
        return ""
    if fraction >= 1.0:
        return text
    first, last = words[0].start(), words[-1].end()
    pos = first + fraction * (last - first)  # the character being spoken now
    end = 0
    for w in words:
        if w.end() <= pos or (partial_words and w.start() <= pos):
            end = w.end()
        else:
            break
    return text[:end]


class PlayoutBuffer:
    """Paces queued speech out to `sink` in real-time frames; flushable; knows what was played.

    Lifecycle: `start()` (or `async with`) runs the pacing task; `push()` each chunk of an answer;
    `finish_answer()` when the answer is complete; `flush()` on barge-in; `reset()` before the next
    answer (played/dropped accounting is per answer). All methods are for the event loop thread.
    """

    def __init__(
        self,
        sink: FrameSink,
        *,
        sample_rate: int | None = None,
        config: PlayoutConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        recall: Callable[[], float] | None = None,
    ) -> None:
        self.config = config or PlayoutConfig()
        self.metrics = PlayoutMetrics()
        self._sink = sink
        self._recall = recall  # takes back what the sink holds unsent; returns its seconds
        # The last frames handed over (real samples only), so that recalled ones can be re-queued.
        self._history: deque[np.ndarray] = deque(maxlen=self.config.lead_frames + 16)
        self._clock = clock
        self._rate: int | None = sample_rate
        self._entries: list[_Entry] = []  # every chunk of the answer still accounted (played or queued)
        self._queue: deque[np.ndarray] = deque()  # audio not yet sent; first item partly consumed
        self._queue_pos = 0  # samples of _queue[0] already sent
        self._queued = 0  # samples in the queue
        self._pushed = 0  # samples of the answer pushed (minus those flushed)
        self._played = 0  # samples of the answer handed to the sink
        self._answer_done = False
        self._paused = False
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None

    # --- properties ------------------------------------------------------------------------------

    @property
    def sample_rate(self) -> int | None:
        return self._rate

    @property
    def frame_samples(self) -> int:
        if self._rate is None:
            raise RuntimeError("sample rate unknown until the first chunk is pushed")
        return self._rate * self.config.frame_ms // 1000

    @property
    def played_samples(self) -> int:
        """Samples of the current answer handed to the sink (padding of a last partial frame excluded)."""
        return self._played

    @property
    def played_seconds(self) -> float:
        return self._played / self._rate if self._rate else 0.0

    @property
    def is_playing(self) -> bool:
        """Audio is queued and not paused: frames are going out."""
        return self._queued > 0 and not self._paused

    @property
    def paused(self) -> bool:
        return self._paused

    # --- feeding ---------------------------------------------------------------------------------

    def push(self, chunk: SpeechChunk) -> None:
        if self._rate is None:
            self._rate = chunk.sample_rate
        elif chunk.sample_rate != self._rate:
            raise ValueError(f"chunk at {chunk.sample_rate} Hz pushed into a {self._rate} Hz playout buffer")
        audio = np.asarray(chunk.audio)
        if audio.dtype != np.int16:
            raise ValueError(f"playout expects int16 audio, got {audio.dtype}")
        self._entries.append(_Entry(chunk, self._pushed, _voiced_span(audio, self._rate)))
        self._pushed += audio.shape[0]
        if audio.shape[0]:
            self._queue.append(audio)
            self._queued += audio.shape[0]
            self._idle.clear()
            self._wake.set()

    def finish_answer(self) -> None:
        """No more chunks for this answer: a queue running dry from now on is the end, not an underrun."""
        self._answer_done = True

    def flush(self) -> FlushResult:
        """Drop everything not yet sent, at once; the next frame the pacing task sends is silence or nothing."""
        self._take_back()
        self._history.clear()
        dropped = self._queued
        dropped_text = self._text_after(self._played)
        self._queue.clear()
        self._queue_pos = 0
        self._queued = 0
        self._pushed = self._played
        played = self.played_text()
        # Entries wholly unplayed are gone; the partly played one stays for played_text().
        self._entries = [e for e in self._entries if e.start < self._played]
        self._answer_done = True
        self._paused = False
        self.metrics.flushes += 1
        self._idle.set()
        self._wake.set()
        rate = self._rate or 1
        log.debug("playout flushed: %.3f s dropped, %.3f s played", dropped / rate, self._played / rate)
        return FlushResult(dropped, dropped / rate, dropped_text, played)

    def pause(self) -> None:
        """Stop sending at once, keeping the queue: the next frame due is not sent (barge-in under review).

        `resume()` continues exactly where playback stopped; `flush()` drops what was held.
        """
        self._paused = True
        self._take_back()
        self._wake.set()

    def _take_back(self) -> None:
        """Frames handed to the sink but not sent yet return to the queue, and the played position with them."""
        if self._recall is None or not self._history:
            return
        frame_s = self.config.frame_ms / 1000
        n = min(len(self._history), round(self._recall() / frame_s))
        if n <= 0:
            return
        if self._queue_pos:
            self._queue[0] = self._queue[0][self._queue_pos :]
            self._queue_pos = 0
        for _ in range(n):
            audio = self._history.pop()
            self._queue.appendleft(audio)
            self._queued += audio.shape[0]
            self._played -= audio.shape[0]
        self.metrics.recalled_frames += n
        self._idle.clear()

    def resume(self) -> None:
        self._paused = False
        self._wake.set()

    def reset(self) -> None:
        """Start a new answer: drop anything queued and forget the previous answer's accounting."""
        self._paused = False
        self._queue.clear()
        self._queue_pos = self._queued = 0
        self._idle.set()
        self._entries.clear()
        self._history.clear()
        self._pushed = self._played = 0
        self._answer_done = False

    async def wait_idle(self) -> None:
        """Return when nothing is queued (all pushed audio played, or flushed)."""
        await self._idle.wait()

    # --- what was played -------------------------------------------------------------------------

    def played_text(self, *, partial_words: bool = False) -> str:
        """Text of the current answer whose audio has been played.

        Complete chunks contribute their whole text; the chunk being played contributes the words
        whose audio has finished (`partial_words=True`: also the word being spoken).
        """
        return self._text_until(self._played, partial_words)

    def started_text(self) -> str:
        """Text of every chunk whose playback has begun (what a listener is hearing or has heard)."""
        return "".join(e.chunk.text for e in self._entries if e.start < self._played)

    def _text_until(self, sample: int, partial_words: bool) -> str:
        parts: list[str] = []
        for e in self._entries:
            n = e.chunk.num_samples
            if sample >= e.start + n:
                parts.append(e.chunk.text)
                continue
            if sample > e.start:
                v0, v1 = e.voiced
                fraction = (sample - e.start - v0) / max(1, v1 - v0)
                parts.append(_text_prefix(e.chunk.text, fraction, partial_words))
            break
        return "".join(parts)

    def _text_after(self, sample: int) -> str:
        """Text not covered by _text_until(sample): what a flush at `sample` throws away."""
        full = "".join(e.chunk.text for e in self._entries)
        return full[len(self._text_until(sample, False)) :]

    # --- pacing ----------------------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run(), name="rejoinder-playout")
        return self._task

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def __aenter__(self) -> PlayoutBuffer:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def run(self) -> None:
        """The pacing loop; runs until cancelled."""
        frame_s = self.config.frame_ms / 1000.0
        lead = self.config.lead_frames
        anchor: float | None = None  # due time of frame 0 of the current run of frames
        n = 0
        speaking = False  # the last frame sent carried speech
        while True:
            if self._paused:
                speaking = False
                anchor = None
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._queued == 0:
                self._idle.set()
                if speaking and not self._answer_done:
                    self.metrics.underruns += 1  # TTS fell behind real time mid-answer
                speaking = False
                if not (self.config.silence_when_idle and self._rate):
                    anchor = None
                    self._wake.clear()
                    await self._wake.wait()
                    continue
            now = self._clock()
            if anchor is None:
                anchor, n = now, 0
            due = anchor + max(0, n - lead) * frame_s  # the first `lead` frames go at once: the reserve
            if due > now:
                await asyncio.sleep(due - now)
                continue  # re-check: a flush or push may have happened while sleeping
            lateness = now - due
            if lateness > self.config.max_lateness_s:
                # The loop stalled; restart the clock here rather than send a burst of stale frames.
                self.metrics.reanchors += 1
                log.debug("playout %.0f ms late, re-anchoring", lateness * 1000)
                anchor, n, due, lateness = now, 0, now, 0.0
            self.metrics.max_lateness_s = max(self.metrics.max_lateness_s, lateness)
            frame, real = self._take(self.frame_samples)
            n += 1
            speaking = real > 0
            if real:
                self._played += real
                if self._recall is not None:
                    self._history.append(frame[:real])
                self.metrics.frames_out += 1
                if self.metrics.first_frame_at is None:
                    self.metrics.first_frame_at = now
                self.metrics.last_frame_at = now
            else:
                self.metrics.silence_frames += 1
            await self._send(AudioFrame(frame, self._rate or 0, 1, due))

    def _take(self, count: int) -> tuple[np.ndarray, int]:
        """Up to `count` queued samples as one frame, zero-padded to `count`; also how many were real."""
        out = np.zeros(count, dtype=np.int16)
        filled = 0
        while filled < count and self._queue:
            head = self._queue[0]
            k = min(count - filled, head.shape[0] - self._queue_pos)
            out[filled : filled + k] = head[self._queue_pos : self._queue_pos + k]
            filled += k
            self._queue_pos += k
            if self._queue_pos >= head.shape[0]:
                self._queue.popleft()
                self._queue_pos = 0
        self._queued -= filled
        return out, filled

    async def _send(self, frame: AudioFrame) -> None:
        try:
            result = self._sink(frame)
            if inspect.isawaitable(result):
                await result
        except asyncio.CancelledError:
            raise
        except Exception:  # a broken transport must not kill the pacing loop
            self.metrics.sink_errors += 1
            if self.metrics.sink_errors == 1 or self.metrics.sink_errors % 500 == 0:
                log.exception("playout sink failed (%d so far)", self.metrics.sink_errors)
