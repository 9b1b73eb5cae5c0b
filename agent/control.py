"""Which commands can be sent from outside, by whom? One table, typed arguments, one validation.

Every remote command is declared once here: its name, its arguments (type, required, choices,
length cap), and the channels that may use it. The MQTT bridge, the WebRTC data channel and the
LiveKit data topic all parse with `parse_command(payload, channel)` and run with `dispatch()`, which
calls the typed `Session` methods; what they answer is a JSON-ready dict, `{"ok": true, ...}` or
`{"ok": false, "error": "..."}`. A command that is malformed, unknown, not allowed on its channel or
given bad arguments is refused with a reason and changes nothing.

Channels:
  "mqtt"          the operator's channel (call-center supervisors, dashboards)
  "data_channel"  the caller's own browser page (WebRTC); no operator powers
  "livekit"       the `rejoinder.control` data topic of a LiveKit room
  "local"         in-process callers (tests, embedding applications): everything
"""
from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from rejoinder.errors import ControlError

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger("rejoinder.agent.control")

__all__ = [
    "CHANNELS",
    "COMMANDS",
    "Arg",
    "Channel",
    "Command",
    "CommandRefused",
    "ControlCommand",
    "ControlError",
    "commands_for",
    "control_json_schema",
    "dispatch",
    "parse_command",
    "run_command",
]

Channel = Literal["mqtt", "data_channel", "livekit", "local"]
CHANNELS: tuple[Channel, ...] = ("mqtt", "data_channel", "livekit", "local")
MAX_CONTROL_BYTES = 64 * 1024


@dataclass(frozen=True)
class Arg:
    """One argument of a command."""

    kind: Literal["string", "object"] = "string"
    required: bool = False
    choices: tuple[str, ...] | None = None
    default: str | None = None
    non_empty: bool = False
    max_len: int = 2000  # characters of a string, or of an object's JSON


Runner = Callable[["Session", dict[str, Any]], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    args: dict[str, Arg]
    channels: frozenset[Channel]
    run: Runner


async def _say(s: Session, a: dict[str, Any]) -> dict[str, Any]:
    s.say(a["text"], mode=a["mode"])
    return {}


async def _interrupt(s: Session, a: dict[str, Any]) -> dict[str, Any]:
    s.interrupt()
    return {}


async def _end(s: Session, a: dict[str, Any]) -> dict[str, Any]:
    await s.end(a.get("reason") or "ended by control")
    return {}


async def _mute(s: Session, a: dict[str, Any]) -> dict[str, Any]:
    s.mute()
    return {"muted": s.muted}


async def _unmute(s: Session, a: dict[str, Any]) -> dict[str, Any]:
    s.unmute()
    return {"muted": s.muted}


async def _set_persona(s: Session, a: dict[str, Any]) -> dict[str, Any]:
    s.set_persona(a["persona"])
    return {}


async def _tool(s: Session, a: dict[str, Any]) -> dict[str, Any]:
    return {"result": await s.run_tool(a["name"], a.get("arguments") or {})}


async def _force_tool(s: Session, a: dict[str, Any]) -> dict[str, Any]:
    s.force_tool(a["name"])
    return {}


async def _status(s: Session, a: dict[str, Any]) -> dict[str, Any]:
    return dict(s.status())


async def _user_text(s: Session, a: dict[str, Any]) -> dict[str, Any]:
    s.user_text(a["text"])
    return {}


async def _hold(s: Session, a: dict[str, Any]) -> dict[str, Any]:
    s.hold(a.get("reason") or "operator")
    return {"on_hold": True}


async def _resume(s: Session, a: dict[str, Any]) -> dict[str, Any]:
    s.resume()
    return {"on_hold": False}


async def _transfer(s: Session, a: dict[str, Any]) -> dict[str, Any]:
    s.transfer(a["target"], a.get("reason", ""), by="operator")
    return {"target": a["target"]}


_EVERYWHERE: frozenset[Channel] = frozenset(CHANNELS)
_OPERATOR: frozenset[Channel] = frozenset({"mqtt", "livekit", "local"})
_LOCAL: frozenset[Channel] = frozenset({"local"})

COMMANDS: dict[str, Command] = {c.name: c for c in (
    Command("say", "speak text now (no LLM), cutting the agent off (interrupt) or after what it says (queue)",
            {"text": Arg(required=True, non_empty=True, max_len=2000),
             "mode": Arg(choices=("interrupt", "queue"), default="interrupt")}, _EVERYWHERE, _say),
    Command("interrupt", "stop speaking, as a barge-in would", {}, _EVERYWHERE, _interrupt),
    Command("end", "hang up: the session ends cleanly", {"reason": Arg(max_len=500)}, _EVERYWHERE, _end),
    Command("mute", "stop acting on the caller's audio (a supervisor talks)", {}, _EVERYWHERE, _mute),
    Command("unmute", "act on the caller's audio again", {}, _EVERYWHERE, _unmute),
    Command("set_persona", "replace the system prompt from the next answer on",
            {"persona": Arg(required=True, non_empty=True, max_len=8000)}, _OPERATOR, _set_persona),
    Command("tool", "run a registered tool now",
            {"name": Arg(required=True, non_empty=True, max_len=200),
             "arguments": Arg(kind="object", max_len=8000)}, _LOCAL, _tool),
    Command("force_tool", "make the next answer call this tool",
            {"name": Arg(required=True, non_empty=True, max_len=200)}, _LOCAL, _force_tool),
    Command("status", "the session's state, turn count, mute and hold", {}, _EVERYWHERE, _status),
    Command("user_text", "a typed message from the caller: answered like a spoken turn",
            {"text": Arg(required=True, non_empty=True, max_len=2000)}, _EVERYWHERE, _user_text),
    Command("hold", "put the caller on hold (hold audio; their audio is not acted on)",
            {"reason": Arg(max_len=200)}, _OPERATOR, _hold),
    Command("resume", "take the caller off hold", {}, _OPERATOR, _resume),
    Command("transfer", "say the transfer line, put the caller on hold and emit transfer_requested",
            {"target": Arg(required=True, non_empty=True, max_len=200), "reason": Arg(max_len=500)},
            _OPERATOR, _transfer),
)}


def commands_for(channel: Channel) -> list[str]:
    return [name for name, c in COMMANDS.items() if channel in c.channels]


@dataclass(frozen=True)
class ControlCommand:
    command: str
    args: dict[str, Any]
    id: str | int | None = None


class CommandRefused(ControlError):
    """A control message refused before it reached the session, with what could be read of it."""

    def __init__(self, message: str, id: str | int | None = None, command: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.id = id  # the correlation id, when readable
        self.command = command


def _error(message: str, cid: str | int | None = None, command: str | None = None) -> CommandRefused:
    return CommandRefused(message, cid, command)


def parse_command(payload: bytes | bytearray | str | Mapping[str, Any] | None, channel: Channel,
                  *, extra_fields: frozenset[str] = frozenset()) -> ControlCommand:
    """Validate one control message `{"command", "args"?, "id"?}`; raises CommandRefused with the reason.

    Strict on purpose: unknown fields and arguments are refused rather than ignored, so a typo
    ("txt") is reported instead of silently doing something else. `extra_fields` names fields a
    channel's envelope adds (the data channel's "type"). The error carries `id` and `command` when
    they could be read, so the refusal can be correlated.
    """
    if isinstance(payload, Mapping):
        msg: Any = dict(payload)
    else:
        if payload is None or (isinstance(payload, (bytes, bytearray, str)) and not payload):
            raise _error("empty payload")
        raw = payload if isinstance(payload, (bytes, bytearray)) else str(payload).encode()
        if len(raw) > MAX_CONTROL_BYTES:
            raise _error(f"payload larger than {MAX_CONTROL_BYTES} bytes")
        try:
            # UTF-8 only (RFC 8259), a BOM tolerated: json.loads on bytes would also guess UTF-16/32.
            text = bytes(raw).decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise _error(f"invalid JSON: not UTF-8 text (byte {exc.start} is {raw[exc.start]:#04x})") from None
        try:
            msg = json.loads(text)
        except ValueError as exc:
            raise _error(f"invalid JSON: {exc}") from None
        except RecursionError:  # "[[[[..." within the size limit: the decoder's stack, not ours
            raise _error("invalid JSON: nested too deeply") from None
    if not isinstance(msg, dict):
        raise _error("payload must be a JSON object")
    cid = msg.get("id")
    if cid is not None and (isinstance(cid, bool) or not isinstance(cid, (str, int)) or len(str(cid)) > 200):
        raise _error("id must be a string or integer of at most 200 characters")
    command = msg.get("command")
    if not isinstance(command, str) or not command:
        raise _error("missing command", cid)
    extra = set(msg) - {"command", "args", "id"} - set(extra_fields)
    if extra:
        raise _error(f"unknown field(s): {', '.join(sorted(extra))}", cid, command)
    spec = COMMANDS.get(command)
    allowed = commands_for(channel)
    if spec is None:
        raise _error(f"unknown command {command!r} (known: {', '.join(allowed)})", cid, command)
    if channel not in spec.channels:
        raise _error(f"command {command!r} is not allowed here", cid, command)
    args = msg.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise _error("args must be a JSON object", cid, command)
    unknown = set(args) - set(spec.args)
    if unknown:
        raise _error(f"{command}: unknown argument(s): {', '.join(sorted(unknown))}", cid, command)
    out: dict[str, Any] = {}
    for name, a in spec.args.items():
        if name not in args:
            if a.required:
                raise _error(f"{command}: missing argument {name!r}", cid, command)
            if a.default is not None:
                out[name] = a.default
            continue
        out[name] = _check_arg(command, name, a, args[name], cid)
    return ControlCommand(command, out, cid)


def _check_arg(command: str, name: str, a: Arg, v: Any, cid: str | int | None) -> Any:
    if a.kind == "object":
        if not isinstance(v, dict):
            raise _error(f"{command}: {name} must be a JSON object", cid, command)
        if len(json.dumps(v, default=str)) > a.max_len:
            raise _error(f"{command}: {name} larger than {a.max_len} characters", cid, command)
        return v
    if not isinstance(v, str):
        raise _error(f"{command}: {name} must be a string", cid, command)
    if a.non_empty and not v.strip():
        raise _error(f"{command}: {name} must not be empty", cid, command)
    if len(v) > a.max_len:
        raise _error(f"{command}: {name} longer than {a.max_len} characters", cid, command)
    if a.choices is not None and v not in a.choices:
        raise _error(f"{command}: {name} must be one of {', '.join(a.choices)}", cid, command)
    return v.strip() if a.non_empty else v


async def dispatch(session: Session, cmd: ControlCommand) -> dict[str, Any]:
    """Run a validated command on `session`: {"ok": True, ...} or {"ok": False, "error": ...}.

    Never raises for what the command does: a refused or failing command must not take the session down.
    """
    try:
        result = await COMMANDS[cmd.command].run(session, cmd.args)
    except ControlError as exc:
        return {"ok": False, "error": str(exc)}
    except Exception as exc:  # noqa: BLE001
        log.exception("control %s failed", cmd.command)
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"ok": True, **result}


async def run_command(session: Session, command: str, args: Mapping[str, Any] | None = None,
                      channel: Channel = "local") -> dict[str, Any]:
    """Validate and run one command given as name + args (the in-process form)."""
    try:
        cmd = parse_command({"command": command, "args": dict(args or {})}, channel)
    except ControlError as exc:
        return {"ok": False, "error": str(exc)}
    return await dispatch(session, cmd)


def control_json_schema(channel: Channel = "mqtt") -> dict[str, Any]:
    """The commands of `channel` as a JSON Schema, for the systems that send them (documentation)."""
    variants = []
    for name in commands_for(channel):
        spec = COMMANDS[name]
        props: dict[str, Any] = {}
        for arg, a in spec.args.items():
            p: dict[str, Any] = {"type": "object"} if a.kind == "object" else {"type": "string", "maxLength": a.max_len}
            if a.non_empty:
                p["minLength"] = 1
            if a.choices:
                p["enum"] = list(a.choices)
            if a.default is not None:
                p["default"] = a.default
            props[arg] = p
        variants.append({
            "type": "object",
            "description": spec.help,
            "properties": {
                "command": {"const": name},
                "id": {"type": ["string", "integer"]},
                "args": {"type": "object", "properties": props, "additionalProperties": False,
                         "required": [k for k, a in spec.args.items() if a.required]},
            },
            "required": ["command"],
            "additionalProperties": False,
        })
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "rejoinder control command",
            "oneOf": variants}
