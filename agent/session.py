"""One conversation over one transport: the conductor of the session's roles, its state and its API.

States (agent.events.SessionState):

    LISTENING --user speech--> USER_SPEAKING --turn over--> THINKING --first frame out--> SPEAKING
        ^                          ^   |                        |                          |
        |                          |   +--noise only------------+----------------+         |
        +----------answer played---+---------------------------------------------|---------+
                                   +--user speech while THINKING or SPEAKING (barge-in)----+

Input is processed all the time (the agent hears the user while it talks). The work is split by the
question it answers:

    agent.turns     when does the user's turn end?        (turn assembly, end-of-turn timer, early answers)
    agent.barge_in  was that an interruption?             (echo, candidates, resolution, resume)
    agent.speaker   what is playing?                      (answer release, playout, finish, tools, `say`)
    agent.control   which commands may come from outside? (the table every channel dispatches through)

`Session` wires them to the models and the transport, holds the state and the event fan-out, and
offers the typed API: `say()`, `interrupt()`, `end()`, `mute()`, `unmute()`, `set_persona()`,
`run_tool()`, `force_tool()`, `status()`, and for call centers `user_text()`, `hold()`, `resume()`,
`transfer()` (agent.idle prompts a silent caller; agent.recording records the call when asked).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Coroutine, Sequence
from typing import Any, Literal

import numpy as np

from rejoinder.engine.end_of_turn import EndOfTurnScorer
from rejoinder.errors import ControlError
from rejoinder.streaming.aec import EchoCanceller
from rejoinder.streaming.asr import ASR_RATE
from rejoinder.streaming.asr_stream import ASREvent
from rejoinder.streaming.echo import EchoGuard, EchoGuardConfig
from rejoinder.streaming.frames import AudioFrame, FrameChunker
from rejoinder.streaming.transport import Transport
from rejoinder.streaming.vad import VADEvent

from .barge_in import BargeInHandler
from .config import AgentConfig
from .conversation import Conversation
from .events import (
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
)
from .idle import IdleWatcher
from .models import Models
from .recording import Recorder
from .speaker import Speaker
from .tools import Tool, ToolCall, ToolError, ToolRegistry, transfer_tool
from .turns import TurnTaker, TurnTakingConfig, listener_for

log = logging.getLogger("rejoinder.agent.session")

_session_numbers = itertools.count(1)


class Session:
    """See the module docstring. Create, then `await run()`."""

    def __init__(
        self,
        models: Models,
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
        self.tools = ToolRegistry(list(tools.tools.values()) if isinstance(tools, ToolRegistry) else list(tools or []))
        if cfg.call.transfer_targets and "transfer_call" not in self.tools:
            self.tools.add(transfer_tool(cfg.call.transfer_targets, self.transfer))
        self.greeting = cfg.greeting if greeting is None else greeting
        self.drain_on_eof = drain_on_eof
        self.state = SessionState.LISTENING
        self.muted = False
        self.started_at = time.monotonic()
        self.turns: list[TurnMetrics] = []  # one per answered user turn, in order
        self.barge_ins: list[BargeIn] = []
        self.end_reason = ""
        self._listeners: list[EventListener] = list(listeners)

        self.engine = models.engine
        self.conversation = Conversation(
            self.engine.tokenizer, cfg.persona,
            budget_tokens=max(256, cfg.max_context - cfg.max_new_tokens - 64), tool_prompt=self.tools.system_prompt(),
        )
        self.eot = EndOfTurnScorer.shared(self.engine)
        turn_cfg = turn_taking or cfg.turns
        self.listener = listener_for(models, turn_cfg, canceller=cfg.aec.mode != "off")
        # The input without the agent's voice: always (on), or from when its echo is found (auto).
        self.aec = EchoCanceller(cfg.aec) if cfg.aec.mode != "off" else None
        self.echo_guard = EchoGuard(echo or cfg.echo, cleaned=self.aec is not None and self.aec.engaged)
        self.turn_taker = TurnTaker(self, turn_cfg)
        self.barge_in = BargeInHandler(self)
        self.speaker = Speaker(self, models.tts.sample_rate)
        self.idle_watcher = IdleWatcher(self, cfg.call)
        self.recorder: Recorder | None = None  # started by run() when cfg.call.record_dir is set
        self._chunker = FrameChunker(ASR_RATE)
        self._utt_count = 0
        self._ignored_utts: set[int] = set()  # echo (or muted) utterances: their transcripts are dropped
        self._tasks: set[asyncio.Task] = set()
        self._ended = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    # --- state and events ------------------------------------------------------------------------

    def add_listener(self, fn: EventListener) -> None:
        self._listeners.append(fn)

    def emit(self, event: SessionEvent) -> None:
        if isinstance(event, TurnMetrics):
            self.turns.append(event)
        elif isinstance(event, BargeIn):
            self.barge_ins.append(event)
        self.spawn(self._deliver(event), "deliver")

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

    def set_state(self, new: SessionState, reason: str = "") -> None:
        if new == self.state:
            return
        old, self.state = self.state, new
        log.debug("[%s] %s -> %s (%s)", self.session_id, old.value, new.value, reason)
        self.emit(StateChanged(self.session_id, old=old, new=new, reason=reason))
        self.update_idle()

    def update_idle(self) -> None:
        if self.state == SessionState.LISTENING and self.turn_taker.current is None:
            self._idle.set()
        else:
            self._idle.clear()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task:
        """Run `coro` as a task the session owns: cancelled at shutdown, its failure reported."""
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
                self.emit(SessionError(self.session_id, where=task.get_name(), message=repr(exc)))

    # --- running ---------------------------------------------------------------------------------

    async def run(self) -> None:
        """Run until the transport's input ends or the session is ended (`end()`, a tool)."""
        self.speaker.playout.start()
        self.recorder = Recorder.attach(self) if self.cfg.call.record_dir else None
        self.emit(SessionStarted(self.session_id, persona=self.cfg.persona))
        consumer = self.spawn(self._consume_listener(), "listener-events")
        pump = self.spawn(self._pump_input(), "input")
        if self.idle_watcher.enabled:
            self.spawn(self.idle_watcher.run(), "idle")
        if self.greeting:
            self.speaker.say(self.greeting, interrupt=False)
        try:
            await asyncio.wait({pump, self.spawn(self._ended.wait(), "ended")}, return_when=asyncio.FIRST_COMPLETED)
            if not self._ended.is_set() and self.drain_on_eof:
                await self.wait_idle(timeout=60.0)
        finally:
            await self._shutdown(consumer, pump)

    @property
    def idle(self) -> bool:
        """Nobody speaks and nothing is pending."""
        return self._idle.is_set() and not self.listener.detector.in_speech

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until nobody speaks and nothing is pending (for 0.2 s); False on timeout."""
        async def idle_for(seconds: float) -> None:
            while True:
                await self._idle.wait()
                await asyncio.sleep(seconds)
                if self.idle:
                    return
        try:
            await asyncio.wait_for(idle_for(0.2), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def _shutdown(self, *tasks: asyncio.Task) -> None:
        if not self.end_reason:
            self.end_reason = "hangup"
        self._ended.set()
        self.turn_taker.cancel_all()
        await self.speaker.close()
        for t in list(tasks) + list(self._tasks):
            if t is not asyncio.current_task() and not t.done() and t.get_name() != "rejoinder-deliver":
                t.cancel()
        await asyncio.gather(*[t for t in tasks if t is not asyncio.current_task()], return_exceptions=True)
        await self.listener.abort()
        self.engine.release_slot(self.session_id)  # its cached prefix is no use to anyone else
        self.state = SessionState.ENDED
        if self.recorder is not None:
            self.recorder.close()
            await self._deliver(self.recorder.ready_event())
        await self._deliver(SessionEnded(self.session_id, reason=self.end_reason, turns=self.turn_taker.count))
        pending = [t for t in self._tasks if t.get_name() == "rejoinder-deliver"]
        if pending:
            await asyncio.wait(pending, timeout=2.0)

    # --- input -----------------------------------------------------------------------------------

    async def _pump_input(self) -> None:
        async for frame in self.transport.audio_in():
            if self._ended.is_set():
                return
            for f in self._chunker.push(frame):
                engaged = self.aec is not None and self.aec.engaged
                if self.aec is not None:
                    f = self.aec.process(f)
                if self.recorder is not None:
                    self.recorder.add_caller(f)
                if self.muted:
                    f = AudioFrame(np.zeros_like(f.samples), f.sample_rate, 1, f.timestamp)
                self.echo_guard.add_input(f)
                for ev in await self.listener.push(f):
                    self._on_vad(ev)
                if self.aec is not None and self.aec.engaged and not engaged:
                    self._canceller_engaged()
                self.turn_taker.tick()
        log.debug("[%s] input ended", self.session_id)

    def _canceller_engaged(self) -> None:
        """The canceller found the agent's echo (auto) and cleans the input from the next frame. An
        utterance open on that echo ends here: left open, the canceller's first residual would hold
        the VAD in speech, and a caller who talks next would be heard as more of the echo."""
        self.echo_guard.cleaned = True
        if self.listener.detector.in_speech and self._utt_count in self._ignored_utts:
            for ev in self.listener.cut():
                self._on_vad(ev)

    async def _consume_listener(self) -> None:
        while True:
            ev = await self.listener.get()
            if not isinstance(ev, ASREvent):
                continue
            if ev.utterance_id in self._ignored_utts:
                if ev.kind == "final":
                    self._ignored_utts.discard(ev.utterance_id)
                continue
            await self.turn_taker.transcript(ev)

    def _on_vad(self, ev: VADEvent) -> None:
        now = time.monotonic()
        if ev.kind == "speech_start":
            self._utt_count += 1
            uid = self._utt_count
            onset = (ev.captured_at if ev.captured_at is not None else now) + self.listener.detector.config.pre_roll_s
            # The agent's voice arrives late (echo path) and outlasts its speech by the VAD hang-over.
            if self.muted or self.on_hold or self.barge_in.is_echo(onset, now):
                self._ignored_utts.add(uid)
                return
            self.idle_watcher.reset()
            self.turn_taker.speech_started(uid, onset, ev.audio_time_s, ev.captured_at)
        elif self._utt_count not in self._ignored_utts:
            self.turn_taker.speech_ended(ev.audio_time_s, ev.captured_at)

    # --- the typed API (agent.control dispatches remote commands to these) ------------------------

    def say(self, text: str, mode: Literal["interrupt", "queue"] = "interrupt") -> None:
        """Speak `text` now (no LLM), cutting the agent off, or after what it is saying (`queue`)."""
        text = text.strip()
        if not text:
            raise ControlError("say needs a non-empty 'text'")
        if mode not in ("interrupt", "queue"):
            raise ControlError("mode must be 'interrupt' or 'queue'")
        if mode == "queue":
            self.speaker.queue_say(text)
        else:
            self.speaker.say(text, interrupt=True)

    def interrupt(self) -> None:
        """Stop speaking, as a barge-in would (what was played stays in history)."""
        if self.speaker.answer is not None:
            self.speaker.drop_answer("control interrupt")
            self.set_state(SessionState.LISTENING, "interrupted by control")

    async def end(self, reason: str = "ended") -> None:
        """Hang up: the session ends cleanly (`run()` returns)."""
        if not self.end_reason:
            self.end_reason = reason
        self._ended.set()

    def mute(self) -> None:
        """Stop acting on the caller's audio (a supervisor talks to them)."""
        self.muted = True

    def unmute(self) -> None:
        self.muted = False

    def set_persona(self, persona: str) -> None:
        """Replace the system prompt from the next answer on."""
        persona = persona.strip()
        if not persona:
            raise ControlError("set_persona needs a non-empty 'persona'")
        self.conversation.persona = persona

    async def run_tool(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run a registered tool now (outside any answer); reported as a `tool_call` event."""
        if name not in self.tools:
            raise ControlError(f"unknown tool {name!r}")
        call = ToolCall(name, dict(arguments or {}))
        try:
            result = await self.tools.run(call)
        except ToolError as exc:
            raise ControlError(str(exc)) from None
        self.emit(ToolCalled(self.session_id, turn=self.turn_taker.count, name=call.name, arguments=call.arguments,
                             result=result))
        return result

    def force_tool(self, name: str) -> None:
        """Make the next answer begin with a call of `name` (small models do not call tools by themselves)."""
        if name not in self.tools:
            raise ControlError(f"unknown tool {name!r}")
        self.speaker.forced_tool = name

    @property
    def on_hold(self) -> bool:
        return self.state == SessionState.ON_HOLD

    def user_text(self, text: str) -> None:
        """A typed message from the caller: a user turn like a spoken one (history, events, spoken answer)."""
        text = text.strip()
        if not text:
            raise ControlError("user_text needs a non-empty 'text'")
        if self.on_hold:
            raise ControlError("the session is on hold; resume it first")
        self.idle_watcher.reset()
        self.turn_taker.typed(text)

    def hold(self, reason: str = "operator") -> None:
        """Put the caller on hold: the agent stops, hold audio plays, their audio is not acted on."""
        self.turn_taker.cancel_all()
        self.speaker.interrupt_answer()
        self.speaker.start_hold(reason)

    def resume(self) -> None:
        """Back from hold: the hold audio stops and the agent listens again."""
        self.speaker.resume_from_hold()
        self.idle_watcher.reset()

    def transfer(self, target: str, reason: str = "", by: str = "operator") -> str:
        """Hand the call over: `transfer_requested` goes out with the conversation so far, the caller is
        told (the transfer line, or the LLM's own answer when the model asked) and waits on hold."""
        if by != "llm":
            self.turn_taker.cancel_all()
        return self.speaker.transfer(target, reason, by)

    def status(self) -> dict[str, Any]:
        return {"state": self.state.value, "turns": self.turn_taker.count, "session_id": self.session_id,
                "muted": self.muted, "on_hold": self.on_hold}
