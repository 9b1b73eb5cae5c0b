"""How does a model write a tool call? The Hermes/Qwen `<tool_call>` format, in one place.

Models tuned for function calling (Qwen2.5, Hermes, SmolLM2, Llama 3.x prompted this way) are shown
the tools in their system prompt and call one by writing

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

This module is everything about that text, for Rejoinder's own session (`rejoinder.agent.tools`) and
for the livekit-agents LLM plugin (`livekit.plugins.rejoinder.llm`) alike:

- `tools_prompt`: the system-prompt section that lists the tools, in Qwen2.5's / Hermes' own wording
  (a tool-tuned model recognises it);
- `parse_tool_calls` / `parse_tool_call`: the calls in a finished answer (one set of rules, forgiving
  where small models slip: missing closing braces, an unclosed block, double-encoded arguments,
  `parameters` for `arguments`);
- `ToolCallFilter`: the streaming hold-back: text is released as soon as it can no longer be the
  start of a call, markup never;
- `forced_prefix` / `forced_argument`: the text an answer is pre-filled with when a call is forced
  (`tool_choice`), so even a model that ignores tool instructions writes a well-formed call;
- `format_call` (and `ToolCall.text()`): a call as it goes back into the history.

It knows nothing of tool execution (that is `rejoinder.agent.tools`) nor of any framework's types.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "TOOL_CLOSE",
    "TOOL_OPEN",
    "ToolCall",
    "ToolCallFilter",
    "format_call",
    "forced_argument",
    "forced_prefix",
    "held_back",
    "parse_tool_call",
    "parse_tool_calls",
    "tools_prompt",
]

TOOL_OPEN = "<tool_call>"
TOOL_CLOSE = "</tool_call>"


@dataclass(frozen=True)
class ToolCall:
    """One call as the model wrote it: a function name and its arguments (a JSON object)."""

    name: str
    arguments: dict[str, Any]

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)

    def text(self) -> str:
        """The call as the model writes it (and as it goes back into the history)."""
        return format_call(self.name, self.arguments)


# --- the prompt -----------------------------------------------------------------------------------


def tools_prompt(schemas: Sequence[Mapping[str, Any]]) -> str:
    """The system-prompt section listing `schemas`, in Qwen2.5's / Hermes' own wording ("" if none).

    A schema is an OpenAI-style tool (`{"type": "function", "function": {...}}`) or a bare function
    (`{"name", "description", "parameters"}`), which is wrapped as one: that is how Qwen's chat
    template lists tools, so a model tuned on it sees what it was trained on.
    """
    if not schemas:
        return ""
    tools = [s if "function" in s else {"type": "function", "function": dict(s)} for s in schemas]
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{listing}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        f"{TOOL_OPEN}{TOOL_CLOSE} XML tags:\n{TOOL_OPEN}\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n' + TOOL_CLOSE
    )


# --- writing a call -------------------------------------------------------------------------------


def format_call(name: str, arguments: str | Mapping[str, Any]) -> str:
    """A call as a `<tool_call>` block. Arguments given as JSON text that does not parse are kept
    verbatim (as a string): the model should see what it wrote."""
    if isinstance(arguments, str):
        try:
            args: Any = json.loads(arguments)
        except json.JSONDecodeError:
            args = arguments
    else:
        args = dict(arguments)
    return f"{TOOL_OPEN}\n{json.dumps({'name': name, 'arguments': args}, ensure_ascii=False)}\n{TOOL_CLOSE}"


def forced_prefix(name: str | None = None, *, with_arguments: bool = True) -> str:
    """The text a forced call's answer is pre-filled with; the model continues it.

    - `name=None`: up to the opening quote of the name (the model picks the function);
    - a name: up to the arguments object, which the model (or a schema-guided caller, adding `{`
      and `forced_argument` per key) writes;
    - a name and `with_arguments=False` (a tool that takes none): the whole call.

    `forced_prefix(None) + name + rest == forced_prefix(name)` for identifier names, so a caller can
    let the model write the name first and then continue from the full prefix.
    """
    if name is None:
        return TOOL_OPEN + '\n{"name": "'
    if not with_arguments:
        return format_call(name, {})
    return f'{TOOL_OPEN}\n{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": '


def forced_argument(key: str, index: int) -> str:
    """The text before the value of the `index`-th argument inside a pre-filled arguments object."""
    return (", " if index else "") + json.dumps(key, ensure_ascii=False) + ": "


# --- reading calls --------------------------------------------------------------------------------


def parse_tool_calls(text: str, *, keep_broken: bool = True) -> tuple[str, list[ToolCall]]:
    """Split model output into (plain text, calls) for its `<tool_call>` blocks.

    A block that does not hold a valid call stays in the plain text when `keep_broken` (the reader
    should see what the model said) and is dropped otherwise (markup must never be spoken). An
    unclosed block at the end counts when its JSON is complete (or short of closing braces only):
    generation may stop right after the object.
    """
    plain: list[str] = []
    calls: list[ToolCall] = []
    pos = 0
    while True:
        start = text.find(TOOL_OPEN, pos)
        if start < 0:
            plain.append(text[pos:])
            break
        plain.append(text[pos:start])
        body_start = start + len(TOOL_OPEN)
        end = text.find(TOOL_CLOSE, body_start)
        stop = end if end >= 0 else len(text)
        call = _parse_call_body(text[body_start:stop])
        if call is not None:
            calls.append(call)
        elif keep_broken:
            plain.append(text[start : end + len(TOOL_CLOSE) if end >= 0 else len(text)])
        if end < 0:
            break
        pos = end + len(TOOL_CLOSE)
    return "".join(plain), calls


def parse_tool_call(text: str) -> ToolCall | None:
    """The first valid call in `text`, or None."""
    calls = parse_tool_calls(text)[1]
    return calls[0] if calls else None


def _parse_call_body(body: str) -> ToolCall | None:
    obj = _decode_object(body.strip())
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models double-encode
        args = _decode_object(args.strip())
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], args)


def _decode_object(s: str) -> Any:
    """The JSON value `s` starts with; retried with up to two closing braces added (small models stop
    early). None if there is none."""
    decoder = json.JSONDecoder()
    for extra in range(3):
        try:
            return decoder.raw_decode(s + "}" * extra)[0]
        except json.JSONDecodeError:
            continue
    return None


# --- streaming ------------------------------------------------------------------------------------


def held_back(text: str) -> int:
    """Length of the tail of `text` that could be the start of `<tool_call>` (not safe to release yet)."""
    for n in range(min(len(text), len(TOOL_OPEN) - 1), 0, -1):
        if TOOL_OPEN.startswith(text[-n:]):
            return n
    return 0


class ToolCallFilter:
    """Splits an answer's text stream into plain text (released as it comes) and tool calls (held).

    `push(delta)` returns the text that is now safe to show or speak: everything up to a possible
    start of `<tool_call>` (and the whitespace just before it). From the first `<tool_call>` on,
    everything is held: `call_complete` says when a block has closed (a caller that wants one call
    can stop generating there), `calls()` / `call()` parse what was held, and `finish()` releases
    what was not a call (text after the calls; with `keep_broken`, blocks that hold no valid call).
    """

    def __init__(self, *, keep_broken: bool = False) -> None:
        self.keep_broken = keep_broken
        self._text = ""
        self._sent = 0  # text[:sent] has been released
        self._opened = -1  # index of the first TOOL_OPEN, once seen

    def push(self, delta: str) -> str:
        """Text released by this delta (often "", never markup)."""
        self._text += delta
        if self._opened >= 0:
            return ""
        start = self._text.find(TOOL_OPEN, self._sent)
        if start >= 0:
            self._opened = safe = start
        else:
            safe = len(self._text) - held_back(self._text)
        if safe < len(self._text):  # something is held: the whitespace before it waits with it
            safe = max(self._sent, len(self._text[:safe].rstrip()))
        if safe <= self._sent:
            return ""
        out, self._sent = self._text[self._sent : safe], safe
        return out

    @property
    def held(self) -> str:
        """Text pushed but not released."""
        return self._text[self._sent :]

    @property
    def opened(self) -> bool:
        """A `<tool_call>` block has started."""
        return self._opened >= 0

    @property
    def call_complete(self) -> bool:
        """A `<tool_call>` block has been closed."""
        return self._opened >= 0 and TOOL_CLOSE in self._text[self._opened :]

    def calls(self) -> list[ToolCall]:
        return parse_tool_calls(self._text[self._opened :])[1] if self._opened >= 0 else []

    def call(self) -> ToolCall | None:
        calls = self.calls()
        return calls[0] if calls else None

    def finish(self) -> str:
        """End of the stream: the held text that is not a call ("" when only whitespace is left)."""
        rest = parse_tool_calls(self.held, keep_broken=self.keep_broken)[0] if self._opened >= 0 else self.held
        self._sent = len(self._text)
        return rest if rest.strip() else ""
