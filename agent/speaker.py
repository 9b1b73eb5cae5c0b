"""What is playing? The agent's side of the floor: answers released, played, finished, cut short.

One answer at a time reaches the speaker (`answer`): its chunks go to the playout buffer, which paces
them out to the transport in 20 ms frames and knows which words were heard. When an answer has been
made and played to the end its exchange is closed (history, `agent_text`/`agent_speech` events, the
turn's metrics); a tool call in it is run and a follow-up answer generated with the result; an
interrupted one keeps only the words that were played. `say` speaks given text without the LLM
(greeting, operator), cutting the agent off or queued after what it is saying.

Hold audio (`streaming.hold_audio`) plays through the same playout while the caller waits: on an
operator's hold or a transfer (until `resume`), and while a tool call runs longer than
`hold_after_s` (until the answer's first audio, or the caller speaks). It is not speech: no
`agent_text`, no metrics, no SPEAKING state.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from rejoinder.engine import SamplingParams
from rejoinder.errors import ControlError
from rejoinder.streaming.frames import AudioFrame
from rejoinder.streaming.hold_audio import hold_chunk
from rejoinder.streaming.playout import PlayoutBuffer, PlayoutConfig
from rejoinder.streaming.resample import StreamResampler
from rejoinder.streaming.streamed_tts import SpeechChunk
from rejoinder.streaming.transport import TransportClosed

from .answer import Answer, AnswerSpec
from .events import (
    AgentSpeech,
    AgentText,
    HoldChanged,
    SessionError,
    SessionState,
    ToolCalled,
    TransferRequested,
    TurnMetrics,
)
from .tools import ToolCall, ToolError

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger("rejoinder.agent.speaker")

_NO_SAMPLING = SamplingParams(max_new_tokens=1)  # answers that only speak given text
TOOL_RETRY_TEXT = "Sorry, I could not do that."


class Speaker:
    def __init__(self, session: Session, sample_rate: int) -> None:
        self.s = session
        # Speech goes to the transport as far ahead as it wants a reserve; a pause takes it back.
        self.playout = PlayoutBuffer(self._send_frame, sample_rate=sample_rate, recall=self._recall,
                                     config=PlayoutConfig(lead_s=session.transport.audio_lead_s))
        self.answer: Answer | None = None  # the answer the playout is (or will be) playing
        self.last_frame_at = 0.0
        self.forced_tool: str | None = None  # the next answer must begin with a call of this tool
        self.end_after_answer: str | None = None  # end the session (this reason) once the answer is spoken
        self.hold_after_answer: str | None = None  # go on hold (this reason) once the answer is spoken
        self.holding: str | None = None  # why hold audio plays ("operator", "transfer", "tool"), or None
        self._hold_task: asyncio.Task | None = None
        self._say_queue: list[str] = []
        self._out_resampler: StreamResampler | None = None
        self._played_text_sent = ""

    # --- making answers ------------------------------------------------------------------------

    def new_answer(self, user_text: str, turn: int, *, held_user: bool = False, after_tool: bool = False,
                   preemptive: bool = False) -> Answer:
        """An answer of the LLM to the conversation so far (plus `user_text` when it is not in history yet)."""
        s = self.s
        extra = [{"role": "user", "content": user_text}] if held_user else []
        forced = self.forced_tool if self.forced_tool in s.tools and not after_tool else ""
        # never a previous answer again, word for word (engine/sampling.py: the repetition guard)
        avoid = None if forced else s.conversation.answer_guard()
        params = dataclasses.replace(s.cfg.sampling_params(), avoid=avoid)
        spec = AnswerSpec(s.conversation.prompt_ids(extra, with_tools=not after_tool), params,
                          turn, user_text=user_text, forced_tool=forced or "",
                          tool_parameters=s.tools.tools[forced].parameters if forced else None,
                          filter_tools=bool(s.tools))
        return self._answer(spec, preemptive=preemptive)

    def _answer(self, spec: AnswerSpec, *, preemptive: bool = False) -> Answer:
        return Answer(self.s.engine, self.s.models.tts, spec, on_chunk=self._on_chunk, preemptive=preemptive,
                      slot=self.s.session_id, synthesis_hold_s=self.s.cfg.synthesis_hold_s)

    def _spoken(self, text: str, turn: int) -> Answer:
        return self._answer(AnswerSpec([], _NO_SAMPLING, turn, generate=False, pending_text=text, filter_tools=False))

    # --- playing them --------------------------------------------------------------------------

    def release(self, answer: Answer) -> None:
        """Let `answer` play: what it has made goes to the playout now, the rest as it comes."""
        if self.answer is not None and self.answer is not answer:
            self.answer.cancel()
        self.stop_hold()
        self.playout.reset()
        if self._out_resampler is not None:
            self._out_resampler.reset()  # its filter still holds the tail of the previous answer
        self._played_text_sent = ""
        self.answer = answer
        answer.released = True
        for chunk in answer.chunks:
            self.playout.push(chunk)
        self.s.spawn(self._watch(answer), "watch")

    def _play(self, answer: Answer) -> None:
        """Continue the exchange with `answer` (a continuation or follow-up), without resetting playout."""
        self.answer = answer
        answer.released = True
        answer.start()
        self.s.spawn(self._watch(answer), "watch")

    def _on_chunk(self, answer: Answer, chunk: SpeechChunk) -> None:
        # Only the current, released answer may reach the speaker: a stale one never plays over a
        # newer turn.
        if answer is self.answer and answer.released and not answer.cancelled:
            if self.holding == "tool":
                self.stop_hold()  # the answer's first audio ends the wait
            self.playout.push(chunk)

    def drop_answer(self, reason: str) -> None:
        answer, self.answer = self.answer, None
        if answer is not None:
            answer.cancel()
        if self.holding == "tool":
            self.stop_hold()
        self.playout.flush()
        log.debug("[%s] answer dropped: %s", self.s.session_id, reason)

    def resume(self, answer: Answer) -> None:
        """A false interruption: go on with `answer` where it stopped."""
        spec = answer.continuation() if not answer.complete else None
        if spec is not None:
            cont = self._answer(spec, preemptive=answer.preemptive)
            cont.first_sent_at = answer.first_sent_at
            cont.first_token_at = answer.first_token_at
            cont.origin = answer.origin
            self._play(cont)
        else:
            self.answer = answer
            self.s.spawn(self._watch(answer), "watch")
        self.playout.resume()
        self.s.set_state(SessionState.SPEAKING if self.playout.is_playing else SessionState.THINKING, "resumed")

    async def _watch(self, answer: Answer) -> None:
        """When `answer` has been made and played to the end, close the exchange."""
        await answer.wait()
        if answer is not self.answer or answer.cancelled:
            return
        await self.playout.wait_idle()
        if answer is not self.answer or answer.cancelled or self.s.barge_in.candidate is not None:
            return
        if answer.error is not None:
            self.s.emit(SessionError(self.s.session_id, where="answer",
                                     message=f"{type(answer.error).__name__}: {answer.error}"))
        call = answer.tool_call
        if call is not None:
            await self._run_tool_call(answer, call)
            return
        self.finish(answer, interrupted=False, played=self.playout.played_text())

    def finish(self, answer: Answer, *, interrupted: bool, played: str) -> None:
        """Close the exchange: history, events, metrics; then whatever comes next."""
        s = self.s
        if self.answer is answer:
            self.answer = None
        origin = answer.origin
        played = played.strip()
        if played:
            s.conversation.add_assistant(played)
        s.emit(AgentText(s.session_id, turn=answer.turn, text=played, final=True, interrupted=interrupted))
        s.emit(AgentSpeech(s.session_id, turn=answer.turn, started=False, text=played, interrupted=interrupted))
        turn = origin.user_turn
        if answer.turn > 0 or turn is not None:
            tm = origin.tts_metrics
            s.emit(TurnMetrics(
                s.session_id, turn=answer.turn, user_text=turn.text if turn else answer.user_text, agent_text=played,
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
                llm_tokens_per_s=origin.tokens_per_s,
                llm_prompt_reused=origin.prompt_reused, llm_prompt_run=origin.prompt_run,
                tool_calls=tuple(origin.tool_names),
            ))
        if s.turn_taker.current is turn:
            s.turn_taker.current = None
        if interrupted:
            return  # the interrupting user turn is already under way
        if self._say_queue:
            self.say(self._say_queue.pop(0), interrupt=False)
            return
        if self.end_after_answer:
            s.spawn(s.end(self.end_after_answer), "end")
            return
        if self.hold_after_answer:
            reason, self.hold_after_answer = self.hold_after_answer, None
            self.start_hold(reason)
            return
        if s.state != SessionState.USER_SPEAKING:
            s.set_state(SessionState.LISTENING, "answer done")
        s.update_idle()

    async def _run_tool_call(self, answer: Answer, call: ToolCall) -> None:
        s = self.s
        self.forced_tool = None
        origin = answer.origin
        first_round = not origin.tool_names
        origin.tool_names.append(call.name)
        result: Any = None
        error: str | None = None
        run = asyncio.ensure_future(s.tools.run(call))
        try:
            if s.cfg.call.hold_after_s > 0:
                done, _ = await asyncio.wait({run}, timeout=s.cfg.call.hold_after_s)
                if not done and answer is self.answer:
                    self.start_hold("tool")  # a slow tool: the caller hears that the line is alive
            result = await run
        except ToolError as exc:
            error = str(exc)
        finally:
            if not run.done():
                run.cancel()
        s.emit(ToolCalled(s.session_id, turn=answer.turn, name=call.name, arguments=call.arguments,
                          result=result, error=error))
        s.conversation.add_assistant(call.text())
        s.conversation.add("tool", json.dumps({"name": call.name, "result": result} if error is None
                                              else {"name": call.name, "error": error}, default=str))
        tool = s.tools.tools.get(call.name)
        if tool is not None and tool.ends_call and error is None:
            self.end_after_answer = "end_call"
        if answer is not self.answer:
            if self.holding == "tool":
                self.stop_hold()
            return
        if first_round:
            follow = self.new_answer(answer.user_text, answer.turn, after_tool=True)
        else:  # one tool round per turn: a model that calls again must still say something
            follow = self._spoken(TOOL_RETRY_TEXT, answer.turn)
        follow.origin = origin
        follow.first_sent_at = answer.first_sent_at
        self._play(follow)

    def say(self, text: str, *, interrupt: bool, then_end: str | None = None) -> None:
        """Speak `text` as the agent (greeting, operator `say`), without the LLM; `then_end`: hang up after it."""
        s = self.s
        if then_end:
            self.end_after_answer = then_end
        if interrupt:
            self.interrupt_answer()
        turn = s.turn_taker.current.index if s.turn_taker.current is not None and self.answer is None else 0
        answer = self._spoken(text, turn)
        answer.start()
        self.release(answer)
        if s.state == SessionState.LISTENING:
            s.set_state(SessionState.THINKING, "say")

    def interrupt_answer(self) -> None:
        """Stop the answer now and close its exchange as interrupted (history keeps what was played)."""
        answer = self.answer
        if answer is None:
            return
        played = self.playout.flush().played_text  # after the transport's unsent reserve was taken back
        answer.cancel()
        self.finish(answer, interrupted=True, played=played)

    def queue_say(self, text: str) -> None:
        """Speak `text` after the current answer (at once when nothing is being said)."""
        if self.answer is not None:
            self._say_queue.append(text)
        else:
            self.say(text, interrupt=True)

    async def close(self) -> None:
        if self.answer is not None:
            self.answer.cancel()
        self.stop_hold()
        self.playout.flush()
        await self.playout.aclose()

    # --- hold audio ----------------------------------------------------------------------------

    def resume_from_hold(self) -> None:
        if not self.holding:
            raise ControlError("the session is not on hold")
        self.stop_hold()
        self.s.set_state(SessionState.LISTENING, "resumed from hold")

    def transfer(self, target: str, reason: str, by: str) -> str:
        """See `Session.transfer`."""
        s = self.s
        target = target.strip()
        if not target:
            raise ControlError("transfer needs a non-empty 'target'")
        summary = tuple(dict(m) for m in s.conversation.turns)
        s.emit(TransferRequested(s.session_id, target=target, reason=reason, by=by, summary=summary))
        self.hold_after_answer = "transfer"
        if by != "llm":  # the model's own follow-up tells the caller when it asked for the transfer
            self.say(s.cfg.call.transfer_line, interrupt=True)
        return f"transferring to {target}"

    def start_hold(self, reason: str) -> None:
        """Play hold audio until `stop_hold()` (what is queued of an answer is dropped first)."""
        if self.holding is not None:
            self.holding = reason if reason != "tool" else self.holding
            return
        self.holding = reason
        self.playout.reset()
        self._hold_task = self.s.spawn(self._hold_loop(), "hold-audio")
        if reason != "tool":
            self.s.set_state(SessionState.ON_HOLD, reason)
        self.s.emit(HoldChanged(self.s.session_id, on=True, reason=reason))

    def stop_hold(self) -> None:
        if self.holding is None:
            return
        reason, self.holding = self.holding, None
        task, self._hold_task = self._hold_task, None
        if task is not None:
            task.cancel()
        self.playout.flush()
        self.playout.reset()
        self.s.emit(HoldChanged(self.s.session_id, on=False, reason=reason))

    async def _hold_loop(self) -> None:
        rate = self.playout.sample_rate or self.s.models.tts.sample_rate
        i = 0
        while True:
            self.playout.push(hold_chunk(rate, i))
            i += 1
            await self.playout.wait_idle()

    # --- frames out ----------------------------------------------------------------------------

    async def _send_frame(self, frame: AudioFrame) -> None:
        """Playout sink: resample to the transport's rate, stamp metrics, feed the echo guard and canceller."""
        s = self.s
        now = self.last_frame_at = time.monotonic()
        if s.recorder is not None:
            s.recorder.add_agent(frame, now)
        if self.holding is not None:
            # Hold audio: to the caller (and the echo guard's reference), nothing else.
            await self._out(frame, now)
            return
        answer = self.answer
        if answer is not None and answer.first_sent_at is None:
            answer.first_sent_at = now
            s.emit(AgentSpeech(s.session_id, turn=answer.turn, started=True))
        if s.state in (SessionState.THINKING, SessionState.LISTENING) and s.barge_in.candidate is None:
            s.set_state(SessionState.SPEAKING, "audio out")
        if not await self._out(frame, now):
            return
        started = self.playout.started_text()
        if answer is not None and started != self._played_text_sent:
            self._played_text_sent = started
            s.emit(AgentText(s.session_id, turn=answer.turn, text=started, final=False))

    async def _out(self, frame: AudioFrame, now: float) -> bool:
        """To the caller, and as what their loudspeaker plays to the echo guard and the canceller;
        False when the transport has closed (the session then ends)."""
        s = self.s
        s.echo_guard.add_reference(frame, now)
        if s.aec is not None:
            s.aec.add_reference(frame, now)
        try:
            await s.transport.send_audio(self._to_transport_rate(frame))
        except TransportClosed:
            await s.end("transport closed")
            return False
        return True

    def _recall(self) -> float:
        """Speech the transport holds unsent, dropped (the playout re-queues it); its seconds."""
        self._out_resampler = None  # its filter holds the tail of what was taken back
        return self.s.transport.recall_audio()

    def _to_transport_rate(self, frame: AudioFrame) -> AudioFrame:
        rate = self.s.transport.output_sample_rate
        if rate == frame.sample_rate:
            return frame
        if self._out_resampler is None or self._out_resampler.from_rate != frame.sample_rate:
            self._out_resampler = StreamResampler(frame.sample_rate, rate)
        return AudioFrame.from_float(self._out_resampler.process(frame.to_float_mono()), rate, frame.timestamp)
