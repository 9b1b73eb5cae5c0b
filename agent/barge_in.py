"""Was that an interruption? User speech while the agent talks: echo, candidate, resolution, resume.

- The agent's own voice coming back through the caller's microphone is cancelled from the input
  (`streaming.aec`, before the VAD). Speech found in what is left is still the agent's when the
  canceller took most of the input away around its onset (`EchoCanceller.removed_db`), or when
  the input correlates with what was just sent (`streaming.echo.EchoGuard`, all there is with the
  canceller off); it never interrupts.
- Any other speech while the agent speaks pauses its audio within one frame and cancels generation
  and synthesis: a *candidate* interruption. The words of the interruption decide it once its final
  transcript is in: no words (a cough, a door), a backchannel ("uh-huh", "okay") or the agent's own
  words (text overlap) are false interruptions, and the answer resumes where it stopped (queued
  audio plays, generation continues from prompt + generated tokens). Anything else is confirmed:
  the answer is dropped and history keeps only the words that were played.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rejoinder.streaming.text_metrics import normalize_text

from .events import BargeIn, SessionState

if TYPE_CHECKING:
    from .answer import Answer
    from .session import Session

log = logging.getLogger("rejoinder.agent.barge_in")

BACKCHANNEL_WORDS = frozenset(
    "uh huh uhhuh uh-huh mhm mm mmhmm mm-hmm hmm hm yeah yep yup yes ok okay right sure alright "
    "i see got it oh ah uh um aha cool nice great wow".split()
)

# How long after the agent's last frame its voice may still come back (echo path + VAD hang-over).
ECHO_TAIL_S = 1.0


def words(text: str) -> list[str]:
    return normalize_text(text).split()


def is_backchannel(text: str, max_words: int = 3) -> bool:
    w = words(text)
    return 0 < len(w) <= max_words and all(x in BACKCHANNEL_WORDS for x in w)


def is_echo_text(heard: str, agent_text: str, overlap: float = 0.7) -> bool:
    """Whether `heard` is mostly words of `agent_text` (the agent's own voice, transcribed)."""
    h, a = words(heard), set(words(agent_text))
    if len(h) < 2 or not a:
        return False
    return sum(x in a for x in h) / len(h) >= overlap


@dataclass
class BargeInCandidate:
    utterance_id: int
    onset_at: float
    stopped_at: float
    answer: Answer
    played_text: str


class BargeInHandler:
    """Decides what user speech during agent speech is, and acts on it."""

    def __init__(self, session: Session) -> None:
        self.s = session
        self.candidate: BargeInCandidate | None = None

    def is_echo(self, onset: float, now: float) -> bool:
        """The speech that began at `onset` is the agent's own voice (reported, then ignored)."""
        s = self.s
        speaker = s.speaker
        if not ((s.state == SessionState.SPEAKING and speaker.answer is not None)
                or now - speaker.last_frame_at < ECHO_TAIL_S):
            return False
        t0 = max(onset - 0.05, now - 0.6)
        score = s.echo_guard.score(t0, now)
        aec = s.aec
        removed = 0.0
        if aec is not None and not aec.engaged and aec.echo_path != "absent":
            # auto, the echo path not known yet or the canceller still catching up on it: the raw
            # input judged by the echo path's lower threshold (a hit is the path found).
            if not aec.check(t0, now):
                return False
        elif aec is not None and aec.engaged:
            removed = aec.removed_db(t0, now)
            if score < s.echo_guard.threshold and removed < aec.config.echo_removed_db:
                return False
        elif score < s.echo_guard.threshold:
            return False
        log.debug("[%s] speech while speaking is echo (corr %.2f, %.0f dB cancelled)", s.session_id, score, removed)
        turn_no = speaker.answer.turn if speaker.answer is not None else s.turn_taker.count
        s.emit(BargeIn(s.session_id, turn=turn_no, outcome="echo", at_s=onset - s.started_at, onset_at=onset,
                       stopped_at=None))
        return True

    def start(self, uid: int, onset: float) -> None:
        """Stop the agent's audio now; the interruption's words will decide."""
        s = self.s
        answer = s.speaker.answer
        assert answer is not None
        s.speaker.playout.pause()  # no further frame goes out
        stopped = time.monotonic()
        if not answer.done.is_set():
            # Frees the CPU for transcribing the interruption. An answer already made has nothing
            # left to stop; marked cancelled, it could not close its exchange after a resume.
            answer.cancel()
        self.candidate = BargeInCandidate(uid, onset, stopped, answer, s.speaker.playout.played_text())
        s.turn_taker.open()
        s.set_state(SessionState.USER_SPEAKING, "barge-in")

    def resolve(self, barge: BargeInCandidate, text: str) -> bool:
        """The interruption's words are known: confirm it or resume. True when it was confirmed."""
        s = self.s
        cfg = s.turn_taker.config
        agent_text = barge.answer.speech_text
        if not words(text):
            outcome = "noise"
        elif is_backchannel(text, cfg.backchannel_max_words):
            outcome = "backchannel"
        elif is_echo_text(text, agent_text + " " + barge.played_text, cfg.echo_text_overlap):
            outcome = "echo"
        else:
            self.confirm(barge, text)
            return True
        self.candidate = None
        s.turn_taker.forget()
        s.emit(self._event(barge, outcome, text))
        log.debug("[%s] false interruption (%s: %r): resuming", s.session_id, outcome, text)
        s.speaker.resume(barge.answer)
        return False

    def confirm(self, barge: BargeInCandidate, text: str) -> None:
        self.candidate = None
        self.s.speaker.playout.flush()
        self.s.emit(self._event(barge, "interruption", text))
        self.s.speaker.finish(barge.answer, interrupted=True, played=barge.played_text)

    def _event(self, barge: BargeInCandidate, outcome: str, text: str) -> BargeIn:
        s = self.s
        return BargeIn(s.session_id, turn=barge.answer.turn, outcome=outcome, at_s=barge.onset_at - s.started_at,
                       onset_at=barge.onset_at, stopped_at=barge.stopped_at, text=text, played_text=barge.played_text)
