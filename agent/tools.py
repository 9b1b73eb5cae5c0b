"""Function calling: Python callables the LLM may ask for, in the Hermes/Qwen `<tool_call>` format.

The model is told about the tools in its system prompt and calls one by answering with
`<tool_call>{"name": "...", "arguments": {...}}</tool_call>` — the format SmolLM2, Qwen2.5 and Hermes
models are trained on. The session keeps such text out of the speech, runs the tool, puts the call
and its result into history, and lets the model answer again with the result in view.

The embedded SmolLM2-135M is too small to decide on a call by itself (measured: it ignores the tool
instructions), so a call can also be *forced* for the next answer (`tool_choice`, as in the OpenAI
and livekit-agents APIs): the answer is made to begin with the call, and the model's own output takes
over from there (arguments, then the spoken follow-up).
"""
from __future__ import annotations

import asyncio
import inspect
import json
import re
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

TOOL_OPEN = "<tool_call>"
TOOL_CLOSE = "</tool_call>"

__all__ = ["Tool", "ToolCall", "ToolCallFilter", "ToolRegistry", "TOOL_CLOSE", "TOOL_OPEN", "parse_tool_call"]


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    fn: Callable[..., Any | Awaitable[Any]]
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    ends_call: bool = False  # the session hangs up once the follow-up answer has been spoken

    def schema(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "parameters": self.parameters}

    @property
    def takes_arguments(self) -> bool:
        return bool(self.parameters.get("properties"))


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]

    def text(self) -> str:
        return f"{TOOL_OPEN}{json.dumps({'name': self.name, 'arguments': self.arguments})}{TOOL_CLOSE}"


class ToolError(Exception):
    pass


class ToolRegistry:
    def __init__(self, tools: list[Tool] | None = None) -> None:
        self.tools: dict[str, Tool] = {}
        for t in tools or []:
            self.add(t)

    def add(self, tool: Tool) -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", tool.name):
            raise ValueError(f"tool name {tool.name!r} is not an identifier")
        self.tools[tool.name] = tool

    def __bool__(self) -> bool:
        return bool(self.tools)

    def __contains__(self, name: str) -> bool:
        return name in self.tools

    def system_prompt(self) -> str:
        if not self.tools:
            return ""
        specs = "\n".join(json.dumps(t.schema()) for t in self.tools.values())
        return (
            "You can call these functions:\n" + specs + "\nTo call one, answer with only "
            f'{TOOL_OPEN}{{"name": <function name>, "arguments": <arguments object>}}{TOOL_CLOSE}'
        )

    def forced_prefix(self, name: str) -> str:
        """The start of an answer that calls `name`: the whole call when it takes no arguments."""
        tool = self.tools[name]
        if not tool.takes_arguments:
            return ToolCall(name, {}).text()
        return f'{TOOL_OPEN}{{"name": "{name}", "arguments": '

    async def run(self, call: ToolCall) -> Any:
        tool = self.tools.get(call.name)
        if tool is None:
            raise ToolError(f"unknown tool {call.name!r}")
        try:
            result = tool.fn(**call.arguments)
            if inspect.isawaitable(result):
                result = await result
        except TypeError as exc:
            raise ToolError(f"bad arguments for {call.name}: {exc}") from None
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a failing tool is reported to the model, not fatal to the session
            raise ToolError(f"{call.name} failed: {type(exc).__name__}: {exc}") from None
        return result


def parse_tool_call(text: str) -> ToolCall | None:
    """The call in `text` (`<tool_call>{json}</tool_call>`; a missing close tag is tolerated), or None."""
    start = text.find(TOOL_OPEN)
    if start < 0:
        return None
    body = text[start + len(TOOL_OPEN) :]
    end = body.find(TOOL_CLOSE)
    body = body[:end] if end >= 0 else body
    obj = _loads_lenient(body.strip())
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", {})
    if isinstance(args, str):
        args = _loads_lenient(args)
    return ToolCall(obj["name"], args if isinstance(args, dict) else {})


def _loads_lenient(s: str) -> Any:
    """json.loads, retrying with unbalanced closing braces added (small models stop early)."""
    for extra in range(0, 3):
        try:
            return json.loads(s + "}" * extra)
        except json.JSONDecodeError:
            continue
    return None


class ToolCallFilter:
    """Splits an answer's text stream into speech and a tool call.

    Text that begins (after whitespace) with `<tool_call>` is held back until the call is complete;
    anything else passes through untouched as soon as it can no longer be the start of a call.
    """

    def __init__(self) -> None:
        self._held = ""
        self._mode = "undecided"  # "speech" | "call" | "undecided"
        self.call_text = ""

    def push(self, delta: str) -> str:
        """Speakable text released by this delta."""
        if self._mode == "speech":
            return delta
        self._held += delta
        stripped = self._held.lstrip()
        if self._mode == "undecided":
            if stripped.startswith(TOOL_OPEN):
                self._mode = "call"
            elif TOOL_OPEN.startswith(stripped):
                return ""  # still ambiguous ("<tool" …)
            else:
                self._mode = "speech"
                out, self._held = self._held, ""
                return out
        if self._mode == "call":
            self.call_text = stripped
        return ""

    def finish(self) -> str:
        """End of the stream: any text still held that is not a call."""
        if self._mode == "undecided":
            out, self._held = self._held, ""
            return out
        return ""

    @property
    def call_complete(self) -> bool:
        return self._mode == "call" and TOOL_CLOSE in self.call_text

    def call(self) -> ToolCall | None:
        return parse_tool_call(self.call_text) if self._mode == "call" else None
