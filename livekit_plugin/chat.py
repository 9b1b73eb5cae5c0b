"""How does a livekit `ChatContext` become our engine's prompt? Messages, tool section, template, fit.

`chat_messages` turns the framework's chat context into role/content messages (tool calls written in
the `<tool_call>` format of `rejoinder.engine.tool_format`); `with_tools` adds the tools section to the
system prompt; `render` applies the model's chat template (with a fallback for templates that refuse a
`tool` role); `fit` drops the oldest exchanges (`rejoinder.engine.history.trim_history`) until the
prompt leaves room for the answer. Used by the LLM and the turn detector.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from livekit.agents import llm

from rejoinder.engine import ContextOverflow, Engine
from rejoinder.engine.history import trim_history
from rejoinder.engine.tool_format import format_call, tools_prompt

__all__ = ["Message", "chat_messages", "fit", "render", "tool_as_user", "with_tools"]

Message = dict[str, str]


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")


def chat_messages(chat_ctx: llm.ChatContext) -> list[Message]:
    """The chat context as role/content messages for a chat template.

    Assistant tool calls become `<tool_call>` blocks in the assistant's text (the Hermes/Qwen format our
    parser reads back), tool results stay `tool` messages (see `render` for templates that refuse them).
    Leading system/developer messages are merged: several templates only honour one system prompt.
    """
    items, _ = chat_ctx.to_provider_format("openai", inject_dummy_user_message=False)
    out: list[Message] = []
    for m in items:
        role = "system" if m.get("role") == "developer" else str(m.get("role"))
        text = _content_text(m.get("content"))
        if role == "assistant" and m.get("tool_calls"):
            calls = [format_call(tc["function"]["name"], tc["function"]["arguments"]) for tc in m["tool_calls"]]
            text = "\n".join([text, *calls] if text else calls)
        if role == "system" and out and all(p["role"] == "system" for p in out):
            out[-1]["content"] = f"{out[-1]['content']}\n\n{text}".strip()
            continue
        out.append({"role": role, "content": text})
    return out


def with_tools(messages: list[Message], schemas: Sequence[Mapping[str, Any]]) -> list[Message]:
    """`messages` with the tools section (`tool_format.tools_prompt`) at the end of the system prompt."""
    if not schemas:
        return messages
    section = tools_prompt(schemas)
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{messages[0]['content']}\n\n{section}"}, *messages[1:]]
    return [{"role": "system", "content": section}, *messages]


def tool_as_user(messages: list[Message]) -> list[Message]:
    """Tool results as user turns wrapped in <tool_response>, consecutive ones merged (Qwen's rendering)."""
    out: list[Message] = []
    for m in messages:
        if m["role"] != "tool":
            out.append(m)
            continue
        block = f"<tool_response>\n{m['content']}\n</tool_response>"
        if out and out[-1]["role"] == "user" and out[-1]["content"].startswith("<tool_response>"):
            out[-1] = {"role": "user", "content": f"{out[-1]['content']}\n{block}"}
        else:
            out.append({"role": "user", "content": block})
    return out


def render(engine: Engine, messages: list[Message], add_generation_prompt: bool = True) -> str:
    # Templates that know a "tool" role (Qwen, Llama 3, SmolLM2's generic ChatML) render it as their model
    # was trained; one that raises on it gets Qwen's user-turn rendering instead.
    try:
        return engine.tokenizer.render_chat(messages, add_generation_prompt)
    except Exception:
        if not any(m["role"] == "tool" for m in messages):
            raise
        return engine.tokenizer.render_chat(tool_as_user(messages), add_generation_prompt)


def fit(engine: Engine, messages: list[Message], room: int) -> list[Message]:
    """The newest messages whose prompt leaves `room` tokens of the context for the answer.

    The oldest exchanges go first, never the system prompt (`trim_history`); ContextOverflow if even
    the system prompt and the last message leave no room.
    """
    last: tuple[list[Message], int] | None = None

    def count(msgs: Sequence[Message]) -> int:
        nonlocal last
        n = len(engine.tokenizer.encode(render(engine, list(msgs))))
        last = (list(msgs), n)
        return n

    budget = engine.max_seq_len - room - 1
    kept = trim_history(messages, count, budget)
    n = last[1] if last is not None and last[0] == kept else count(kept)
    if n > budget:
        raise ContextOverflow(f"the last message alone ({n} tokens) does not fit a context of {engine.max_seq_len}")
    return kept
