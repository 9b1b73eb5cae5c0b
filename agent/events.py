"""Typed events of a session: what transports, MQTT and metrics collectors receive.

Every event is a frozen dataclass with a `type` name and `to_dict()` (JSON-ready: the wire form
for data channels and MQTT). Times are `time.monotonic()` seconds (`at`), the clock every stage
stamps, so latencies are differences of fields; `wall_time` is added for humans and logs.
"""
from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar


class SessionState(str, enum.Enum):
    LISTENING = "listening"  # nobody speaks; waiting for the user
    USER_SPEAKING = "user_speaking"  # the user holds the turn (also while deciding if it ended)
    THINKING = "thinking"  # the user's turn ended; the answer is being prepared, nothing played yet
    SPEAKING = "speaking"  # agent audio is going out
    ON_HOLD = "on_hold"  # hold audio plays; the caller's audio is not acted on (transfer, operator hold)
    ENDED = "ended"


@dataclass(frozen=True)
class SessionEvent:
    type: ClassVar[str] = "event"
    session_id: str
    at: float = field(default_factory=time.monotonic, kw_only=True)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.value if isinstance(v, enum.Enum) else v
        out["wall_time"] = time.time() - (time.monotonic() - self.at)
        return out


@dataclass(frozen=True)
class StateChanged(SessionEvent):
    type: ClassVar[str] = "state"
    old: SessionState
    new: SessionState
    reason: str = ""


@dataclass(frozen=True)
class UserSpeech(SessionEvent):
    """VAD boundary of the user's speech (echo of the agent excluded)."""

    type: ClassVar[str] = "user_speech"
    started: bool  # True: speech started; False: it stopped
    audio_time_s: float  # position in the input stream
    captured_at: float | None = None  # monotonic time the boundary's audio was captured


@dataclass(frozen=True)
class UserTranscript(SessionEvent):
    type: ClassVar[str] = "transcript"
    text: str
    final: bool
    utterance_id: int  # 0 for typed text
    committed_text: str = ""
    source: str = "voice"  # "voice" (recognised speech) or "text" (typed: the page's text box, user_text)


@dataclass(frozen=True)
class AgentSpeech(SessionEvent):
    """The agent started or stopped speaking an answer."""

    type: ClassVar[str] = "agent_speech"
    turn: int
    started: bool
    text: str = ""  # on stop: the text actually played
    interrupted: bool = False


@dataclass(frozen=True)
class AgentText(SessionEvent):
    """The agent's words as they are spoken: `text` is the whole answer played so far.

    Sent when each piece of the answer starts playing (final=False) and once at the end (final=True),
    where `text` is what was actually played: truncated when the agent was interrupted.
    """

    type: ClassVar[str] = "agent_text"
    turn: int
    text: str
    final: bool
    interrupted: bool = False


@dataclass(frozen=True)
class TurnMetrics(SessionEvent):
    """One user turn and the agent's answer, with the monotonic time of each stage (None: did not happen).

    voice_to_voice_s = first_audio_sent_at - user_speech_end_at: from the end of the user's speech
    (when its last audio was captured) to the first frame of the answer handed to the transport.
    """

    type: ClassVar[str] = "metrics"
    turn: int
    user_text: str
    agent_text: str  # what the agent said (truncated to what was played when interrupted)
    interrupted: bool
    preemptive: bool  # the answer came from generation started before the end of the turn
    end_of_turn_prob: float | None
    user_speech_end_at: float | None
    asr_final_at: float | None
    end_of_turn_at: float | None  # the turn was declared over
    llm_first_token_at: float | None
    first_clause_at: float | None
    first_tts_audio_at: float | None
    first_audio_sent_at: float | None
    llm_tokens: int = 0
    llm_tokens_per_s: float | None = None  # decode speed of the answer (first to last token)
    llm_prompt_reused: int = 0  # prompt tokens whose KV cache the session's slot already held
    llm_prompt_run: int = 0  # prompt tokens prefilled for this answer
    tool_calls: tuple[str, ...] = ()

    @property
    def voice_to_voice_s(self) -> float | None:
        if self.first_audio_sent_at is None or self.user_speech_end_at is None:
            return None
        return self.first_audio_sent_at - self.user_speech_end_at

    def stage_latencies(self) -> dict[str, float | None]:
        """Seconds from the end of user speech to each stage."""
        t0 = self.user_speech_end_at
        names = ("asr_final_at", "end_of_turn_at", "llm_first_token_at", "first_clause_at",
                 "first_tts_audio_at", "first_audio_sent_at")
        return {n[:-3] + "_s": (getattr(self, n) - t0 if t0 is not None and getattr(self, n) is not None else None)
                for n in names}

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["voice_to_voice_s"] = self.voice_to_voice_s
        out["tool_calls"] = list(self.tool_calls)
        out.update(self.stage_latencies())
        return out


@dataclass(frozen=True)
class BargeIn(SessionEvent):
    """User speech while the agent spoke, and what came of it.

    outcome: "interruption" (the agent yielded the turn), "backchannel" or "noise" (false
    interruption: the agent resumed), "echo" (its own voice came back; playback never paused).
    reaction_s: from the onset of the user's speech to the moment agent audio stopped.
    """

    type: ClassVar[str] = "barge_in"
    turn: int
    outcome: str
    at_s: float  # session time (seconds since the session started) of the speech onset
    onset_at: float  # monotonic time of the onset
    stopped_at: float | None  # monotonic time agent audio stopped (None for echo: it did not stop)
    text: str = ""
    played_text: str = ""  # what the agent had said when it stopped

    @property
    def reaction_s(self) -> float | None:
        return None if self.stopped_at is None else self.stopped_at - self.onset_at

    @property
    def resumed(self) -> bool:
        return self.outcome in ("backchannel", "noise")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["reaction_s"] = self.reaction_s
        out["resumed"] = self.resumed
        return out


@dataclass(frozen=True)
class ToolCalled(SessionEvent):
    type: ClassVar[str] = "tool_call"
    turn: int
    name: str
    arguments: dict[str, Any]
    result: Any = None
    error: str | None = None


@dataclass(frozen=True)
class UserIdle(SessionEvent):
    """The caller said nothing for `idle_s` while the agent listened; it prompted them (or says goodbye)."""

    type: ClassVar[str] = "user_idle"
    prompts: int  # prompts so far, this one included
    idle_s: float
    ending: bool = False  # the last one: the agent says goodbye and ends the session


@dataclass(frozen=True)
class TransferRequested(SessionEvent):
    """The call should go to a person or another line; the caller waits on hold meanwhile."""

    type: ClassVar[str] = "transfer_requested"
    target: str
    reason: str = ""
    by: str = ""  # "operator" (control surface) or "llm" (the transfer tool)
    summary: tuple[dict[str, str], ...] = ()  # the conversation so far: {"role", "content"} per message


@dataclass(frozen=True)
class HoldChanged(SessionEvent):
    """Hold audio started or stopped (an operator's hold, a transfer, a slow tool call)."""

    type: ClassVar[str] = "hold"
    on: bool
    reason: str = ""


@dataclass(frozen=True)
class RecordingReady(SessionEvent):
    """The session's recording is complete: a stereo WAV (caller left, agent right) and a JSON transcript."""

    type: ClassVar[str] = "recording_ready"
    audio_path: str
    transcript_path: str
    seconds: float


@dataclass(frozen=True)
class SessionStarted(SessionEvent):
    type: ClassVar[str] = "session_started"
    persona: str = ""


@dataclass(frozen=True)
class SessionError(SessionEvent):
    """Something failed inside the session; it carries on (or ends, when `fatal`)."""

    type: ClassVar[str] = "error"
    where: str
    message: str
    fatal: bool = False


@dataclass(frozen=True)
class SessionEnded(SessionEvent):
    type: ClassVar[str] = "session_ended"
    reason: str
    turns: int


EventListener = Callable[[SessionEvent], "Awaitable[None] | None"]
