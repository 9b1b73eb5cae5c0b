"""Recording a call: a stereo WAV (caller left, agent right, one timeline, as heard) and a JSON transcript.

Opt-in (`--record DIR`, REJOINDER_RECORD_DIR). The caller's audio is placed by its capture time and
the agent's by the time each frame was sent, so the two line up as the call sounded, and an
interrupted answer ends where its playback stopped. Both are written incrementally: every half
second the settled part of the timeline is appended to the WAV (the standard library's `wave`
rewrites the RIFF sizes on every write), and the transcript (turns with their timings and metrics,
barge-ins, tool calls, transfers) is rewritten atomically whenever something is added. A crash or a
killed process therefore leaves a playable WAV up to the last half second and a transcript up to
the last event. When the session ends, `recording_ready` names both files.

Retention: when a recorder starts, recordings beyond `record_max_files` (oldest first) and older than
`record_max_days` are deleted from the folder.
"""
from __future__ import annotations

import json
import logging
import os
import time
import wave
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rejoinder.streaming.frames import AudioFrame, to_pcm16
from rejoinder.streaming.resample import StreamResampler

from .events import (
    AgentText,
    BargeIn,
    HoldChanged,
    RecordingReady,
    SessionError,
    SessionEvent,
    ToolCalled,
    TransferRequested,
    TurnMetrics,
    UserIdle,
    UserTranscript,
)

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger("rejoinder.agent.recording")

RATE = 16_000
SETTLE_S = 0.3  # audio younger than this may still get frames (jitter): written at the next flush


class _Track:
    """One channel of the timeline from sample `start` on, mixed where frames overlap."""

    def __init__(self) -> None:
        self.start = 0
        self.buf = np.zeros(0, np.float32)
        self.next_pos: int | None = None  # where a frame that follows the last one contiguously goes

    def place(self, pos: int, x: np.ndarray) -> None:
        if self.next_pos is not None and abs(pos - self.next_pos) < x.size:
            pos = self.next_pos  # scheduling jitter: keep contiguous frames contiguous
        self.next_pos = pos + x.size
        pos -= self.start
        if pos < 0:  # older than what was written already
            x = x[-pos:]
            pos = 0
        end = pos + x.size
        if end > self.buf.size:
            self.buf = np.concatenate([self.buf, np.zeros(end - self.buf.size, np.float32)])
        self.buf[pos:end] += x

    def take(self, upto: int) -> np.ndarray:
        """Samples [start, upto), silence where nothing was placed; the track then starts at `upto`."""
        n = max(0, upto - self.start)
        out = np.zeros(n, np.float32)
        k = min(n, self.buf.size)
        out[:k] = self.buf[:k]
        self.buf = self.buf[k:]
        self.start = upto
        return out


def prune(folder: Path, max_files: int, max_days: float) -> int:
    """Delete the oldest recordings beyond `max_files` and those older than `max_days`; how many went."""
    wavs = sorted(folder.glob("*.wav"), key=lambda p: p.stat().st_mtime)
    cutoff = time.time() - max_days * 86400
    doomed = [p for p in wavs if p.stat().st_mtime < cutoff]
    keep = [p for p in wavs if p not in doomed]
    doomed += keep[: max(0, len(keep) - max_files + 1)]  # room for the recording about to start
    for wav in doomed:
        for p in (wav, wav.with_suffix(".json")):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
    if doomed:
        log.info("recordings: removed %d old recording(s) from %s", len(doomed), folder)
    return len(doomed)


class Recorder:
    def __init__(self, folder: str | os.PathLike[str], session_id: str, *, max_files: int = 1000,
                 max_days: float = 30.0) -> None:
        self.folder = Path(folder).expanduser()
        self.folder.mkdir(parents=True, exist_ok=True)
        prune(self.folder, max_files, max_days)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.audio_path = self.folder / f"{stamp}-{session_id}.wav"
        self.transcript_path = self.audio_path.with_suffix(".json")
        self.session_id = session_id
        self.t0 = time.monotonic()
        self._file = open(self.audio_path, "wb")  # noqa: SIM115 - kept open for the whole call
        self._wav = wave.open(self._file, "wb")
        self._wav.setnchannels(2)
        self._wav.setsampwidth(2)
        self._wav.setframerate(RATE)
        self._caller, self._agent = _Track(), _Track()
        self._agent_resampler: StreamResampler | None = None
        self._written = 0
        self._doc: dict[str, Any] = {"session_id": session_id, "started_wall_time": time.time(),
                                     "audio": self.audio_path.name, "sample_rate": RATE,
                                     "channels": ["caller", "agent"], "transcript": [], "turns": [],
                                     "barge_ins": [], "events": []}
        self.closed = False
        self._write_doc()

    @classmethod
    def attach(cls, session: Session) -> Recorder | None:
        """Record `session` (its settings say where): taps, transcript listener, the flush task it owns.

        A folder that cannot be written is reported as an `error` event; the call goes on unrecorded.
        """
        call = session.cfg.call
        try:
            rec = cls(call.record_dir, session.session_id, max_files=call.record_max_files,
                      max_days=call.record_max_days)
        except OSError as exc:
            session.emit(SessionError(session.session_id, where="recording", message=f"cannot record: {exc}"))
            return None
        session.add_listener(rec.on_event)
        session.spawn(rec._flush_every(0.5), "recording")
        return rec

    async def _flush_every(self, seconds: float) -> None:
        import asyncio

        while not self.closed:
            await asyncio.sleep(seconds)
            self.flush()

    def ready_event(self) -> RecordingReady:
        return RecordingReady(self.session_id, audio_path=str(self.audio_path),
                              transcript_path=str(self.transcript_path), seconds=self.seconds)

    # --- taps ------------------------------------------------------------------------------------

    def _pos(self, t: float) -> int:
        return int(round((t - self.t0) * RATE))

    def add_caller(self, frame: AudioFrame) -> None:
        """A 16 kHz input frame, stamped with its capture time."""
        if not self.closed:
            self._caller.place(self._pos(frame.timestamp), frame.to_float_mono())

    def add_agent(self, frame: AudioFrame, sent_at: float) -> None:
        """A frame of the agent's audio as it went to the caller."""
        if self.closed:
            return
        x = frame.to_float_mono()
        if frame.sample_rate != RATE:
            if self._agent_resampler is None or self._agent_resampler.from_rate != frame.sample_rate:
                self._agent_resampler = StreamResampler(frame.sample_rate, RATE)
            x = self._agent_resampler.process(x)
        if x.size:
            self._agent.place(self._pos(sent_at), x)

    def on_event(self, event: SessionEvent) -> None:
        """A session listener: what goes into the transcript."""
        if self.closed:
            return
        t = round(event.at - self.t0, 3)
        d = event.to_dict()
        if isinstance(event, UserTranscript):
            if not event.final:
                return
            self._doc["transcript"].append({"t": t, "role": "user", "text": event.text, "source": event.source})
        elif isinstance(event, AgentText):
            if not event.final:
                return
            self._doc["transcript"].append({"t": t, "role": "agent", "text": event.text,
                                            "interrupted": event.interrupted, "turn": event.turn})
        elif isinstance(event, TurnMetrics):
            self._doc["turns"].append({**d, "t": t})
        elif isinstance(event, BargeIn):
            self._doc["barge_ins"].append({**d, "t": t})
        elif isinstance(event, (ToolCalled, TransferRequested, HoldChanged, UserIdle)):
            self._doc["events"].append({**d, "t": t})
        else:
            return
        self._write_doc()

    # --- writing ---------------------------------------------------------------------------------

    def flush(self, *, final: bool = False) -> None:
        """Append the settled part of the timeline (all of it when `final`) to the WAV."""
        if self.closed:
            return
        upto = max(self._caller.start + self._caller.buf.size, self._agent.start + self._agent.buf.size) if final \
            else self._pos(time.monotonic() - SETTLE_S)
        if upto <= self._written:
            return
        stereo = np.stack([self._caller.take(upto), self._agent.take(upto)], axis=1)
        self._wav.writeframes(to_pcm16(stereo).astype("<i2").tobytes())
        self._file.flush()  # in the kernel's hands: a killed process loses nothing written
        self._written = upto

    def _write_doc(self) -> None:
        self._doc["seconds"] = round(self._written / RATE, 3)
        tmp = self.transcript_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self._doc, indent=1, ensure_ascii=False, default=str))
        os.replace(tmp, self.transcript_path)

    @property
    def seconds(self) -> float:
        return self._written / RATE

    def close(self) -> None:
        if self.closed:
            return
        self.flush(final=True)
        self.closed = True
        self._wav.close()
        self._file.close()
        self._doc["ended_wall_time"] = time.time()
        self._write_doc()
        log.info("recorded %s (%.1f s) and %s", self.audio_path, self.seconds, self.transcript_path)
