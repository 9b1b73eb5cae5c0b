"""Function calling: which Python callables the LLM may ask for, and running them.

The model is told about the tools in its system prompt and calls one by answering with a
`<tool_call>` block — the Hermes/Qwen format SmolLM2, Qwen2.5 and Hermes models are trained on;
how that text is written, parsed and kept out of the speech is `rejoinder.engine.tool_format`
(shared with the LiveKit LLM plugin). The session keeps such text out of the speech, runs the tool,
puts the call and its result into history, and lets the model answer again with the result in view.

The embedded SmolLM2-135M is too small to decide on a call by itself (measured: it ignores the tool
instructions), so a call can also be *forced* for the next answer (`tool_choice`, as in the OpenAI
and livekit-agents APIs): the answer is made to begin with the call, and the model's own output takes
over from there (arguments, then the spoken follow-up).
"""
from __future__ import annotations

import asyncio
import inspect
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from rejoinder.engine.tool_format import (
    TOOL_CLOSE,
    TOOL_OPEN,
    ToolCall,
    ToolCallFilter,
    parse_tool_call,
    tools_prompt,
)

__all__ = ["Tool", "ToolCall", "ToolCallFilter", "ToolError", "ToolRegistry", "TOOL_CLOSE", "TOOL_OPEN",
           "parse_tool_call"]


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


class ToolError(Exception):
    """A call that could not run (unknown tool, bad arguments, the tool raised): told to the model."""


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
        """The tools section of the system prompt ("" without tools)."""
        return tools_prompt([t.schema() for t in self.tools.values()])

    async def run(self, call: ToolCall) -> Any:
        tool = self.tools.get(call.name)
        if tool is None:
            raise ToolError(f"unknown tool {call.name!r}")
        try:
            result = tool.fn(**call.arguments)
            if inspect.isawaitable(result):
                result = await result
        except ToolError:
            raise  # already written for the model (e.g. an MCP server's timeout, agent.mcp_tools)
        except TypeError as exc:
            raise ToolError(f"bad arguments for {call.name}: {exc}") from None
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a failing tool is reported to the model, not fatal to the session
            raise ToolError(f"{call.name} failed: {type(exc).__name__}: {exc}") from None
        return result


def transfer_tool(targets: tuple[str, ...] | list[str], transfer: Callable[..., Any]) -> Tool:
    """The `transfer_call` tool the LLM gets when transfers are configured (`--transfer-target`).

    `transfer(target, reason=..., by="llm")` is the session's; the model's follow-up answer tells the
    caller, then the call goes on hold until someone takes it over.
    """
    choices = list(dict.fromkeys(targets))

    def transfer_call(target: str, reason: str = "") -> str:
        if target not in choices:
            raise ValueError(f"unknown target {target!r}; one of {', '.join(choices)}")
        return transfer(target, reason=reason, by="llm")

    return Tool(
        "transfer_call",
        "Transfer the caller to a person or department when they ask for one or you cannot help.",
        transfer_call,
        {"type": "object", "properties": {"target": {"type": "string", "enum": choices},
                                          "reason": {"type": "string"}},
         "required": ["target"]},
    )
