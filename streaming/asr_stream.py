"""Streaming speech recognition: interim hypotheses while the user speaks, a fast final at speech end.

Whisper is not a streaming model, so streaming is built from repeated batch passes (the
whisper_streaming recipe, Macháček et al. 2023):

- While speech is fed, a decode pass runs every `interim_interval_s` of new audio over a *window*:
  the utterance audio from `window_start` (a committed boundary) to now, prompted with the committed
  text before the window.
- Local agreement-2: words on which two successive passes agree (the longest common prefix of their
  uncommitted parts) are *committed*. Committed text never changes and only grows; the rest of the
  latest hypothesis is shown as tentative.
- The window slides: once it is longer than `trim_window_s`, its start moves to the end of the last
  committed word that ends a sentence (or, past `max_window_s`, of any committed word), so a pass on
  a 60 s utterance costs what a pass on a 10 s one does.
- At speech end, only the audio after the last committed word is decoded (prompted with the committed
  text), so finalisation costs one short pass whatever the utterance length.

Decoding runs in a worker thread (asyncio.to_thread); the event loop only appends samples.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from .asr import ASR_RATE, Transcript, WhisperASR, Word
from .frames import AudioFrame
from .text_metrics import normalize_text

log = logging.getLogger("rejoinder.streaming.asr_stream")

_SENTENCE_END = (".", "?", "!")


@dataclass(frozen=True)
class ASREvent:
    """A recognition result for the current utterance.

    `text` is the whole current hypothesis (committed + tentative); `committed_text` is its stable
    prefix: within one utterance each event's committed_text starts with the previous one's, and
    the final's `text` starts with the last committed_text. `emitted_at` is time.monotonic().
    """

    kind: Literal["interim", "final"]
    text: str
    committed_text: str
    utterance_id: int
    audio_s: float  # utterance audio covered by this result
    emitted_at: float
    decode_s: float  # worker-thread time of the pass that produced it
    # The last word(s) of `text` when Whisper gave them a low probability. After a pause mid-sentence
    # Whisper tends to finish the sentence with a guess ("book a table for [it.]"); whoever judges
    # whether the user has finished should not take that guess at its word.
    unsure_tail: str = ""
    # An interim decoded because speech paused (`StreamingASR.request_pass`): it covers the audio up
    # to the pause, so it is what the final will most likely say if the pause ends the turn.
    at_pause: bool = False

    @property
    def sure_text(self) -> str:
        """`text` without its unsure tail."""
        return without_tail(self.text, self.unsure_tail)


def without_tail(text: str, tail: str) -> str:
    """`text` with `tail` cut off its end (unchanged when it does not end with it)."""
    return text[: len(text) - len(tail)].rstrip() if tail and text.endswith(tail) else text


@dataclass(frozen=True)
class StreamingASRConfig:
    interim_interval_s: float = 0.4  # new audio between interim passes (lower bound; passes never overlap)
    min_first_pass_s: float = 0.5  # no pass on less audio than this (Whisper guesses on fragments)
    trim_window_s: float = 12.0  # past this, slide the window to a committed sentence end
    max_window_s: float = 20.0  # past this, slide to any committed word end (no sentence in sight)
    prompt_chars: int = 200  # committed text passed as prompt (Whisper keeps ~224 tokens anyway)
    final_reuse_margin_s: float = 0.15  # see StreamingASR.finish(speech_end_s=...)
    # A pass in flight when speech pauses stands as the pause's pass when it stops at most this
    # short of the end of speech (see StreamingASR.request_pass).
    pause_cover_tolerance_s: float = 0.04
    pause_cover_min_speech_s: float = 1.0  # ... and the speech lasted this long (one word loses more)
    final_context_s: float = 1.0  # committed audio re-decoded before the tail at finish (see there)
    queue_size: int = 64  # events buffered for a slow consumer (oldest interims dropped first)

    def __post_init__(self) -> None:
        if self.interim_interval_s <= 0 or self.min_first_pass_s < 0:
            raise ValueError("interim_interval_s must be > 0 and min_first_pass_s >= 0")
        if not 0.0 <= self.pause_cover_tolerance_s <= 0.2 or self.pause_cover_min_speech_s < 0:
            raise ValueError("pause_cover_tolerance_s must be within 0-0.2 s, pause_cover_min_speech_s >= 0")
        if not 0 < self.trim_window_s <= self.max_window_s <= 28.0:
            # A window must fit one 30 s Whisper segment, with room for the prompt's context.
            raise ValueError("need 0 < trim_window_s <= max_window_s <= 28")


def _norm(word: Word | str) -> str:
    return normalize_text(word.text if isinstance(word, Word) else word)


def _join(words: list[Word] | tuple[Word, ...]) -> str:
    return "".join(w.text for w in words).strip()


UNSURE_WORD_PROB = 0.5  # below this a final word counts as a guess (see ASREvent.unsure_tail)


def _unsure_tail(words: list[Word]) -> str:
    """The trailing words (at most two) that Whisper was unsure of."""
    n = 0
    while n < min(2, len(words)) and words[-1 - n].probability < UNSURE_WORD_PROB:
        n += 1
    return _join(words[len(words) - n :]) if n else ""


@dataclass
class _Utterance:
    uid: int
    audio: list[np.ndarray] = field(default_factory=list)  # chunks from `window_start` onward
    audio_len: int = 0  # samples held in `audio`
    window_start: int = 0  # utterance sample index of audio[0]
    fed: int = 0  # samples fed in this utterance
    last_pass_at: int = 0  # `fed` when the last pass started
    committed: list[Word] = field(default_factory=list)
    committed_text: str = ""
    prev_tail: list[Word] = field(default_factory=list)  # uncommitted words of the previous pass
    last_text: str = ""
    last_covered: int = 0  # utterance sample index up to which the last applied pass decoded
    last_at_pause: bool = False  # the last applied pass was the pause's (ASREvent.at_pause)
    pass_task: asyncio.Task | None = None  # this utterance's latest interim pass
    pass_covers: int = 0  # utterance sample index up to which `pass_task` decodes
    pass_at_pause: bool = False  # `pass_task` is the pause's pass (it may have been adopted as such)
    pass_requested: bool = False  # request_pass(): next pass ignores the interval
    cancelled: bool = False

    @property
    def committed_end_s(self) -> float:
        return self.committed[-1].end_s if self.committed else 0.0


class StreamingASR:
    """Feed 16 kHz audio of one utterance at a time; read `ASREvent`s from `events()` or `get()`.

    Typical use, driven by VAD events:
        await asr.feed(frame)            # during speech; interim events appear on their own
        final = await asr.finish()       # at speech end; also queued as an event
    `feed` starts an utterance if none is open. One StreamingASR serves one audio stream.
    """

    def __init__(self, asr: WhisperASR | None = None, config: StreamingASRConfig | None = None) -> None:
        self.asr = asr if asr is not None else WhisperASR()
        self.config = config or StreamingASRConfig()
        self._queue: asyncio.Queue[ASREvent] = asyncio.Queue(self.config.queue_size)
        self._utt: _Utterance | None = None
        self._next_uid = 1
        self._pass: asyncio.Task | None = None  # the pass in flight (at most one, any utterance)

    # -- public API -------------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        return self._utt is not None

    @property
    def next_utterance_id(self) -> int:
        """The id the next utterance gets; ids count up by one per utterance."""
        return self._next_uid

    @property
    def committed_text(self) -> str:
        return self._utt.committed_text if self._utt else ""

    def start(self) -> int:
        """Open a new utterance (closing nothing: call finish() or cancel() first); returns its id."""
        if self._utt is not None:
            raise RuntimeError("an utterance is already open; finish() or cancel() it first")
        self._utt = _Utterance(self._next_uid)
        self._next_uid += 1
        return self._utt.uid

    async def feed(self, audio: AudioFrame | np.ndarray) -> None:
        """Append 16 kHz mono audio (float32 array or AudioFrame); may start an interim pass."""
        samples = self._as_samples(audio)
        if samples is None:
            return
        if self._utt is None:
            self.start()
        u = self._utt
        assert u is not None
        u.audio.append(samples)
        u.audio_len += samples.size
        u.fed += samples.size
        self._maybe_start_pass()

    def request_pass(self, speech_end_s: float | None = None) -> None:
        """Decode now rather than at the next interval (or right after the pass in flight).

        Meant for the moment speech pauses: a pass that covers the end of speech, started during
        the VAD hang-over, is usually done by the time speech end is confirmed, and `finish`
        then reuses it instead of decoding again.

        With `speech_end_s` (utterance seconds, where the paused speech ended), a pass already in
        flight that decodes to within `pause_cover_tolerance_s` of it is taken as the pause's pass
        instead of queueing another behind it: an interim that started as the last word ended
        would otherwise delay the pause transcript by a whole pass (~0.25 s on two cores). Only
        after `pause_cover_min_speech_s` of speech: on a single short word, the last 40 ms can
        change what Whisper hears ("Cool." → "Cur."). `python bench/asr_cut.py` measures it.
        """
        u = self._utt
        if u is None:
            return
        in_flight = u.pass_task is not None and not u.pass_task.done()
        cfg = self.config
        if in_flight and speech_end_s is not None and speech_end_s >= cfg.pause_cover_min_speech_s and \
                u.pass_covers >= (speech_end_s - cfg.pause_cover_tolerance_s) * ASR_RATE:
            u.pass_at_pause = True
            return
        u.pass_requested = True
        self._maybe_start_pass()

    async def settle(self) -> None:
        """Wait for the pass in flight, if any (used to pace a faster-than-real-time feed)."""
        # A finished pass may chain the next one (audio arrived meanwhile): wait until none runs.
        while self._pass is not None and not self._pass.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._pass)

    async def finish(self, speech_end_s: float | None = None) -> ASREvent:
        """End of speech: decode what is not committed yet, emit and return the final event.

        `speech_end_s` (utterance-relative, e.g. from the VAD's speech_end) lets the last interim
        stand as the final when that pass already decoded past the end of speech plus
        `final_reuse_margin_s`: after a VAD hang-over this is the usual case, and it makes
        finalisation free. Without it, the uncommitted tail is always re-decoded.
        """
        u = self._utt
        if u is None:
            raise RuntimeError("finish() without an open utterance")
        # Detach first: audio fed from now on (the next utterance) must not land in this one.
        self._utt = None
        if u.pass_task is not None:
            # Its result commits more words, which shortens the final pass.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(u.pass_task)
        margin = self.config.final_reuse_margin_s * ASR_RATE
        if u.last_at_pause:  # the pause's pass may stop just short of the end (request_pass)
            margin = min(margin, -self.config.pause_cover_tolerance_s * ASR_RATE)
        if speech_end_s is not None and u.last_text and u.last_covered >= speech_end_s * ASR_RATE + margin:
            ev = ASREvent("final", u.last_text, u.committed_text, u.uid, u.fed / ASR_RATE, time.monotonic(), 0.0,
                          _unsure_tail(u.prev_tail))
            self._put(ev)
            log.debug("utterance %d final = last interim (covered %.2f s, speech ended %.2f s)",
                      u.uid, u.last_covered / ASR_RATE, speech_end_s)
            return ev
        # Decode only what is not committed, plus `final_context_s` of committed words before it:
        # cutting exactly at a word-boundary timestamp (imprecise by ~0.1 s) can clip the next word or
        # leave a fragment of the last one, and Whisper hallucinates freely on a lone fragment. The
        # overlap words are recognised again and dropped by the same rule the interim passes use.
        start_s = u.committed_end_s
        for w in reversed(u.committed):
            if w.start_s < u.committed_end_s - self.config.final_context_s:
                break
            start_s = w.start_s
        cut = max(u.window_start, int(round(start_s * ASR_RATE)))
        audio = self._window_audio(u)[cut - u.window_start :]
        try:
            tr = await asyncio.to_thread(
                self.asr.transcribe,
                audio,
                prompt=self._prompt(self._text_before(u, cut)),
                offset_s=cut / ASR_RATE,
            )
        except Exception:  # noqa: BLE001 - the turn must still end: fall back to the last interim
            log.exception("final ASR pass failed; using the last interim hypothesis")
            text = u.last_text or u.committed_text
            decode_s = 0.0
            unsure = _unsure_tail(u.prev_tail) if u.last_text else ""
        else:
            tail = self._uncommitted(u, list(tr.words))
            text = " ".join(p for p in (u.committed_text, _join(tail)) if p)
            decode_s = tr.decode_s
            unsure = _unsure_tail(tail)
        ev = ASREvent("final", text, u.committed_text, u.uid, u.fed / ASR_RATE, time.monotonic(), decode_s, unsure)
        self._put(ev)
        log.debug("utterance %d final after %.2f s audio (tail %.2f s): %r", u.uid, u.fed / ASR_RATE,
                  audio.size / ASR_RATE, text[:80])
        return ev

    async def cancel(self) -> None:
        """Drop the open utterance without a final (e.g. the VAD start was a false alarm)."""
        u, self._utt = self._utt, None
        if u is not None:
            u.cancelled = True  # a pass in flight finishes in its thread; its result is ignored

    async def get(self) -> ASREvent:
        return await self._queue.get()

    async def events(self) -> AsyncIterator[ASREvent]:
        while True:
            yield await self._queue.get()

    def get_nowait(self) -> ASREvent | None:
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None

    # -- passes -----------------------------------------------------------------------------------

    def _as_samples(self, audio: AudioFrame | np.ndarray) -> np.ndarray | None:
        if isinstance(audio, AudioFrame):
            if audio.sample_rate != ASR_RATE:
                log.warning("StreamingASR takes %d Hz frames, got %d Hz: frame dropped (use FrameChunker)",
                            ASR_RATE, audio.sample_rate)
                return None
            x = audio.to_float_mono()
        else:
            x = np.asarray(audio, dtype=np.float32).reshape(-1)
        if x.size == 0:
            return None
        if not np.isfinite(x).all():
            log.warning("non-finite samples in ASR input set to 0")
            x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        return x

    def _maybe_start_pass(self) -> None:
        u = self._utt
        if u is None or (self._pass is not None and not self._pass.done()):
            return
        cfg = self.config
        if u.fed < cfg.min_first_pass_s * ASR_RATE:
            return
        if u.fed <= u.last_pass_at:
            return
        if u.fed - u.last_pass_at < cfg.interim_interval_s * ASR_RATE and not u.pass_requested:
            return
        at_pause, u.pass_requested = u.pass_requested, False
        u.last_pass_at = u.fed
        audio = self._window_audio(u)
        u.pass_covers, u.pass_at_pause = u.window_start + audio.size, at_pause
        self._pass = u.pass_task = asyncio.get_running_loop().create_task(self._run_pass(u, audio, u.window_start))

    async def _run_pass(self, u: _Utterance, audio: np.ndarray, window_start: int) -> None:
        try:
            tr = await asyncio.to_thread(
                self.asr.transcribe,
                audio,
                prompt=self._prompt(self._text_before(u, window_start)),
                offset_s=window_start / ASR_RATE,
            )
        except Exception:  # noqa: BLE001 - one failed pass must not end the conversation
            log.exception("interim ASR pass failed; continuing")
            tr = None
        if tr is not None and not u.cancelled:
            # Applied even when finish() has detached `u`: finish awaits this pass to use it.
            self._apply(u, tr, audio.size, u.pass_at_pause and u.pass_task is asyncio.current_task())
        # Audio may have arrived while decoding: start the next pass right away if one is due.
        if self._pass is asyncio.current_task():
            self._pass = None
        self._maybe_start_pass()

    def _apply(self, u: _Utterance, tr: Transcript, n_samples: int, at_pause: bool = False) -> None:
        """Local agreement between this pass and the previous one; emit an interim event."""
        tail = self._uncommitted(u, list(tr.words))
        agreed = 0
        for a, b in zip(u.prev_tail, tail):
            if _norm(a) != _norm(b) or not _norm(a):
                break
            agreed += 1
        if agreed:
            # Commit the newer pass's words: its timestamps saw more audio.
            u.committed.extend(tail[:agreed])
            u.committed_text = _join(u.committed)
        u.prev_tail = tail[agreed:]
        text = " ".join(p for p in (u.committed_text, _join(u.prev_tail)) if p)
        u.last_text = text
        u.last_covered = u.window_start + n_samples
        u.last_at_pause = at_pause
        audio_s = u.last_covered / ASR_RATE
        self._put(ASREvent("interim", text, u.committed_text, u.uid, audio_s, time.monotonic(), tr.decode_s,
                           _unsure_tail(u.prev_tail), at_pause))
        self._maybe_trim(u)

    def _uncommitted(self, u: _Utterance, words: list[Word]) -> list[Word]:
        """The words of a fresh hypothesis that come after what is committed.

        By time first (words starting before the last committed end are old), then by text: the
        pass may re-recognise the last committed word(s) with shifted timestamps.
        """
        if not u.committed:
            return words
        edge = u.committed_end_s - 0.1
        words = [w for w in words if w.start_s >= edge]
        for n in range(min(5, len(u.committed), len(words)), 0, -1):
            if [_norm(w) for w in u.committed[-n:]] == [_norm(w) for w in words[:n]]:
                return words[n:]
        return words

    def _maybe_trim(self, u: _Utterance) -> None:
        """Slide the window start to a committed boundary so pass cost stays bounded."""
        cfg = self.config
        if u.audio_len < cfg.trim_window_s * ASR_RATE:
            return
        win_start_s = u.window_start / ASR_RATE
        inside = [w for w in u.committed if w.end_s > win_start_s + 0.05]
        cut_word = next((w for w in reversed(inside) if w.text.rstrip().endswith(_SENTENCE_END)), None)
        long_window = u.audio_len >= cfg.max_window_s * ASR_RATE
        if cut_word is None and long_window and inside:
            cut_word = inside[-1]
        if cut_word is None and long_window:
            # Nothing committed inside the window for max_window_s: passes keep disagreeing (noise,
            # mumbling). Commit the latest hypothesis up to 1 s before the window end rather than
            # let the window, and every pass's cost, grow without bound.
            window_end_s = (u.window_start + u.audio_len) / ASR_RATE
            forced = [w for w in u.prev_tail if w.end_s <= window_end_s - 1.0]
            if forced:
                log.info("utterance %d: no agreement for %.1f s, committing %d words", u.uid,
                         u.audio_len / ASR_RATE, len(forced))
                u.committed.extend(forced)
                u.committed_text = _join(u.committed)
                u.prev_tail = u.prev_tail[len(forced) :]
                cut_word = forced[-1]
            else:
                # No words at all (silence or noise): keep only the last trim_window_s of audio.
                cut = u.window_start + u.audio_len - int(cfg.trim_window_s * ASR_RATE)
                self._slide(u, cut)
                return
        if cut_word is not None:
            self._slide(u, int(round(cut_word.end_s * ASR_RATE)))

    def _slide(self, u: _Utterance, cut: int) -> None:
        if cut <= u.window_start:
            return
        audio = self._window_audio(u)[cut - u.window_start :]
        u.audio = [audio.copy()]
        u.audio_len = audio.size
        u.window_start = cut
        log.debug("utterance %d: window slid to %.2f s", u.uid, cut / ASR_RATE)

    # -- helpers ----------------------------------------------------------------------------------

    @staticmethod
    def _window_audio(u: _Utterance) -> np.ndarray:
        if len(u.audio) > 1:
            u.audio = [np.concatenate(u.audio)]  # amortise: later calls reuse the joined array
        return u.audio[0] if u.audio else np.zeros(0, dtype=np.float32)

    @staticmethod
    def _text_before(u: _Utterance, sample: int) -> str:
        t = sample / ASR_RATE
        return _join([w for w in u.committed if w.end_s <= t + 1e-6])

    def _prompt(self, text: str) -> str | None:
        text = text.strip()
        return text[-self.config.prompt_chars :] if text else None

    def _put(self, ev: ASREvent) -> None:
        if self._queue.full():
            # Interims are superseded by the next one anyway: shed the oldest to keep the queue bounded.
            with contextlib.suppress(asyncio.QueueEmpty):
                dropped = self._queue.get_nowait()
                log.debug("event queue full, dropped a %s event", dropped.kind)
        self._queue.put_nowait(ev)
