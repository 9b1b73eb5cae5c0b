"""How is a tool call forced on a small model? The call is written for it, argument by argument.

A forced call (`tool_choice` naming a function, the session's `force_tool`) cannot be left to a
135M model: asked to continue `{"name": "transfer_call", "arguments": ` it writes the tool's schema
back. So the call is built from the tool's JSON schema: the name is pre-filled (or, with several
candidates, the model writes a few characters and the closest name wins), then for each required
argument the key is pre-filled and the model writes only the value, each generation stopping the
moment the value is complete: a string at its closing quote (matched to the closest `enum` choice
when there is one), a number or boolean at its delimiter, anything else once it is one JSON value.
Optional arguments are left to the tool's defaults: a small model asked for every optional field
fills them with noise.

Used by the session's answers (agent/answer.py) and by the LiveKit LLM plugin; the text format
itself is `engine.tool_format`.
"""
from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rejoinder.errors import EngineError

from .engine import Engine, TokenStream
from .kv_slots import SlotKey
from .sampling import SamplingParams
from .tool_format import ToolCall, forced_argument, forced_prefix

__all__ = ["ForcedCallError", "forced_call"]

StreamHook = Callable[[TokenStream], None]


class ForcedCallError(EngineError):
    """The model wrote nothing usable for an argument of a forced call."""


async def forced_call(engine: Engine, prompt: Sequence[int], tools: Mapping[str, Mapping[str, Any]],
                      name: str | None, params: SamplingParams, *, on_stream: StreamHook | None = None,
                      slot: SlotKey = None) -> ToolCall:
    """The call of `name` (None: the model picks one of `tools`) after `prompt` (token ids).

    `tools` maps names to their JSON-schema `parameters`. `on_stream` sees every token stream
    started (for usage accounting); each is closed as soon as its value is complete.
    """
    if not tools:
        raise ForcedCallError("a forced call needs at least one tool")
    names = list(tools)
    tok = engine.tokenizer
    prompt = list(prompt)

    async def until(text: str, done: Callable[[str], int | None], max_new_tokens: int) -> tuple[str, bool]:
        p = SamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, seed=params.seed,
                           max_new_tokens=max_new_tokens)
        ts = engine.stream(prompt + tok.encode(text), p, slot=slot)
        if on_stream is not None:
            on_stream(ts)
        out = ""
        try:
            async for ev in ts:
                out += ev.text
                cut = done(out)
                if cut is not None:
                    return out[:cut], True
        finally:
            await ts.aclose()  # stops the engine right after the value: no tokens wasted past it
        return out, False

    if name is None:
        guess, _ = await until(forced_prefix(None), _string_end, 24)
        name = (difflib.get_close_matches(_unquote(guess), names, n=1, cutoff=0.0) or names)[0]
    elif name not in tools:
        raise ForcedCallError(f"unknown tool {name!r}")
    schema = tools[name] or {}
    props: Mapping[str, Any] = schema.get("properties") or {}
    keys = [k for k in schema.get("required", []) if k in props]
    text = forced_prefix(name) + "{"
    args: dict[str, Any] = {}
    for i, key in enumerate(keys):
        text += forced_argument(key, i)
        value = await _value(until, text, props[key], name, key)
        args[key] = value
        text += json.dumps(value, ensure_ascii=False)
    return ToolCall(name, args)


async def _value(until: Any, text: str, schema: Mapping[str, Any], tool: str, key: str) -> Any:
    kind = _first_type(schema)
    enum = schema.get("enum")
    if kind == "string" or (enum and all(isinstance(e, str) for e in enum)):
        raw, _ = await until(text + '"', _string_end, 48)
        value = _unquote(raw)
        if enum:
            value = (difflib.get_close_matches(value, enum, n=1, cutoff=0.0) or enum)[0]
        return value
    if kind in ("integer", "number", "boolean"):
        raw, _ = await until(text, _scalar_end, 12)
        token = raw.strip().rstrip(",}").strip()
        try:
            value = json.loads(token)
        except json.JSONDecodeError:
            value = None
        ok = (isinstance(value, bool) if kind == "boolean"
              else isinstance(value, (int, float)) and not isinstance(value, bool))
        if not ok:
            raise ForcedCallError(f"the model wrote {token!r} for {tool}.{key} ({kind})")
        return int(value) if kind == "integer" else value
    raw, found = await until(text, _json_end, 96)
    if not found:
        raise ForcedCallError(f"the model wrote no valid JSON for {tool}.{key}")
    return json.JSONDecoder().raw_decode(raw.lstrip())[0]


# --- where a value the model is writing ends ------------------------------------------------------


def _string_end(s: str) -> int | None:
    """Index of the first unescaped quote (the end of a JSON string body), or None."""
    escaped = False
    for i, ch in enumerate(s):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            return i
        elif ch == "\n":  # a string value never spans lines here: the model has wandered off
            return i
    return None


def _unquote(body: str) -> str:
    try:
        return json.loads(f'"{body}"')
    except json.JSONDecodeError:
        return body


def _scalar_end(s: str) -> int | None:
    stripped = s.lstrip()
    if not stripped:
        return None
    offset = len(s) - len(stripped)
    for i, ch in enumerate(stripped):
        if ch in ",}\n" or (ch == " " and i > 0):
            return offset + i
    return None


def _json_end(s: str) -> int | None:
    stripped = s.lstrip()
    if not stripped:
        return None
    try:
        _, end = json.JSONDecoder().raw_decode(stripped)
    except json.JSONDecodeError:
        return None
    # "12" might still become "123": a bare number is complete only once something follows it.
    if end == len(stripped) and stripped[0] not in "{[\"tfn":
        return None
    return len(s) - len(stripped) + end


def _first_type(schema: Mapping[str, Any]) -> str | None:
    t = schema.get("type")
    if isinstance(t, list):
        t = next((x for x in t if x != "null"), None)
    if t is None:
        for alt in schema.get("anyOf", []) or schema.get("oneOf", []):
            if isinstance(alt, Mapping) and alt.get("type") not in (None, "null"):
                return _first_type(alt)
    return t
