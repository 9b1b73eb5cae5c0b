"""Drive a real Session on a real clock: a microphone that never stops, an optional echo path.

`Mic` pushes 20 ms frames into an InProcessTransport at real-time pace for as long as it runs:
speech when something was queued with `speak()`, silence otherwise — like a live microphone, so
VAD hang-overs, silence timeouts and the agent's playout all see real time pass. With `echo_gain`
the agent's own output comes back into the input after `echo_delay_s` (a speakerphone); with `room`
(tests/echo_scenes.Room) it comes back through that room instead: delayed, reverberant, attenuated,
over the microphone's noise floor.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from echo_scenes import Room, room_ir

from rejoinder.streaming.echo import EchoGuard, EchoGuardConfig
from rejoinder.streaming.frames import AudioFrame
from rejoinder.streaming.transport import InProcessTransport

RATE = 16_000
FRAME = RATE // 50


@dataclass
class Mic:
    transport: InProcessTransport
    echo_gain: float = 0.0
    echo_delay_s: float = 0.12
    room: Room | None = None
    _pending: list[np.ndarray] = field(default_factory=list)
    _task: asyncio.Task | None = None

    def __post_init__(self) -> None:
        # The echo path is continuous, like sound in a room: frames are laid end to end the way the
        # guard lays its reference (send-time jitter would tear a real-time replay apart).
        self._echo = EchoGuard(EchoGuardConfig(history_s=10.0))
        self._drained = asyncio.Event()
        self._drained.set()
        self.speech_spans: list[tuple[float, float]] = []  # monotonic [start, end) of each speak()
        if self.room is not None:
            self._h = room_ir(self.room.rt60, self.room.seed, drr_db=self.room.drr_db)
            self._nfft = 1 << int(np.ceil(np.log2(self._h.size + 2 * FRAME)))
            self._H = np.fft.rfft(self._h, self._nfft)
            self._rng = np.random.default_rng(self.room.seed)
        if self.echo_gain or self.room is not None:
            self.transport.on_audio_out = self._capture

    def _capture(self, frame: AudioFrame) -> None:
        self._echo.add_reference(frame, time.monotonic())

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.transport.end_input()

    async def speak(self, audio: np.ndarray, wait: bool = True) -> tuple[float, float]:
        """Queue `audio` (16 kHz float32); with `wait`, return once it has all gone out."""
        self._pending.append(np.asarray(audio, np.float32))
        self._drained.clear()
        t0 = time.monotonic()
        if wait:
            await self._drained.wait()
        return t0, time.monotonic()

    async def _run(self) -> None:
        t0 = time.monotonic()
        k = 0
        buf = np.zeros(0, np.float32)
        span_start: float | None = None
        while True:
            due = t0 + k * 0.02
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            while buf.size < FRAME and self._pending:
                buf = np.concatenate([buf, self._pending.pop(0)])
            if buf.size:
                if span_start is None:
                    span_start = due
                x = np.zeros(FRAME, np.float32)
                n = min(FRAME, buf.size)
                x[:n] = buf[:n]
                buf = buf[n:]
                if not buf.size and not self._pending:
                    self.speech_spans.append((span_start, due + n / RATE))
                    span_start = None
                    self._drained.set()
            else:
                x = np.zeros(FRAME, np.float32)
            if self.room is not None:
                x = x + self._room_echo(due)
            elif self.echo_gain:
                x = x + self.echo_gain * self._echo._ref.span(due - self.echo_delay_s,
                                                              due - self.echo_delay_s + 0.02)[:FRAME]
            self.transport.push_audio(AudioFrame(np.clip(x, -1, 1), RATE, 1, due))
            k += 1


    def _room_echo(self, due: float) -> np.ndarray:
        room, L = self.room, self._h.size
        t1 = due - room.delay_s + FRAME / RATE
        dry = self._echo._ref.span(t1 - (FRAME + L - 1) / RATE, t1)
        y = np.fft.irfft(np.fft.rfft(dry, self._nfft) * self._H, self._nfft)[L - 1 : L - 1 + FRAME]
        return (10 ** (room.gain_db / 20) * y).astype(np.float32) + room.mic_noise(FRAME, self._rng)


async def wait_for(predicate, timeout: float, interval: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return bool(predicate())


def frames_sent_between(transport: InProcessTransport, t0: float, t1: float) -> int:
    return sum(t0 <= s.sent_at < t1 for s in transport.sent_audio)


@contextlib.asynccontextmanager
async def live_session(models, cfg, *, echo_gain: float = 0.0, room: Room | None = None,
                       setup: Callable | None = None, **session_kw):
    """A real Session on the in-process transport, running, with a Mic speaking into it:
    (session, transport, mic); on exit the mic stops and the session must end within 30 s.
    `setup(session)` runs before the session starts (e.g. attaching MCP tools)."""
    from rejoinder.agent.session import Session

    session_kw.setdefault("greeting", "")
    transport = InProcessTransport(output_sample_rate=models.tts.sample_rate)
    mic = Mic(transport, echo_gain=echo_gain, room=room)
    session = Session(models, cfg, transport, **session_kw)
    if setup is not None:
        setup(session)
    task = asyncio.create_task(session.run())
    mic.start()
    try:
        yield session, transport, mic
    finally:
        await mic.stop()
        await asyncio.wait_for(task, 30)
