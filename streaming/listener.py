"""The listening side of a session: transport frames in, speech and transcript events out.

Wires the pieces of this package together for one audio stream:

    AudioFrame (any rate/size) -> FrameChunker (16 kHz, 20 ms) -> SpeechDetector -> StreamingASR

Speech start opens an ASR utterance, fed from a short ring buffer so the words spoken before the
detector was sure (min_speech_s, plus its pre-roll) are not lost; speech end finishes it, passing the
speech end time so the final can reuse the last interim. Events of both kinds come out of one
queue, in order, each stamped with time.monotonic().

`push` never waits for a decode: finishing an utterance runs as a task, so frames keep flowing.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Union

import numpy as np

from .asr import ASR_RATE, WhisperASR
from .asr_stream import ASREvent, StreamingASR, StreamingASRConfig
from .frames import AudioFrame, FrameChunker
from .vad import VAD, SpeechDetector, VADConfig, VADEvent

log = logging.getLogger("rejoinder.streaming.listener")

ListenerEvent = Union[VADEvent, ASREvent]


class Listener:
    def __init__(
        self,
        asr: WhisperASR | None = None,
        *,
        vad: VAD | None = None,
        vad_config: VADConfig | None = None,
        asr_config: StreamingASRConfig | None = None,
        history_s: float = 1.5,
        queue_size: int = 256,
        pause_pass_s: float | None = None,
    ) -> None:
        self.chunker = FrameChunker(ASR_RATE)
        self.detector = SpeechDetector(vad, vad_config)
        self.asr = StreamingASR(asr, asr_config)
        # Recent 20 ms frames with their stream position: the audio before a speech start is decided.
        cfg = self.detector.config
        keep = max(history_s, cfg.min_speech_s + cfg.pre_roll_s + 0.3)
        self._history: collections.deque[tuple[int, np.ndarray]] = collections.deque(maxlen=int(keep / 0.02) + 1)
        self._pos = 0  # samples of 16 kHz audio seen (stream clock)
        self._utt_start = 0  # stream sample where the open utterance begins
        self._in_speech = False
        self._pause_pass_done = False  # a pass was requested for the current pause in speech
        # Silence after which a pass is requested (default: just past the final's reuse margin).
        self.pause_pass_s = pause_pass_s if pause_pass_s is not None else self.asr.config.final_reuse_margin_s + 0.05
        self._queue: asyncio.Queue[ListenerEvent] = asyncio.Queue(queue_size)
        self._finishing: set[asyncio.Task] = set()
        self._forwarder: asyncio.Task | None = None

    @property
    def speech_end_in_utterance_s(self) -> float:
        """Where the open utterance's speech last stopped, in utterance seconds (compare `ASREvent.audio_s`)."""
        return self.detector.last_speech_end_s - self._utt_start / ASR_RATE

    def heard_to_pause(self, ev: ASREvent) -> bool:
        """`ev` decoded the open utterance up to where its speech last stopped (a pass in flight as
        speech paused may stop up to `pause_cover_tolerance_s` short: `StreamingASR.request_pass`)."""
        return ev.audio_s >= self.speech_end_in_utterance_s - self.asr.config.pause_cover_tolerance_s

    async def push(self, frame: AudioFrame) -> list[VADEvent]:
        """Feed one transport frame; returns the VAD events it caused (also queued)."""
        if self._forwarder is None:
            self._forwarder = asyncio.get_running_loop().create_task(self._forward_asr())
        out: list[VADEvent] = []
        for f in self.chunker.push(frame):
            out += await self._push20(f)
        return out

    async def _push20(self, f: AudioFrame) -> list[VADEvent]:
        samples = f.samples
        start = self._pos
        self._pos += samples.size
        self._history.append((start, samples))
        events = self.detector.process_frame(f)
        for ev in events:
            self._put(ev)
            if ev.kind == "speech_start":
                self._in_speech = True
                self._utt_start = int(round(ev.audio_time_s * ASR_RATE))
                # Back-fill from the ring buffer: speech began before the detector was sure.
                # The current frame is in the ring too, so it is fed here and not again below.
                for pos, chunk in self._history:
                    if pos + chunk.size > self._utt_start:
                        await self.asr.feed(chunk[max(0, self._utt_start - pos) :])
            elif ev.kind == "speech_end" and self._in_speech:
                self._finish_utterance(ev)
        # In speech (the hang-over included: the final can then reuse a pass that saw the end).
        if self._in_speech and not any(e.kind == "speech_start" for e in events):
            await self.asr.feed(samples)
            # Speech paused long enough for a pass to cover its end with the reuse margin: decode
            # now, during the hang-over, so that if this is the end the final is already there.
            silence = self.detector.silence_s
            if silence == 0.0:
                self._pause_pass_done = False
            elif not self._pause_pass_done and silence >= self.pause_pass_s:
                self._pause_pass_done = True
                self.asr.request_pass(speech_end_s=self.speech_end_in_utterance_s)
        return events

    def _finish_utterance(self, ev: VADEvent) -> None:
        self._in_speech = False
        end_s = ev.audio_time_s - self._utt_start / ASR_RATE
        task = asyncio.get_running_loop().create_task(self.asr.finish(speech_end_s=end_s))
        self._finishing.add(task)
        task.add_done_callback(self._finished)

    def cut(self) -> list[VADEvent]:
        """End the open utterance now (its final follows as usual) and let the detector start
        afresh; the speech_end returned is also queued."""
        events = self.detector.cut()
        for ev in events:
            self._put(ev)
            if self._in_speech:
                self._finish_utterance(ev)
        return events

    def _finished(self, task: asyncio.Task) -> None:
        self._finishing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("final ASR pass failed: %r", task.exception())

    async def _forward_asr(self) -> None:
        async for ev in self.asr.events():
            self._put(ev)

    def _put(self, ev: ListenerEvent) -> None:
        if self._queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                dropped = self._queue.get_nowait()
                log.warning("listener queue full (consumer too slow): dropped a %s event",
                            getattr(dropped, "kind", "?"))
        self._queue.put_nowait(ev)

    async def settle(self) -> None:
        """Wait until no decode is running (lockstep feeding in tests and benches)."""
        await self.asr.settle()
        if self._finishing:
            await asyncio.gather(*self._finishing, return_exceptions=True)
        await asyncio.sleep(0)  # let the forwarder move queued ASR events

    async def get(self) -> ListenerEvent:
        return await self._queue.get()

    def get_nowait(self) -> ListenerEvent | None:
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None

    async def events(self) -> AsyncIterator[ListenerEvent]:
        while True:
            yield await self._queue.get()

    async def abort(self) -> None:
        """Stop at once (the session is over): no final for an open utterance, no task left behind."""
        tasks = [t for t in (self._forwarder, *self._finishing) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._forwarder = None
        self._finishing.clear()
        await self.asr.cancel()

    async def close(self) -> None:
        """End of stream: close an open utterance (final emitted), stop the forwarder."""
        for f in self.chunker.flush():
            await self._push20(f)
        for ev in self.detector.flush():
            self._put(ev)
            if self._in_speech:
                self._in_speech = False
                await self.asr.finish(speech_end_s=ev.audio_time_s - self._utt_start / ASR_RATE)
        await self.settle()
        if self._forwarder is not None:
            self._forwarder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._forwarder
            self._forwarder = None
        while (ev := self.asr.get_nowait()) is not None:
            self._put(ev)
