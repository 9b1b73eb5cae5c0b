"""How does the agent's voice leave as a real-time WebRTC track? `AgentAudioTrack`.

aiortc pulls frames from a track as fast as `recv()` returns them, so the track paces itself at
20 ms and fills the gaps between answers with silence. The session's playout already paces speech;
the track keeps at most a few frames queued (the send reserve, `WebRTCOptions.send_reserve_s`, and
room for a catch-up burst), so a barge-in's recall empties it at once. A speech frame that arrives a
little late is not replaced by silence (a click mid-word): while speaking, the track waits a short
grace past each frame's slot. Every frame's timing goes to `rtc_stats.WebRTCStats`.
"""
from __future__ import annotations

import asyncio
import fractions
import logging
import time
from collections import deque

import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from .rtc_audio import RTC_RATE
from .rtc_options import FRAME_MS, FRAME_SAMPLES, WebRTCOptions
from .rtc_stats import OutboundFrame, SpeechRun, WebRTCStats
from .transport import TransportClosed

log = logging.getLogger("rejoinder.streaming.webrtc")

__all__ = ["AgentAudioTrack"]


class AgentAudioTrack(MediaStreamTrack):
    """The agent's voice as an aiortc audio track: queued 20 ms 48 kHz mono frames, silence between."""

    kind = "audio"

    def __init__(self, options: WebRTCOptions | None = None, stats: WebRTCStats | None = None) -> None:
        super().__init__()
        self.options = options or WebRTCOptions()
        self.stats = stats or WebRTCStats()
        self._queue: deque[tuple[np.ndarray, float]] = deque()  # (pcm, queued at)
        self._has_frame = asyncio.Event()
        self._has_room = asyncio.Event()
        self._has_room.set()
        self._due: float | None = None  # monotonic time the next frame is due
        self._t0 = 0.0  # monotonic time of pts 0
        self._prev_pts: int | None = None
        self._speaking = False
        self._run_end: float | None = None  # slot time of the silence that ended the last speech run
        self._pts = 0
        self._last_pull: float | None = None  # the encoder's last recv(); None: not started yet
        self._last_out: OutboundFrame | None = None  # the frame the encoder is working on
        self._time_base = fractions.Fraction(1, RTC_RATE)
        self._silence = np.zeros(FRAME_SAMPLES, dtype=np.int16)

    @property
    def queued_frames(self) -> int:
        return len(self._queue)

    def clear(self) -> int:
        """Drop queued speech (hang-up, a barge-in's recall); returns how many frames were dropped."""
        n = len(self._queue)
        self._queue.clear()
        self._has_room.set()
        return n

    async def put(self, pcm: np.ndarray) -> None:
        """Queue one 20 ms int16 frame; waits while the queue is full and the encoder is pulling."""
        if self.readyState != "live":
            raise TransportClosed("outgoing audio track stopped")
        while len(self._queue) >= self.options.max_queued_frames:
            self._has_room.clear()
            try:
                # Two frame periods is plenty for a consumer that is running; past that it is not
                # (not connected yet, or stalled), and blocking the playout would only delay the
                # session's own clock, so the oldest frame makes room instead.
                await asyncio.wait_for(self._has_room.wait(), 2 * FRAME_MS / 1000)
            except asyncio.TimeoutError:
                self._queue.popleft()
                self.stats.dropped_out_frames += 1
                if self.stats.dropped_out_frames in (1, 100) or self.stats.dropped_out_frames % 1000 == 0:
                    log.info("outgoing audio not consumed; dropped %d frames so far", self.stats.dropped_out_frames)
            if self.readyState != "live":
                raise TransportClosed("outgoing audio track stopped")
        self._queue.append((pcm, time.monotonic()))
        self.stats.max_out_queue = max(self.stats.max_out_queue, len(self._queue))
        self._has_frame.set()

    def _sent(self, now: float) -> None:
        """The encoder pulls again: the frame it had is encoded and its packet sent."""
        out = self._last_out
        if out is not None and out.sent_at is None:
            out.sent_at = now
            self.stats.stage("out_encode_send", now - out.handed_at)

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        frame_s = FRAME_MS / 1000
        now = time.monotonic()
        self._sent(now)
        self._last_pull = now
        if self._due is None:
            self._due = self._t0 = now  # pts 0 is now: the RTP clock is the wall clock
        elif now - self._due > (0.2 if self._speaking else frame_s):
            # The loop stalled (in silence: by a slot or more; in speech: far past the grace).
            # Sending the missed slots late, in a burst, tells the peer's jitter buffer the network
            # is that slow: a browser then plays everything after it up to that much later, for
            # many seconds (measured: 0.3 s stalls took Chromium's target from 0.12 to 0.88 s for
            # 15 s). Instead the RTP clock moves over the missed time (as DTX would) on a silence
            # frame: aiortc's encoder stamps the frame at a jump with the old count, so no speech
            # frame ever carries one.
            self._pts = max(self._pts, int((now - self._t0) * RTC_RATE) // FRAME_SAMPLES * FRAME_SAMPLES)
            self._due = now
            self.stats.clock_jumps += 1
            return self._out(None, False)
        item = self._queue.popleft() if self._queue else None
        if item is None:
            deadline = self._due + (self.options.late_frame_grace_s if self._speaking else 0.0)
            while not self._queue and deadline > (now := time.monotonic()):
                self._has_frame.clear()
                try:
                    await asyncio.wait_for(self._has_frame.wait(), deadline - now)
                except asyncio.TimeoutError:
                    break
            if self._queue:
                item = self._queue.popleft()
                if self._speaking and time.monotonic() > self._due:
                    self.stats.late_frames += 1
        now = time.monotonic()
        started = False
        if item is not None and not self._speaking:
            # Speech starting after silence goes out now, and the slot clock restarts on it, so
            # the playout's frames (paced on the same monotonic clock) land in phase.
            self._due = now
            self.stats.speech_runs += 1
            if self._run_end is not None and now - self._run_end < 0.2:
                self.stats.speech_holes += 1
            started = True
        elif self._due > now:
            await asyncio.sleep(self._due - now)
        return self._out(item, started)

    def _out(self, item: tuple[np.ndarray, float] | None, started: bool) -> av.AudioFrame:
        """The frame for this slot (silence when `item` is None), stamped and counted."""
        if self.readyState != "live":
            raise MediaStreamError
        stats = self.stats
        if item is not None:
            pcm, queued_at = item
            if stats.first_speech_out_at is None:
                stats.first_speech_out_at = time.monotonic()
            self._speaking = True
            stats.frames_out_speech += 1
        else:
            last = self._last_out
            if self._speaking and stats.runs and last is not None and last.speech:
                stats.runs[-1].end_ts, stats.runs[-1].last_handed_at = last.ts, last.handed_at
            if self._speaking:
                self._run_end = self._due
            self._speaking = False
            stats.frames_out_silence += 1
            pcm, queued_at = self._silence, None
        slot = self._due
        self._due += FRAME_MS / 1000
        self._has_room.set()
        handed = time.monotonic()
        # The RTP timestamp it will carry: aiortc's encoder stamps each frame one frame after the
        # previous one's pts (equal to its own pts except on a clock jump).
        wire = self._pts if self._prev_pts is None else self._prev_pts + FRAME_SAMPLES
        self._prev_pts = self._pts
        rec = OutboundFrame(wire, item is not None, queued_at, slot, handed)
        stats.outbound.put(wire, rec)
        stats.stage("out_slot_late", handed - slot)
        if queued_at is not None:
            stats.stage("out_queue", handed - queued_at)
        if started:
            stats.runs.append(SpeechRun(wire, queued_at, handed))
        self._last_out = rec
        out = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        out.sample_rate = RTC_RATE
        out.pts = self._pts
        out.time_base = self._time_base
        self._pts += FRAME_SAMPLES
        return out
