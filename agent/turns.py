"""When does the user's turn end? Turn assembly, the end-of-turn timer, answers prepared early.

A user turn is the words of one or more utterances (VAD speech segments) the agent answers as one.
Its final transcripts are appended as they come; after each one, if the user is silent (no speech,
no utterance still being transcribed), the turn may be over:

- The VAD's hang-over is the shortest silence that can end a turn. On top of it the agent waits
  longer the less the words read as a complete turn: the semantic end-of-turn probability
  (`engine.end_of_turn`, on the loaded LLM) maps, on a log scale, from `incomplete_prob` (wait
  `max_extra_wait_s`) to `complete_prob` (answer at once). A timer fires when that silence is up;
  any new speech cancels it (`epoch` tells stale decisions apart).
- With `preemptive` on, two equal interim transcripts in a row start the answer while the user is
  still talking; it is held, and used when the turn ends with the same words (else discarded).

Speech that begins while the agent is answering is routed here too: while it speaks, to the
barge-in role (`agent.barge_in`); while it is still preparing (THINKING), the answer is dropped and
the turn simply continues.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rejoinder.streaming.asr_stream import ASREvent, without_tail
from rejoinder.streaming.text_metrics import normalize_text

from .barge_in import is_backchannel, words
from .config import TurnTakingConfig
from .events import SessionState, UserSpeech, UserTranscript

if TYPE_CHECKING:
    from .answer import Answer
    from .session import Session

log = logging.getLogger("rejoinder.agent.turns")


@dataclass
class UserTurn:
    index: int
    parts: list[str] = field(default_factory=list)  # final transcripts of its utterances
    unsure_tail: str = ""  # of the last part (streaming.asr_stream.ASREvent.unsure_tail)
    speech_end_at: float | None = None  # capture time of the end of its last speech
    asr_final_at: float | None = None
    eot_prob: float | None = None
    ended_at: float | None = None
    in_history: bool = False  # its user message is in the conversation already

    @property
    def text(self) -> str:
        return " ".join(p for p in self.parts if p).strip()


class TurnTaker:
    """The user's side of the floor: which turn is open, and when it is over."""

    def __init__(self, session: Session, config: TurnTakingConfig) -> None:
        self.s = session
        self.config = config
        self.current: UserTurn | None = None
        self.count = 0  # user turns so far (the current one included)
        self.epoch = 0  # bumped at every user speech start: stale decisions check it
        self.open_utterances: set[int] = set()  # heard, final transcript not in yet
        self.reopened_utterance: int | None = None  # speech that reopened the turn while THINKING
        self._last_interim: dict[int, str] = {}
        self._spec: Answer | None = None  # a preemptive answer, held
        self._spec_probs: dict[str, float] = {}
        self._timer: asyncio.TimerHandle | None = None

    # --- turns ---------------------------------------------------------------------------------

    def open(self) -> UserTurn:
        self.count += 1
        self.current = UserTurn(self.count)
        return self.current

    def forget(self) -> None:
        """The open turn was nothing (noise, a false interruption): as if it never began."""
        self.current = None
        self.count -= 1

    @property
    def user_silent(self) -> bool:
        """No speech now and no utterance still waiting for its final transcript."""
        return not self.s.listener.detector.in_speech and not self.open_utterances

    # --- speech --------------------------------------------------------------------------------

    def speech_started(self, uid: int, onset: float, audio_time_s: float, captured_at: float | None) -> None:
        s = self.s
        self.epoch += 1
        self.open_utterances.add(uid)
        self.cancel_timer()
        s.emit(UserSpeech(s.session_id, started=True, audio_time_s=audio_time_s, captured_at=captured_at))
        if s.barge_in.candidate is not None:
            # More speech while the last interruption is still being transcribed: the user has the floor.
            s.barge_in.confirm(s.barge_in.candidate, "")
        if s.state == SessionState.SPEAKING and s.speaker.answer is not None:
            s.barge_in.start(uid, onset)
        elif s.state == SessionState.THINKING:
            # The user goes on before the answer was heard: drop it; the turn continues.
            s.speaker.drop_answer("user continued")
            self.reopened_utterance = uid
            s.set_state(SessionState.USER_SPEAKING, "user continued")
        else:
            if self.current is None:
                self.open()
            s.set_state(SessionState.USER_SPEAKING, "speech")

    def speech_ended(self, audio_time_s: float, captured_at: float | None) -> None:
        s = self.s
        s.emit(UserSpeech(s.session_id, started=False, audio_time_s=audio_time_s, captured_at=captured_at))
        if self.current is not None:
            self.current.speech_end_at = captured_at if captured_at is not None else time.monotonic()

    # --- transcripts ---------------------------------------------------------------------------

    async def transcript(self, ev: ASREvent) -> None:
        s, uid = self.s, ev.utterance_id
        s.emit(UserTranscript(s.session_id, text=ev.text, final=ev.kind == "final", utterance_id=uid,
                              committed_text=ev.committed_text))
        if ev.kind == "interim":
            prev = self._last_interim.get(uid)
            self._last_interim[uid] = normalize_text(ev.text)
            if (s.barge_in.candidate is None and self.config.preemptive and s.state == SessionState.USER_SPEAKING
                    and prev is not None and prev == self._last_interim[uid] and prev):
                await self._maybe_preempt(ev.text, ev.unsure_tail)
            return
        self._last_interim.pop(uid, None)
        self.open_utterances.discard(uid)
        text = ev.text.strip()
        barge = s.barge_in.candidate
        if barge is not None and barge.utterance_id == uid:
            if not s.barge_in.resolve(barge, text):
                return
        elif self.reopened_utterance == uid:
            self.reopened_utterance = None
            if not words(text) or is_backchannel(text, self.config.backchannel_max_words):
                # A cough or an "mm" while the answer was being prepared: answer the turn as it was.
                if self.current is not None and self.current.text:
                    self.end(self.current)
                return
        turn = self.current
        if turn is None:
            return
        if not words(text):
            if not turn.parts and s.state == SessionState.USER_SPEAKING and s.barge_in.candidate is None:
                self.forget()
                s.set_state(SessionState.LISTENING, "no words")
            return
        turn.parts.append(text)
        turn.unsure_tail = ev.unsure_tail if without_tail(text, ev.unsure_tail) != text else ""
        turn.asr_final_at = ev.emitted_at
        await self._consider_end(turn)

    # --- end of turn ---------------------------------------------------------------------------

    async def _consider_end(self, turn: UserTurn) -> None:
        if not self.user_silent:
            return  # a later utterance of the same turn is still being heard or transcribed
        epoch = self.epoch
        text = turn.text
        p: float | None = None
        if self.config.semantic:
            p = self._spec_probs.get(normalize_text(text))
            if p is None:
                if self._spec is not None:
                    await self.discard_preemptive()
                try:
                    p = await self._end_of_turn_prob(text, turn.unsure_tail)
                except Exception as exc:  # noqa: BLE001 - without a score, silence alone decides
                    log.warning("end-of-turn scoring failed: %r", exc)
        if epoch != self.epoch or self.current is not turn or not self.user_silent:
            return  # the user spoke again meanwhile; the next final decides
        turn.eot_prob = p
        wait = self.config.extra_wait_s(p)
        end_at = (turn.speech_end_at or time.monotonic()) + self.config.hangover_s + wait
        delay = end_at - time.monotonic()
        log.debug("[%s] turn %d %r: P(end)=%s, extra wait %.2f s", self.s.session_id, turn.index, text,
                  "n/a" if p is None else f"{p:.4f}", wait)
        if delay <= 0:
            self.end(turn)
        else:
            self.cancel_timer()
            self._timer = asyncio.get_running_loop().call_later(delay, self._timer_fired, turn, epoch)

    async def _end_of_turn_prob(self, text: str, unsure_tail: str) -> float:
        """P(the user has finished) after `text`. When its last word(s) are a guess of Whisper's,
        the words before them are scored too and the lower probability counts: answering a
        half-finished sentence is worse than waiting a little longer on a finished one."""
        messages = self.s.conversation.messages()
        p = await self.s.eot.ascore(messages, text)
        sure = without_tail(text, unsure_tail)
        if sure != text and words(sure):
            p = min(p, await self.s.eot.ascore(messages, sure))
        return p

    def _timer_fired(self, turn: UserTurn, epoch: int) -> None:
        self._timer = None
        if epoch == self.epoch and self.current is turn and self.user_silent:
            self.end(turn)

    def cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def end(self, turn: UserTurn) -> None:
        """The turn is over: it goes into history and its answer is released."""
        s = self.s
        turn.ended_at = time.monotonic()
        conv = s.conversation
        if turn.in_history:
            last = conv.last("user")
            if last is not None and conv.turns and conv.turns[-1] is last:
                conv.turns[-1] = {"role": "user", "content": turn.text}
        else:
            conv.add_user(turn.text)
            turn.in_history = True
        s.set_state(SessionState.THINKING, "end of turn")
        spec, self._spec = self._spec, None
        if spec is not None and normalize_text(spec.user_text) == normalize_text(turn.text) and not spec.cancelled \
                and spec.error is None:
            answer = spec
        else:
            if spec is not None:
                spec.cancel()
            answer = s.speaker.new_answer(turn.text, turn.index)
            answer.start()
        answer.user_turn = turn
        s.speaker.release(answer)

    # --- answers prepared early ----------------------------------------------------------------

    async def _maybe_preempt(self, interim_text: str, unsure_tail: str = "") -> None:
        turn = self.current
        if turn is None:
            return
        text = " ".join(p for p in (turn.text, interim_text.strip()) if p)
        key = normalize_text(text)
        if self._spec is not None and normalize_text(self._spec.user_text) == key:
            return
        await self.discard_preemptive()
        epoch = self.epoch
        if key not in self._spec_probs and self.config.semantic:
            try:
                self._spec_probs = {key: await self._end_of_turn_prob(text, unsure_tail)}
            except Exception:  # noqa: BLE001
                return
        if epoch != self.epoch or self.current is not turn or self.s.state != SessionState.USER_SPEAKING:
            return
        spec = self.s.speaker.new_answer(text, turn.index, held_user=True, preemptive=True)
        self._spec = spec
        spec.start()
        log.debug("[%s] preemptive answer started for %r", self.s.session_id, text)

    async def discard_preemptive(self) -> None:
        spec, self._spec = self._spec, None
        if spec is not None:
            spec.cancel()
            await spec.wait()

    def cancel_all(self) -> None:
        """Shutdown: no timer fires and no held answer keeps generating."""
        self.cancel_timer()
        if self._spec is not None:
            self._spec.cancel()
