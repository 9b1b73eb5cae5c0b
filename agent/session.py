"""One conversation over one transport: listening while speaking, answering fast, yielding at once.

States (agent.events.SessionState):

    LISTENING --user speech--> USER_SPEAKING --turn over--> THINKING --first frame out--> SPEAKING
        ^                          ^   |                        |                          |
        |                          |   +--noise only------------+----------------+         |
        +----------answer played---+---------------------------------------------|---------+
                                   +--user speech while THINKING or SPEAKING (barge-in)----+

Input is processed all the time (the agent hears the user while it talks). User speech while the
agent speaks, unless the echo guard recognises the agent's own voice, pauses the audio within one
frame and cancels generation and synthesis; once the words of the interruption are known it is
either a real interruption (the answer is dropped, history keeps only what was played) or a false
one — noise, a backchannel, the agent's own words — and the answer resumes where it stopped.

A user turn ends when the VAD reports silence *and* the words so far read as a complete turn
(semantic end of turn on the loaded LLM); an incomplete-sounding turn gets more silence before the
agent answers. With `preemptive` on, the answer to a stable interim transcript is prepared while the
user is still talking and used if the final transcript says the same.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from rejoinder.engine import SamplingParams
from rejoinder.engine.end_of_turn import EndOfTurnScorer
from rejoinder.streaming.asr import ASR_RATE
from rejoinder.streaming.asr_stream import ASREvent, StreamingASRConfig, without_tail
from rejoinder.streaming.echo import EchoGuard, EchoGuardConfig
from rejoinder.streaming.frames import AudioFrame, FrameChunker
from rejoinder.streaming.listener import Listener
from rejoinder.streaming.playout import PlayoutBuffer
from rejoinder.streaming.resample import StreamResampler
from rejoinder.streaming.streamed_tts import SpeechChunk
from rejoinder.streaming.text_metrics import normalize_text
from rejoinder.streaming.transport import Transport, TransportClosed
from rejoinder.streaming.vad import SileroVAD, VADConfig, VADEvent

from .answer import Answer, AnswerSpec
from .config import AgentConfig
from .conversation import Conversation
from .events import (
    AgentSpeech,
    AgentText,
    BargeIn,
    EventListener,
    SessionEnded,
    SessionError,
    SessionEvent,
    SessionStarted,
    SessionState,
    StateChanged,
    ToolCalled,
    TurnMetrics,
    UserSpeech,
    UserTranscript,
)
from .tools import Tool, ToolCall, ToolError, ToolRegistry
from .turn_taking import TurnTakingConfig, is_backchannel, is_echo_text, words

log = logging.getLogger("rejoinder.agent.session")

_session_numbers = itertools.count(1)
_NO_SAMPLING = SamplingParams(max_new_tokens=1)  # answers that only speak given text


@dataclass
class _UserTurn:
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


@dataclass
class _BargeCandidate:
    utterance_id: int
    onset_at: float
    stopped_at: float
    answer: Answer
    played_text: str


class Session:
    """See the module docstring. Create, then `await run()`; `control()` steers it from outside."""

    def __init__(
        self,
        models: Any,  # agent.reply.Models (engine, asr, tts, vad_path)
        cfg: AgentConfig,
        transport: Transport,
        *,
        session_id: str | None = None,
        tools: ToolRegistry | Sequence[Tool] | None = None,
        listeners: Sequence[EventListener] = (),
        turn_taking: TurnTakingConfig | None = None,
        echo: EchoGuardConfig | None = None,
        greeting: str | None = None,
        drain_on_eof: bool = False,
    ) -> None:
        self.models = models
        self.cfg = cfg
        self.transport = transport
        self.session_id = session_id or f"s{next(_session_numbers)}-{uuid.uuid4().hex[:8]}"
        self.tools = tools if isinstance(tools, ToolRegistry) else ToolRegistry(list(tools or []))
        self.turn_cfg = turn_taking or TurnTakingConfig()
        self.greeting = cfg.greeting if greeting is None else greeting
        self.drain_on_eof = drain_on_eof
        self.state = SessionState.LISTENING
        self.muted = False
        self.started_at = time.monotonic()
        self.turns: list[TurnMetrics] = []
        self.barge_ins: list[BargeIn] = []
        self.end_reason = ""
        self._listeners: list[EventListener] = list(listeners)

        engine = models.engine
        self.engine = engine
        self.conversation = Conversation(
            engine.tokenizer, cfg.persona, budget_tokens=max(256, cfg.max_context - cfg.max_new_tokens - 64),
            tool_prompt=self.tools.system_prompt(),
        )
        self.eot = EndOfTurnScorer.shared(engine)
        vad_cfg = VADConfig(
            threshold=self.turn_cfg.vad_threshold, min_speech_s=self.turn_cfg.min_speech_s,
            hangover_s=self.turn_cfg.hangover_s,
        )
        # A pass requested early in a pause (0.13 s) covers the end of speech, so the final usually
        # needs no decode of its own once the hang-over confirms the end.
        asr_cfg = StreamingASRConfig(final_reuse_margin_s=0.08)
        self.listener = Listener(models.asr, vad=SileroVAD(models.vad_path), vad_config=vad_cfg, asr_config=asr_cfg)
        self.echo_guard = EchoGuard(echo)
        self._chunker = FrameChunker(ASR_RATE)
        self.playout = PlayoutBuffer(self._send_frame, sample_rate=models.tts.sample_rate)
        self._out_resampler: StreamResampler | None = None

        self._turn: _UserTurn | None = None
        self._turn_count = 0
        self._speech_epoch = 0  # bumped at every user speech start: stale decisions check it
        self._utt_count = 0
        self._ignored_utts: set[int] = set()  # echo (or muted) utterances: their transcripts are dropped
        self._open_utts: set[int] = set()  # heard utterances whose final transcript has not come yet
        self._last_interim: dict[int, str] = {}
        self._answer: Answer | None = None  # the answer the playout is (or will be) playing
        self._spec: Answer | None = None  # a preemptive answer, held
        self._spec_probs: dict[str, float] = {}
        self._barge: _BargeCandidate | None = None
        self._reopened_utt: int | None = None  # utterance that reopened a turn during THINKING
        self._eot_timer: asyncio.TimerHandle | None = None
        self._say_queue: list[str] = []
        self._forced_tool: str | None = None
        self._ends_after_answer = False
        self._played_text_sent = ""
        self._last_frame_at = 0.0
        self._tasks: set[asyncio.Task] = set()
        self._ended = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    # --- events ----------------------------------------------------------------------------------

    def add_listener(self, fn: EventListener) -> None:
        self._listeners.append(fn)

    def _emit(self, event: SessionEvent) -> None:
        if isinstance(event, TurnMetrics):
            self.turns.append(event)
        elif isinstance(event, BargeIn):
            self.barge_ins.append(event)
        self._spawn(self._deliver(event), "deliver")

    async def _deliver(self, event: SessionEvent) -> None:
        try:
            await self.transport.send_event(event.to_dict())
        except Exception as exc:  # noqa: BLE001 - a broken event channel must not stop the session
            log.debug("transport.send_event failed: %r", exc)
        for fn in list(self._listeners):
            try:
                result = fn(event)
                if asyncio.iscoroutine(result):
                    await result
            except Exception:  # noqa: BLE001
                log.exception("event listener failed")

    def _set_state(self, new: SessionState, reason: str = "") -> None:
        if new == self.state:
            return
        old, self.state = self.state, new
        log.debug("[%s] %s -> %s (%s)", self.session_id, old.value, new.value, reason)
        self._emit(StateChanged(self.session_id, old=old, new=new, reason=reason))
        if new == SessionState.LISTENING and self._turn is None:
            self._idle.set()
        else:
            self._idle.clear()

    def _spawn(self, coro, name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=f"rejoinder-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("session task %s failed: %r", task.get_name(), exc, exc_info=exc)
            if not self._ended.is_set():
                self._emit(SessionError(self.session_id, where=task.get_name(), message=repr(exc)))

    # --- running ---------------------------------------------------------------------------------

    async def run(self) -> None:
        """Run until the transport's input ends or the session is ended (control "end", a tool)."""
        self.playout.start()
        self._emit(SessionStarted(self.session_id, persona=self.cfg.persona))
        consumer = self._spawn(self._consume_listener(), "listener-events")
        pump = self._spawn(self._pump_input(), "input")
        if self.greeting:
            self._say(self.greeting, interrupt=False)
        try:
            await asyncio.wait({pump, self._spawn(self._ended.wait(), "ended")}, return_when=asyncio.FIRST_COMPLETED)
            if not self._ended.is_set() and self.drain_on_eof:
                await self.wait_idle(timeout=60.0)
        finally:
            await self._shutdown(consumer, pump)

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until nobody speaks and nothing is pending; False on timeout."""
        try:
            await asyncio.wait_for(self._idle_for(0.2), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def _idle_for(self, seconds: float) -> None:
        while True:
            await self._idle.wait()
            await asyncio.sleep(seconds)
            if self._idle.is_set() and not self.listener.detector.in_speech:
                return

    async def end(self, reason: str = "ended") -> None:
        if not self.end_reason:
            self.end_reason = reason
        self._ended.set()

    async def _shutdown(self, *tasks: asyncio.Task) -> None:
        if not self.end_reason:
            self.end_reason = "hangup"
        self._ended.set()
        self._cancel_eot_timer()
        for a in (self._answer, self._spec):
            if a is not None:
                a.cancel()
        self.playout.flush()
        await self.playout.aclose()
        for t in list(tasks) + list(self._tasks):
            if t is not asyncio.current_task() and not t.done() and t.get_name() != "rejoinder-deliver":
                t.cancel()
        await asyncio.gather(*[t for t in tasks if t is not asyncio.current_task()], return_exceptions=True)
        await self.listener.abort()
        self.state = SessionState.ENDED
        await self._deliver(SessionEnded(self.session_id, reason=self.end_reason, turns=self._turn_count))
        pending = [t for t in self._tasks if t.get_name() == "rejoinder-deliver"]
        if pending:
            await asyncio.wait(pending, timeout=2.0)

    # --- input -----------------------------------------------------------------------------------

    async def _pump_input(self) -> None:
        async for frame in self.transport.audio_in():
            if self._ended.is_set():
                return
            for f in self._chunker.push(frame):
                if self.muted:
                    f = AudioFrame(np.zeros_like(f.samples), f.sample_rate, 1, f.timestamp)
                self.echo_guard.add_input(f)
                for ev in await self.listener.push(f):
                    self._on_vad(ev)
        log.debug("[%s] input ended", self.session_id)

    async def _consume_listener(self) -> None:
        while True:
            ev = await self.listener.get()
            if isinstance(ev, ASREvent):
                await self._on_asr(ev)

    def _on_vad(self, ev: VADEvent) -> None:
        now = time.monotonic()
        if ev.kind == "speech_start":
            self._utt_count += 1
            uid = self._utt_count
            onset = (ev.captured_at if ev.captured_at is not None else now) + self.listener.detector.config.pre_roll_s
            self._on_speech_start(uid, onset, ev, now)
        else:
            uid = self._utt_count
            if uid in self._ignored_utts:
                return
            self._emit(UserSpeech(self.session_id, started=False, audio_time_s=ev.audio_time_s, captured_at=ev.captured_at))
            if self._turn is not None:
                self._turn.speech_end_at = ev.captured_at if ev.captured_at is not None else now

    def _on_speech_start(self, uid: int, onset: float, ev: VADEvent, now: float) -> None:
        if self.muted:
            self._ignored_utts.add(uid)
            return
        # The agent's voice arrives late (echo path) and outlasts its speech by the VAD hang-over:
        # check for echo while it speaks and shortly after.
        if (self.state == SessionState.SPEAKING and self._answer is not None) or now - self._last_frame_at < 1.0:
            score = self.echo_guard.score(max(onset - 0.05, now - 0.6), now)
            if score >= self.echo_guard.config.threshold:
                self._ignored_utts.add(uid)
                log.debug("[%s] speech while speaking is echo (corr %.2f)", self.session_id, score)
                turn_no = self._answer.turn if self._answer is not None else self._turn_count
                self._emit(BargeIn(self.session_id, turn=turn_no, outcome="echo", at_s=onset - self.started_at,
                                   onset_at=onset, stopped_at=None))
                return
        self._speech_epoch += 1
        self._open_utts.add(uid)
        self._cancel_eot_timer()
        self._emit(UserSpeech(self.session_id, started=True, audio_time_s=ev.audio_time_s, captured_at=ev.captured_at))
        if self._barge is not None:
            # More speech while the last interruption is still being transcribed: the user has the floor.
            self._confirm_barge_in(self._barge, "")
        if self.state == SessionState.SPEAKING and self._answer is not None:
            self._start_barge_in(uid, onset)
        elif self.state == SessionState.THINKING:
            # The user goes on before the answer was heard: drop it; the turn continues.
            self._drop_answer("user continued")
            self._reopened_utt = uid
            self._set_state(SessionState.USER_SPEAKING, "user continued")
        else:
            if self._turn is None:
                self._turn_count += 1
                self._turn = _UserTurn(self._turn_count)
            self._set_state(SessionState.USER_SPEAKING, "speech")

    # --- barge-in --------------------------------------------------------------------------------

    def _start_barge_in(self, uid: int, onset: float) -> None:
        answer = self._answer
        assert answer is not None
        self.playout.pause()  # no further frame goes out
        stopped = time.monotonic()
        answer.cancel()  # frees the CPU for transcribing the interruption
        self._barge = _BargeCandidate(uid, onset, stopped, answer, self.playout.played_text())
        self._turn_count += 1
        self._turn = _UserTurn(self._turn_count)
        self._set_state(SessionState.USER_SPEAKING, "barge-in")

    def _resolve_barge_in(self, barge: _BargeCandidate, text: str) -> bool:
        """The interruption's words are known: confirm it or resume. True when it was confirmed."""
        agent_text = barge.answer.speech_text
        if not words(text):
            outcome = "noise"
        elif is_backchannel(text, self.turn_cfg.backchannel_max_words):
            outcome = "backchannel"
        elif is_echo_text(text, agent_text + " " + barge.played_text, self.turn_cfg.echo_text_overlap):
            outcome = "echo"
        else:
            self._confirm_barge_in(barge, text)
            return True
        self._barge = None
        self._turn_count -= 1
        self._turn = None
        self._emit(BargeIn(self.session_id, turn=barge.answer.turn, outcome=outcome, at_s=barge.onset_at - self.started_at,
                           onset_at=barge.onset_at, stopped_at=barge.stopped_at, text=text, played_text=barge.played_text))
        log.debug("[%s] false interruption (%s: %r): resuming", self.session_id, outcome, text)
        self._resume(barge.answer)
        return False

    def _confirm_barge_in(self, barge: _BargeCandidate, text: str) -> None:
        self._barge = None
        answer = barge.answer
        self.playout.flush()
        self._emit(BargeIn(self.session_id, turn=answer.turn, outcome="interruption", at_s=barge.onset_at - self.started_at,
                           onset_at=barge.onset_at, stopped_at=barge.stopped_at, text=text, played_text=barge.played_text))
        self._finish_answer(answer, interrupted=True, played=barge.played_text)

    def _resume(self, answer: Answer) -> None:
        spec = answer.continuation() if not answer.complete else None
        if spec is not None:
            cont = self._new_answer(spec, preemptive=answer.preemptive)
            cont.first_sent_at = answer.first_sent_at
            cont.first_token_at = answer.first_token_at
            cont.metrics_from = answer  # type: ignore[attr-defined]
            self._answer = cont
            cont.released = True
            cont.start()
            self._spawn(self._watch_answer(cont), "watch")
        else:
            self._answer = answer
            self._spawn(self._watch_answer(answer), "watch")
        self.playout.resume()
        self._set_state(SessionState.SPEAKING if self.playout.is_playing else SessionState.THINKING, "resumed")

    # --- transcripts and end of turn -------------------------------------------------------------

    async def _on_asr(self, ev: ASREvent) -> None:
        uid = ev.utterance_id
        if uid in self._ignored_utts:
            if ev.kind == "final":
                self._ignored_utts.discard(uid)
            return
        self._emit(UserTranscript(self.session_id, text=ev.text, final=ev.kind == "final", utterance_id=uid,
                                  committed_text=ev.committed_text))
        if ev.kind == "interim":
            prev = self._last_interim.get(uid)
            self._last_interim[uid] = normalize_text(ev.text)
            if (self._barge is None and self.turn_cfg.preemptive and self.state == SessionState.USER_SPEAKING
                    and prev is not None and prev == self._last_interim[uid] and prev):
                await self._maybe_preempt(ev.text, ev.unsure_tail)
            return
        self._last_interim.pop(uid, None)
        self._open_utts.discard(uid)
        text = ev.text.strip()
        if self._barge is not None and self._barge.utterance_id == uid:
            if not self._resolve_barge_in(self._barge, text):
                return
        elif self._reopened_utt == uid:
            self._reopened_utt = None
            if not words(text) or is_backchannel(text, self.turn_cfg.backchannel_max_words):
                # A cough or an "mm" while the answer was being prepared: answer the turn as it was.
                if self._turn is not None and self._turn.text:
                    self._end_turn(self._turn)
                return
        turn = self._turn
        if turn is None:
            return
        if not words(text):
            if not turn.parts and self.state == SessionState.USER_SPEAKING and self._barge is None:
                self._turn = None
                self._turn_count -= 1
                self._set_state(SessionState.LISTENING, "no words")
            return
        turn.parts.append(text)
        turn.unsure_tail = ev.unsure_tail if without_tail(text, ev.unsure_tail) != text else ""
        turn.asr_final_at = ev.emitted_at
        await self._consider_end_of_turn(turn)

    async def _consider_end_of_turn(self, turn: _UserTurn) -> None:
        if not self._user_silent():
            return  # a later utterance of the same turn is still being heard or transcribed
        epoch = self._speech_epoch
        text = turn.text
        p: float | None = None
        if self.turn_cfg.semantic:
            p = self._spec_probs.get(normalize_text(text))
            if p is None:
                if self._spec is not None:
                    await self._discard_spec()
                try:
                    p = await self._end_of_turn_prob(text, turn.unsure_tail)
                except Exception as exc:  # noqa: BLE001 - without a score, silence alone decides
                    log.warning("end-of-turn scoring failed: %r", exc)
        if epoch != self._speech_epoch or self._turn is not turn or not self._user_silent():
            return  # the user spoke again meanwhile; the next final decides
        turn.eot_prob = p
        wait = self.turn_cfg.extra_wait_s(p)
        end_at = (turn.speech_end_at or time.monotonic()) + self.turn_cfg.hangover_s + wait
        delay = end_at - time.monotonic()
        log.debug("[%s] turn %d %r: P(end)=%s, extra wait %.2f s", self.session_id, turn.index, text,
                  "n/a" if p is None else f"{p:.4f}", wait)
        if delay <= 0:
            self._end_turn(turn)
        else:
            self._cancel_eot_timer()
            self._eot_timer = asyncio.get_running_loop().call_later(delay, self._eot_timer_fired, turn, epoch)

    async def _end_of_turn_prob(self, text: str, unsure_tail: str) -> float:
        """P(the user has finished) after `text`. When its last word(s) are a guess of Whisper's,
        the words before them are scored too and the lower probability counts: answering a
        half-finished sentence is worse than waiting a little longer on a finished one."""
        messages = self.conversation.messages()
        p = await self.eot.ascore(messages, text)
        sure = without_tail(text, unsure_tail)
        if sure != text and words(sure):
            p = min(p, await self.eot.ascore(messages, sure))
        return p

    def _eot_timer_fired(self, turn: _UserTurn, epoch: int) -> None:
        self._eot_timer = None
        if epoch == self._speech_epoch and self._turn is turn and self._user_silent():
            self._end_turn(turn)

    def _user_silent(self) -> bool:
        """No speech now and no utterance still waiting for its final transcript."""
        return not self.listener.detector.in_speech and not self._open_utts

    def _cancel_eot_timer(self) -> None:
        if self._eot_timer is not None:
            self._eot_timer.cancel()
            self._eot_timer = None

    def _end_turn(self, turn: _UserTurn) -> None:
        turn.ended_at = time.monotonic()
        if turn.in_history:
            last = self.conversation.last("user")
            if last is not None and self.conversation.turns and self.conversation.turns[-1] is last:
                self.conversation.turns[-1] = {"role": "user", "content": turn.text}
        else:
            self.conversation.add_user(turn.text)
            turn.in_history = True
        self._set_state(SessionState.THINKING, "end of turn")
        spec = self._spec
        self._spec = None
        if spec is not None and normalize_text(spec.user_text) == normalize_text(turn.text) and not spec.cancelled \
                and spec.error is None:
            answer = spec
        else:
            if spec is not None:
                spec.cancel()
            answer = self._new_answer(self._answer_spec(turn.text, turn.index))
            answer.start()
        answer.user_turn = turn  # type: ignore[attr-defined]
        self._release(answer)

    def _answer_spec(self, user_text: str, turn_index: int, *, held_user: bool = False,
                     after_tool: bool = False) -> AnswerSpec:
        from .reply import sampling_params

        extra = [{"role": "user", "content": user_text}] if held_user else []
        forced = ""
        if self._forced_tool is not None and self._forced_tool in self.tools and not after_tool:
            forced = self.tools.forced_prefix(self._forced_tool)
        return AnswerSpec(self.conversation.prompt_ids(extra, with_tools=not after_tool), sampling_params(self.cfg),
                          turn_index, user_text=user_text, forced_text=forced, filter_tools=bool(self.tools))

    async def _maybe_preempt(self, interim_text: str, unsure_tail: str = "") -> None:
        turn = self._turn
        if turn is None:
            return
        text = " ".join(p for p in (turn.text, interim_text.strip()) if p)
        key = normalize_text(text)
        if self._spec is not None and normalize_text(self._spec.user_text) == key:
            return
        await self._discard_spec()
        epoch = self._speech_epoch
        if key not in self._spec_probs and self.turn_cfg.semantic:
            try:
                self._spec_probs = {key: await self._end_of_turn_prob(text, unsure_tail)}
            except Exception:  # noqa: BLE001
                return
        if epoch != self._speech_epoch or self._turn is not turn or self.state != SessionState.USER_SPEAKING:
            return
        spec = self._new_answer(self._answer_spec(text, turn.index, held_user=True), preemptive=True)
        self._spec = spec
        spec.start()
        log.debug("[%s] preemptive answer started for %r", self.session_id, text)

    async def _discard_spec(self) -> None:
        spec, self._spec = self._spec, None
        if spec is not None:
            spec.cancel()
            await spec.wait()

    # --- answers ---------------------------------------------------------------------------------

    def _new_answer(self, spec: AnswerSpec, *, preemptive: bool = False) -> Answer:
        return Answer(self.engine, self.models.tts, spec, on_chunk=self._on_chunk, preemptive=preemptive)

    def _release(self, answer: Answer) -> None:
        """Let `answer` play: what it has made goes to the playout now, the rest as it comes."""
        if self._answer is not None and self._answer is not answer:
            self._answer.cancel()
        self.playout.reset()
        self._played_text_sent = ""
        self._answer = answer
        answer.released = True
        for chunk in answer.chunks:
            self.playout.push(chunk)
        self._spawn(self._watch_answer(answer), "watch")

    def _on_chunk(self, answer: Answer, chunk: SpeechChunk) -> None:
        # Only the current, released answer may reach the speaker: a stale one never plays over a
        # newer turn.
        if answer is self._answer and answer.released and not answer.cancelled:
            self.playout.push(chunk)

    def _drop_answer(self, reason: str) -> None:
        answer, self._answer = self._answer, None
        if answer is not None:
            answer.cancel()
        self.playout.flush()
        log.debug("[%s] answer dropped: %s", self.session_id, reason)

    async def _watch_answer(self, answer: Answer) -> None:
        """When `answer` has been made and played to the end, close the exchange."""
        await answer.wait()
        if answer is not self._answer or answer.cancelled:
            return
        await self.playout.wait_idle()
        if answer is not self._answer or answer.cancelled or self._barge is not None:
            return
        if answer.error is not None:
            self._emit(SessionError(self.session_id, where="answer", message=f"{type(answer.error).__name__}: {answer.error}"))
        call = answer.tool_call
        if call is not None:
            await self._run_tool_call(answer, call)
            return
        self._finish_answer(answer, interrupted=False, played=self.playout.played_text())

    def _finish_answer(self, answer: Answer, *, interrupted: bool, played: str) -> None:
        """Close the exchange: history, events, metrics; then whatever comes next."""
        if self._answer is answer:
            self._answer = None
        origin = getattr(answer, "metrics_from", answer)
        played = played.strip()
        if played:
            self.conversation.add_assistant(played)
        self._emit(AgentText(self.session_id, turn=answer.turn, text=played, final=True, interrupted=interrupted))
        self._emit(AgentSpeech(self.session_id, turn=answer.turn, started=False, text=played, interrupted=interrupted))
        turn: _UserTurn | None = getattr(origin, "user_turn", None)
        if answer.turn > 0 or turn is not None:
            tm = origin.tts_metrics
            self._emit(TurnMetrics(
                self.session_id, turn=answer.turn, user_text=turn.text if turn else answer.user_text, agent_text=played,
                interrupted=interrupted, preemptive=origin.preemptive,
                end_of_turn_prob=turn.eot_prob if turn else None,
                user_speech_end_at=turn.speech_end_at if turn else None,
                asr_final_at=turn.asr_final_at if turn else None,
                end_of_turn_at=turn.ended_at if turn else None,
                llm_first_token_at=origin.first_token_at,
                first_clause_at=tm.first_segment_at if tm else None,
                first_tts_audio_at=tm.first_audio_at if tm else None,
                first_audio_sent_at=answer.first_sent_at or origin.first_sent_at,
                llm_tokens=len(origin.token_ids),
                tool_calls=tuple(getattr(origin, "tool_names", ())),
            ))
        if self._turn is turn:
            self._turn = None
        if interrupted:
            return  # the interrupting user turn is already under way
        if self._say_queue:
            self._say(self._say_queue.pop(0), interrupt=False)
            return
        if self._ends_after_answer:
            self._spawn(self.end("end_call"), "end")
            return
        if self.state != SessionState.USER_SPEAKING:
            self._set_state(SessionState.LISTENING, "answer done")
        if self.state == SessionState.LISTENING and self._turn is None:
            self._idle.set()

    async def _run_tool_call(self, answer: Answer, call: ToolCall) -> None:
        self._forced_tool = None
        origin = getattr(answer, "metrics_from", answer)
        names = list(getattr(origin, "tool_names", ()))
        origin.tool_names = names + [call.name]  # type: ignore[attr-defined]
        result: Any = None
        error: str | None = None
        try:
            result = await self.tools.run(call)
        except ToolError as exc:
            error = str(exc)
        self._emit(ToolCalled(self.session_id, turn=answer.turn, name=call.name, arguments=call.arguments,
                              result=result, error=error))
        self.conversation.add_assistant(call.text())
        self.conversation.add("tool", json.dumps({"name": call.name, "result": result} if error is None
                                                 else {"name": call.name, "error": error}, default=str))
        tool = self.tools.tools.get(call.name)
        if tool is not None and tool.ends_call and error is None:
            self._ends_after_answer = True
        if answer is not self._answer:
            return
        follow = self._new_answer(self._answer_spec(answer.user_text, answer.turn, after_tool=True))
        follow.metrics_from = origin  # type: ignore[attr-defined]
        follow.first_sent_at = answer.first_sent_at
        if names:  # one tool round per turn: a model that calls again must still say something
            follow = self._new_answer(AnswerSpec([], follow.spec.params, answer.turn, generate=False,
                                                 pending_text="Sorry, I could not do that.", filter_tools=False))
            follow.metrics_from = origin  # type: ignore[attr-defined]
        self._answer = follow
        follow.released = True
        follow.start()
        self._spawn(self._watch_answer(follow), "watch")

    def _say(self, text: str, *, interrupt: bool) -> None:
        """Speak `text` as the agent (greeting, operator `say`), without the LLM."""
        if interrupt and self._answer is not None:
            answer = self._answer
            played = self.playout.played_text()
            self.playout.flush()
            answer.cancel()
            self._finish_answer(answer, interrupted=True, played=played)
        turn = self._turn.index if self._turn is not None and self._answer is None else 0
        answer = self._new_answer(AnswerSpec([], _NO_SAMPLING, turn, generate=False, pending_text=text, filter_tools=False))
        answer.start()
        self._release(answer)
        if self.state == SessionState.LISTENING:
            self._set_state(SessionState.THINKING, "say")

    # --- output ----------------------------------------------------------------------------------

    async def _send_frame(self, frame: AudioFrame) -> None:
        """Playout sink: resample to the transport's rate, stamp metrics, feed the echo guard."""
        now = self._last_frame_at = time.monotonic()
        answer = self._answer
        if answer is not None and answer.first_sent_at is None:
            answer.first_sent_at = now
            self._emit(AgentSpeech(self.session_id, turn=answer.turn, started=True))
        if self.state in (SessionState.THINKING, SessionState.LISTENING) and self._barge is None:
            self._set_state(SessionState.SPEAKING, "audio out")
        self.echo_guard.add_reference(frame, now)
        out = frame
        rate = self.transport.output_sample_rate
        if rate != frame.sample_rate:
            if self._out_resampler is None or self._out_resampler.from_rate != frame.sample_rate:
                self._out_resampler = StreamResampler(frame.sample_rate, rate)
            y = self._out_resampler.process(frame.to_float_mono())
            out = AudioFrame((np.clip(y, -1, 1) * 32767).astype(np.int16), rate, 1, frame.timestamp)
        try:
            await self.transport.send_audio(out)
        except TransportClosed:
            await self.end("transport closed")
            return
        started = self.playout.started_text()
        if answer is not None and started != self._played_text_sent:
            self._played_text_sent = started
            self._emit(AgentText(self.session_id, turn=answer.turn, text=started, final=False))

    # --- control ---------------------------------------------------------------------------------

    async def control(self, command: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        args = dict(args or {})
        try:
            if command == "say":
                text = str(args.get("text", "")).strip()
                if not text:
                    return {"ok": False, "error": "say needs a non-empty 'text'"}
                mode = args.get("mode", "interrupt")
                if mode not in ("interrupt", "queue"):
                    return {"ok": False, "error": "mode must be 'interrupt' or 'queue'"}
                if mode == "queue" and self._answer is not None:
                    self._say_queue.append(text)
                else:
                    self._say(text, interrupt=True)
                return {"ok": True}
            if command == "interrupt":
                if self._answer is not None:
                    self._drop_answer("control interrupt")
                    self._set_state(SessionState.LISTENING, "interrupted by control")
                return {"ok": True}
            if command == "end":
                await self.end(str(args.get("reason") or "ended by control"))
                return {"ok": True}
            if command in ("mute", "unmute"):
                self.muted = command == "mute"
                return {"ok": True, "muted": self.muted}
            if command == "set_persona":
                persona = str(args.get("persona", "")).strip()
                if not persona:
                    return {"ok": False, "error": "set_persona needs a non-empty 'persona'"}
                self.conversation.persona = persona
                return {"ok": True}
            if command == "tool":
                name = args.get("name")
                if name not in self.tools:
                    return {"ok": False, "error": f"unknown tool {name!r}"}
                call = ToolCall(str(name), dict(args.get("arguments") or {}))
                try:
                    result = await self.tools.run(call)
                except ToolError as exc:
                    return {"ok": False, "error": str(exc)}
                self._emit(ToolCalled(self.session_id, turn=self._turn_count, name=call.name, arguments=call.arguments,
                                      result=result))
                return {"ok": True, "result": result}
            if command == "force_tool":
                name = args.get("name")
                if name not in self.tools:
                    return {"ok": False, "error": f"unknown tool {name!r}"}
                self._forced_tool = str(name)
                return {"ok": True}
            if command == "status":
                return {"ok": True, "state": self.state.value, "turns": self._turn_count, "session_id": self.session_id,
                        "muted": self.muted}
        except Exception as exc:  # noqa: BLE001 - a control command must never take the session down
            log.exception("control %s failed", command)
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        return {"ok": False, "error": f"unknown command {command!r}"}

    def metrics_json(self) -> dict[str, Any]:
        """{"turns": [...], "barge_ins": [...]} as `rejoinder talk --metrics-json` writes it."""
        return {
            "session_id": self.session_id,
            "turns": [t.to_dict() for t in self.turns],
            "barge_ins": [b.to_dict() for b in self.barge_ins if b.outcome != "echo"],
            "echo_suppressed": sum(b.outcome == "echo" for b in self.barge_ins),
        }

