"""The one typed configuration of the agent, and the one place the environment is read.

`AgentConfig` holds every setting with a sane default, in groups: models and generation (its own
fields), turn-taking (`turns`), the echo guard (`echo`) and canceller (`aec`), the web server (`serve`),
MQTT (`mqtt`) and LiveKit (`livekit`). Each field may carry metadata: `help`, `flag` (a flag name other than the field
name), `env` (a variable name other than REJOINDER_<NAME>; None: no variable) and `choices`.

From that one description come the CLI flags (`add_flags(parser, groups)`, generated, never written
out twice) and the values (`load(env, args)`), with one precedence everywhere:
CLI flag > environment variable (REJOINDER_<FIELD>, e.g. REJOINDER_LLM_MODEL) > default.
Model paths left empty mean "the embedded model" (resolved by rejoinder.streaming.assets).
A value that cannot be used raises `ConfigError` naming the variable or flag.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from rejoinder.errors import ConfigError
from rejoinder.streaming.aec import AECConfig
from rejoinder.streaming.echo import EchoGuardConfig
from rejoinder.streaming.signalling import ServeConfig

from .mcp_servers import MCPServerEntry, mcp_server_entries, split_mcp_servers

if TYPE_CHECKING:
    from rejoinder.engine import SamplingParams


DEFAULT_PERSONA = (
    "You are a helpful AI assistant named Rejoinder. Keep every answer short: one or two sentences, "
    "suitable to be spoken aloud."
)

Group = Literal["models", "generation", "turns", "echo", "serve", "mqtt", "livekit", "call", "telemetry"]


def _f(default: Any, help: str, group: Group = "models", **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, "group": group, **meta})


@dataclass(frozen=True)
class TurnTakingConfig:
    """When a user turn ends and what speech during the agent's speech means (agent.turns, agent.barge_in)."""

    # VAD: speech must last min_speech_s to count (and to barge in); silence of hangover_s ends it.
    # With the echo canceller (--aec auto, the default, or on) 0.15 s barges in on every interruption
    # of bench/echo_barge_in.py's set and on none of its echoes and noises; with --aec off the echo
    # guard alone judges the agent's own voice, and needs min_speech_guard_only_s.
    min_speech_s: float = 0.15
    min_speech_guard_only_s: float = 0.2
    hangover_s: float = 0.3
    vad_threshold: float = 0.5
    # Semantic end of turn.
    semantic: bool = True
    complete_prob: float = 0.02  # at or above: the turn is over once the VAD says silence
    incomplete_prob: float = 0.002  # at or below: wait the longest
    max_extra_wait_s: float = 1.6  # extra silence to wait for an incomplete turn
    # Barge-in.
    backchannel_max_words: int = 3
    echo_text_overlap: float = 0.7  # share of an interruption's words found in the agent's recent text
    preemptive: bool = True  # start generating on a stable interim transcript
    # Speculative hand-over: when speech pauses, the transcript, the end-of-turn score, the answer's
    # first words and their audio are prepared at once and held; the turn is handed over as soon as
    # the silence has lasted long enough for how complete the words read (fast_hangover_s when they
    # clearly end a turn), and the held answer is discarded if the user goes on. False: the
    # sequential hand-over (wait for the VAD hang-over and the final transcript, then answer).
    speculative: bool = True
    # Silence after which the pause transcript is decoded (the VAD counts 32 ms windows: 0.05 fires
    # after two). Whisper hears the words as well 50 ms past the VAD's end as 100 ms past it
    # (bench/asr_cut.py: WER 0.163 vs 0.171 on 138 clips), and the answer is ready 70 ms sooner
    # (bench/agent_latency.py --pause-pass).
    pause_pass_s: float = 0.05
    # While the user speaks, the words already committed by the recogniser are prefilled into the
    # session's KV slot, so that at the pause the end-of-turn score and the answer's prompt run only
    # the last words (bench/agent_latency.py measures it against the same session without).
    prefill_while_speaking: bool = True
    fast_hangover_s: float = 0.15  # silence that hands over a turn that reads complete
    # New audio between interim ASR passes while the user speaks (passes never overlap): shorter
    # gives fresher interims and more prefill while speaking, longer leaves the CPU free more often
    # when speech pauses, so the pause transcript waits less for a pass in flight.
    interim_interval_s: float = 0.4

    def __post_init__(self) -> None:
        if not 0.0 < self.incomplete_prob < self.complete_prob <= 1.0:
            raise ConfigError("need 0 < incomplete_prob < complete_prob <= 1")
        if not (0.1 <= self.min_speech_s <= 1.0 and 0.1 <= self.min_speech_guard_only_s <= 1.0):
            raise ConfigError("min_speech_s and min_speech_guard_only_s must be within 0.1-1.0 s")
        if not 0.03 <= self.pause_pass_s < self.hangover_s:
            raise ConfigError("pause_pass_s must be within 0.03 s and the hang-over")
        if not 0.1 <= self.interim_interval_s <= 5.0:
            raise ConfigError("interim_interval_s must be within 0.1-5 s")
        if not self.pause_pass_s <= self.fast_hangover_s <= self.hangover_s:
            raise ConfigError("need pause_pass_s <= fast_hangover_s <= hangover_s")

    def vad_min_speech_s(self, canceller: bool) -> float:
        """How long speech must last to count, with or without the echo canceller on the input."""
        return self.min_speech_s if canceller else self.min_speech_guard_only_s

    def handover_silence_s(self, end_of_turn_prob: float | None) -> float:
        """Silence after the end of speech before a speculatively prepared answer is released."""
        if end_of_turn_prob is not None and self.semantic and end_of_turn_prob >= self.complete_prob:
            return self.fast_hangover_s
        return self.hangover_s + self.extra_wait_s(end_of_turn_prob)

    def extra_wait_s(self, end_of_turn_prob: float | None) -> float:
        """Silence to wait beyond the VAD hang-over before answering."""
        if not self.semantic or end_of_turn_prob is None:
            return 0.0
        p = max(end_of_turn_prob, 1e-9)
        if p >= self.complete_prob:
            return 0.0
        if p <= self.incomplete_prob:
            return self.max_extra_wait_s
        lo, hi = math.log(self.incomplete_prob), math.log(self.complete_prob)
        return self.max_extra_wait_s * (hi - math.log(p)) / (hi - lo)


@dataclass(frozen=True)
class CallSettings:
    """Call-center behaviour: prompting a silent caller, transfer and hold, recording."""

    idle_prompt_s: float = field(default=0.0, metadata={"help": "prompt a caller who says nothing this long while "
                                 "the agent listens (0: off)"})
    idle_prompt: str = field(default="Are you still there?", metadata={"help": "what the agent asks a silent caller"})
    idle_max_prompts: int = field(default=2, metadata={"help": "unanswered prompts before the agent says goodbye "
                                  "and ends the session"})
    idle_goodbye: str = field(default="It seems you have stepped away. Goodbye!",
                              metadata={"help": "said before ending a session for silence"})
    transfer_line: str = field(default="Please hold while I transfer you.",
                               metadata={"help": "said when a transfer is requested, before the hold audio"})
    transfer_targets: tuple[str, ...] = field(default=(), metadata={
        "flag": "--transfer-target", "metavar": "TARGET", "help": "where calls may be transferred (repeatable); "
        "given any, the LLM gets a transfer_call tool with these as choices"})
    hold_after_s: float = field(default=1.0, metadata={"help": "hold audio plays while a tool call runs longer "
                                "than this (0: never)"})
    record_dir: str = field(default="", metadata={
        "flag": "--record", "env": "REJOINDER_RECORD_DIR", "metavar": "DIR",
        "help": "record each session here: stereo WAV (caller left, agent right) + JSON transcript"})
    record_max_files: int = field(default=1000, metadata={"help": "keep at most this many recordings (oldest go)"})
    record_max_days: float = field(default=30.0, metadata={"help": "delete recordings older than this many days"})
    mcp_servers: tuple[str, ...] = field(default=(), metadata={
        "flag": "--mcp-server", "metavar": "SERVER", "split": split_mcp_servers,
        "help": "give the LLM the tools of this Model Context Protocol server (repeatable): "
        "'stdio:<command line>' or an 'http(s)://…/mcp' URL, optionally 'NAME=' before it"})
    mcp_timeout_s: float = field(default=10.0, metadata={"help": "longest wait for one MCP tool call"})
    mcp_connect_timeout_s: float = field(default=30.0, metadata={
        "help": "longest wait for an MCP server to start and list its tools"})

    def __post_init__(self) -> None:
        if self.idle_prompt_s < 0 or self.idle_max_prompts < 0 or self.hold_after_s < 0:
            raise ConfigError("idle_prompt_s, idle_max_prompts and hold_after_s must be >= 0")
        if self.record_max_files < 1 or self.record_max_days <= 0:
            raise ConfigError("record_max_files must be >= 1 and record_max_days > 0")
        if self.mcp_timeout_s <= 0 or self.mcp_connect_timeout_s <= 0:
            raise ConfigError("--mcp-timeout-s and --mcp-connect-timeout-s must be > 0")
        mcp_server_entries(self.mcp_servers)  # a bad entry fails here, named

    @property
    def mcp(self) -> tuple[MCPServerEntry, ...]:
        """The configured MCP servers, parsed (agent.mcp_tools connects to them)."""
        return mcp_server_entries(self.mcp_servers)


@dataclass(frozen=True)
class TelemetrySettings:
    """Metrics and traces for operators (Prometheus at /metrics; OpenTelemetry traces when asked)."""

    otlp_endpoint: str = field(default="", metadata={
        "help": "send a trace per turn (a span per stage) to this OTLP/HTTP endpoint, e.g. "
        "http://127.0.0.1:4318/v1/traces (default: no traces)"})
    metrics_port: int = field(default=0, metadata={
        "help": "`rejoinder livekit`: serve Prometheus metrics on this port (0: off; `serve` has /metrics)"})
    metrics_host: str = field(default="127.0.0.1", metadata={"help": "address the metrics port binds"})

    def __post_init__(self) -> None:
        if not 0 <= self.metrics_port < 65536:
            raise ConfigError(f"--metrics-port {self.metrics_port} is not a TCP port")


@dataclass(frozen=True)
class MQTTSettings:
    """Where to publish events and take control commands (empty url: MQTT off)."""

    url: str = field(default="", metadata={"flag": "--mqtt", "env": "REJOINDER_MQTT_URL", "help":
                     "publish events and take control commands on this broker: mqtt://[user:pass@]host:port or "
                     "mqtts://…"})
    agent_id: str = field(default="", metadata={"env": "REJOINDER_AGENT_ID",
                          "help": "this agent's id in MQTT topics (default: host name)"})
    ca_file: str = field(default="", metadata={"flag": "--mqtt-ca-file", "env": "REJOINDER_MQTT_CA_FILE",
                         "help": "TLS: trust this CA certificate"})
    username: str = field(default="", metadata={"flag": None, "env": "REJOINDER_MQTT_USERNAME"})
    password: str = field(default="", metadata={"flag": None, "env": "REJOINDER_MQTT_PASSWORD"})
    insecure: bool = field(default=False, metadata={"flag": None, "env": "REJOINDER_MQTT_INSECURE"})


@dataclass(frozen=True)
class LiveKitSettings:
    """The LiveKit server a `rejoinder livekit` worker registers with (livekit-agents' own variables)."""

    url: str = field(default="", metadata={"flag": "--url", "env": "LIVEKIT_URL",
                     "help": "LiveKit server URL (dev default ws://localhost:7880)"})
    api_key: str = field(default="", metadata={"flag": "--api-key", "env": "LIVEKIT_API_KEY", "help": "API key"})
    api_secret: str = field(default="", metadata={"flag": "--api-secret", "env": "LIVEKIT_API_SECRET",
                            "help": "API secret"})
    agent_name: str = field(default="", metadata={"flag": "--agent-name", "env": "LIVEKIT_AGENT_NAME",
                            "help": "explicit-dispatch name (empty: join every new room)"})
    log_level: str = field(default="", metadata={"flag": "--log-level", "env": None,
                           "choices": ("", "DEBUG", "INFO", "WARNING", "ERROR"),
                           "help": "worker log level (default: DEBUG in dev, INFO in start)"})
    idle_processes: int = field(default=-1, metadata={"flag": "--idle-processes", "env": None,
                                "help": "job processes kept warm with the models loaded "
                                        "(default: 0 in dev, 1 in start)"})


@dataclass(frozen=True)
class AgentConfig:
    # models (empty: embedded default)
    llm_model: str = _f("", "GGUF file or HF safetensors folder")
    asr_model: str = _f("", "faster-whisper (CTranslate2) model folder")
    tts_model: str = _f("", "Piper voice .onnx (its .onnx.json beside it)")
    vad_model: str = _f("", "Silero VAD .onnx")
    # ASR: Whisper's encoder sees the audio plus a few seconds (2.6x faster, same accuracy: see
    # streaming/asr.py); True restores faster-whisper's fixed 30 s window.
    asr_full_window: bool = _f(False, "decode speech against Whisper's full 30 s window (slower; default: audio + 5 s)")
    language: str = _f("en", "language of the caller (ASR)")
    device: str = _f("cpu", "cpu or cuda[:N]")
    threads: int = _f(0, "CPU threads for the LLM (0: all cores)")
    llm_backend: str = _f("auto", "who runs decode steps (auto: native C step on CPU, Triton CUDA graph on GPU)",
                          choices=("auto", "native", "triton", "eager"))
    tts_threads: int = _f(0, "onnxruntime threads for Piper (0: every core with --synthesis-hold-s > 0, else half; "
                          "at most 4)")
    synthesis_hold_s: float = _f(0.5, "pause an answer's LLM decoding up to this long while Piper synthesises a "
                                 "piece of it: the two take turns on the CPU instead of sharing it (0: never)")
    kv_slots: int = _f(4, "sessions whose KV cache the engine keeps at once (LRU; each slot also decodes in one batch)")
    heap_trim_s: float = _f(30.0, "give the allocator's free memory back to the system after each call and "
                            "every this many seconds (0: never; agent.heap)", "serve")
    max_input_seconds: float = _f(120.0, "longest input audio accepted by `reply`")
    # conversation and generation
    persona: str = _f(DEFAULT_PERSONA, "system prompt", "generation")
    greeting: str = _f("Hi, I'm Rejoinder. How can I help?", "said when a live session starts", "generation",
                       flag=None)
    max_new_tokens: int = _f(120, "longest answer, in tokens", "generation")
    temperature: float = _f(0.0, "sampling temperature (0: greedy)", "generation")
    top_k: int = _f(0, "sample among the k most likely tokens (0: all)", "generation")
    top_p: float = _f(1.0, "nucleus sampling mass", "generation")
    seed: int | None = _f(None, "sampling seed", "generation")
    max_context: int = _f(2048, "context length of the engine, in tokens", "generation")
    # groups
    turns: TurnTakingConfig = field(default_factory=TurnTakingConfig, metadata={"group": "turns"})
    echo: EchoGuardConfig = field(default_factory=EchoGuardConfig, metadata={"group": "echo", "prefix": "echo_"})
    aec: AECConfig = field(default_factory=AECConfig, metadata={"group": "echo", "prefix": "aec_"})
    serve: ServeConfig = field(default_factory=ServeConfig, metadata={"group": "serve"})
    mqtt: MQTTSettings = field(default_factory=MQTTSettings, metadata={"group": "mqtt"})
    livekit: LiveKitSettings = field(default_factory=LiveKitSettings, metadata={"group": "livekit"})
    call: CallSettings = field(default_factory=CallSettings, metadata={"group": "call"})
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings, metadata={"group": "telemetry"})

    def __post_init__(self) -> None:
        if not 0.0 <= self.heap_trim_s < math.inf:
            raise ConfigError("--heap-trim-s (REJOINDER_HEAP_TRIM_S) must be >= 0 seconds (0: never trim)")
        if not 0.0 <= self.synthesis_hold_s <= 5.0:
            raise ConfigError("--synthesis-hold-s must be within 0-5 s (0: never hold)")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> AgentConfig:
        """Defaults, then REJOINDER_* environment variables, then explicit overrides (None: not given)."""
        return load(env, overrides)

    def replace(self, **changes: Any) -> AgentConfig:
        return dataclasses.replace(self, **changes)

    def sampling_params(self) -> SamplingParams:
        from rejoinder.engine import SamplingParams  # torch: not for `rejoinder --help`

        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=self.seed,
                              max_new_tokens=self.max_new_tokens)


# --- one description, walked for flags and values ------------------------------------------------------


@dataclass(frozen=True)
class _Setting:
    path: tuple[str, ...]  # ("threads",) or ("serve", "port")
    f: dataclasses.Field
    kind: Any  # the resolved type
    group: str
    flag: str | None
    env: str | None

    @property
    def dest(self) -> str:
        return "__".join(self.path)


def _settings() -> list[_Setting]:
    out: list[_Setting] = []
    hints = typing.get_type_hints(AgentConfig)
    for f in fields(AgentConfig):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            prefix = f.metadata.get("prefix", "")
            sub = typing.get_type_hints(kind)
            for g in fields(kind):
                if not g.init:
                    continue
                out.append(_setting((f.name, g.name), g, sub[g.name], f.metadata["group"], prefix + g.name))
        else:
            out.append(_setting((f.name,), f, kind, f.metadata["group"], f.name))
    return out


def _setting(path: tuple[str, ...], f: dataclasses.Field, kind: Any, group: str, name: str) -> _Setting:
    flag = f.metadata.get("flag", "--" + name.replace("_", "-"))
    env = f.metadata.get("env", "REJOINDER_" + name.upper())
    return _Setting(path, f, kind, group, flag, env)


def _base(kind: Any) -> Any:
    """int for `int | None`, the element type for `tuple[str, ...]`."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return _base(args[0])
    return kind


def _parse(s: _Setting, raw: str, source: str) -> Any:
    kind = _base(s.kind)
    try:
        if typing.get_origin(kind) is tuple:
            split = s.f.metadata.get("split")
            if split is not None:  # items with their own syntax (commas inside them, no slash stripping)
                return tuple(split(raw))
            return tuple(p.strip().rstrip("/") for p in raw.split(",") if p.strip())
        if kind is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if kind is Path:
            return Path(raw)
    except ValueError:
        raise ConfigError(f"{source}={raw!r} is not a valid {getattr(kind, '__name__', kind)}") from None
    choices = s.f.metadata.get("choices")
    if choices and raw not in choices:
        raise ConfigError(f"{source}={raw!r}: must be one of {', '.join(c for c in choices if c)}")
    return raw


def load(env: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None) -> AgentConfig:
    """The configuration: defaults < environment < `overrides` (flat field names or "group__field")."""
    env = os.environ if env is None else env
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    top: dict[str, Any] = {}
    groups: dict[str, dict[str, Any]] = {}
    for s in _settings():
        value: Any = None
        if s.dest in given:
            value = given.pop(s.dest)
        elif len(s.path) == 1 and s.path[0] in given:
            value = given.pop(s.path[0])
        elif s.env is not None and env.get(s.env, "") != "":
            value = _parse(s, env[s.env], s.env)
        if value is None:
            continue
        if len(s.path) == 1:
            top[s.path[0]] = value
        else:
            groups.setdefault(s.path[0], {})[s.path[1]] = value
    for name, value in given.items():  # whole groups given as objects (AgentConfig.from_env(turns=...))
        top[name] = value
    try:
        for name, values in groups.items():
            base = top.get(name) or AgentConfig.__dataclass_fields__[name].default_factory()  # type: ignore[misc]
            top[name] = dataclasses.replace(base, **values)
        return AgentConfig(**top)
    except TypeError as exc:
        raise ConfigError(f"unknown setting: {exc}") from None


def add_flags(parser: argparse.ArgumentParser, groups: Sequence[Group]) -> None:
    """Flags for every setting of `groups` (dest "field" or "group__field"; None when not given)."""
    titles = {"models": "models and devices", "generation": "generation", "turns": "turn-taking and barge-in",
              "echo": "echo guard and cancellation", "serve": "web server", "mqtt": "call-center events (MQTT)",
              "livekit": "LiveKit server", "call": "call center: idle prompts, transfer, hold, recording, MCP tools",
              "telemetry": "metrics and traces"}
    by_group: dict[str, argparse._ArgumentGroup] = {}
    for s in _settings():
        if s.group not in groups or s.flag is None:
            continue
        g = by_group.get(s.group)
        if g is None:
            g = by_group[s.group] = parser.add_argument_group(f"{titles[s.group]} (env REJOINDER_<NAME>)")
        help_ = s.f.metadata.get("help", "") + (f" (env {s.env})" if s.env else "")
        kind = _base(s.kind)
        kw: dict[str, Any] = {"dest": s.dest, "default": None, "help": help_ or None}
        if kind is bool:
            g.add_argument(s.flag, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(kind) is tuple:
            g.add_argument(s.flag, action="append", metavar=s.f.metadata.get("metavar"), **kw)
        else:
            choices = [c for c in s.f.metadata.get("choices", ()) if c] or None
            conv = {int: int, float: float, Path: Path}.get(kind, str)
            g.add_argument(s.flag, type=conv, choices=choices, metavar=s.f.metadata.get("metavar"), **kw)


def from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> AgentConfig:
    """The configuration for parsed `args` (flags generated by `add_flags`)."""
    values = {}
    for s in _settings():
        v = getattr(args, s.dest, None)
        if isinstance(v, list):  # repeatable flag: one item per flag
            own = s.f.metadata.get("split") is not None
            v = tuple(p.strip() if own else p.strip().rstrip("/") for p in v if p.strip())
        if v is not None:
            values[s.dest] = v
    return load(env, values)


def env_for(cfg: AgentConfig, groups: Sequence[Group]) -> dict[str, str]:
    """The environment that reproduces `cfg`'s settings of `groups` (for processes we start)."""
    out: dict[str, str] = {}
    defaults = AgentConfig()
    for s in _settings():
        if s.group not in groups or s.env is None:
            continue
        value: Any = cfg
        default: Any = defaults
        for name in s.path:
            value, default = getattr(value, name), getattr(default, name)
        if value == default or value is None:
            continue
        if isinstance(value, bool):
            out[s.env] = "1" if value else "0"
        elif isinstance(value, tuple):
            out[s.env] = ",".join(value)
        else:
            out[s.env] = str(value)
    return out
