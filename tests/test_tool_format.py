"""The `<tool_call>` format (`rejoinder.engine.tool_format`): prompt, parsing, streaming hold-back, forced pre-fill.

Pure text in, text out: no model is needed. The session (`rejoinder.agent.tools`) and the LiveKit LLM
plugin both use this module, so what is checked here holds for both.
"""
from __future__ import annotations

import json
import random

import pytest

from rejoinder.agent.tools import Tool, ToolRegistry
from rejoinder.engine.tool_format import (
    TOOL_CLOSE,
    TOOL_OPEN,
    ToolCall,
    ToolCallFilter,
    forced_argument,
    forced_prefix,
    format_call,
    held_back,
    parse_tool_call,
    parse_tool_calls,
    tools_prompt,
)

WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
ALARM = {
    "name": "set_alarm",
    "description": "Set an alarm clock.",
    "parameters": {"type": "object", "properties": {"hour": {"type": "integer"}}, "required": ["hour"]},
}


def named(calls: list[ToolCall]) -> list[tuple[str, str]]:
    """(name, arguments JSON) per call: what the LiveKit plugin sends as a FunctionToolCall."""
    return [(c.name, c.arguments_json) for c in calls]


# --- the prompt ------------------------------------------------------------------------------------


def test_tools_prompt_lists_every_tool_in_qwens_wording():
    prompt = tools_prompt([WEATHER, {"type": "function", "function": ALARM}])
    assert prompt.startswith("# Tools\n\nYou may call one or more functions to assist with the user query.")
    assert "For each function call, return a json object with function name and arguments within " \
           "<tool_call></tool_call> XML tags" in prompt
    listing = prompt[prompt.index("<tools>\n") + len("<tools>\n") : prompt.index("\n</tools>")]
    # One JSON line per tool, bare function schemas wrapped as OpenAI tools (as Qwen's template lists them).
    assert [json.loads(line) for line in listing.splitlines()] == [
        {"type": "function", "function": WEATHER}, {"type": "function", "function": ALARM}]
    assert "Get the current weather in a city." in prompt and '"set_alarm"' in prompt
    assert tools_prompt([]) == ""


def test_session_and_plugin_show_the_model_the_same_tools_section():
    # The session lists its Tool objects; the plugin lists livekit's OpenAI-style schemas: same text.
    reg = ToolRegistry([Tool("get_weather", WEATHER["description"], lambda city: city, WEATHER["parameters"])])
    assert reg.system_prompt() == tools_prompt([{"type": "function", "function": WEATHER}])
    assert ToolRegistry().system_prompt() == ""


# --- parsing ---------------------------------------------------------------------------------------


def test_tool_call_parser():
    # (moved from test_livekit_plugins.py with the plugin's parser)
    text = ('Sure.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
            '<tool_call>{"name": "b", "arguments": "{\\"y\\": \\"z\\"}"}</tool_call> done')
    plain, calls = parse_tool_calls(text)
    assert named(calls) == [("a", '{"x": 1}'), ("b", '{"y": "z"}')]
    assert plain.split() == ["Sure.", "done"]
    # Broken JSON stays visible as text instead of vanishing; an unclosed but complete call counts.
    plain, calls = parse_tool_calls("<tool_call>{oops}</tool_call>")
    assert calls == [] and "{oops}" in plain
    assert named(parse_tool_calls('<tool_call>\n{"name": "c", "arguments": {}}')[1]) == [("c", "{}")]
    assert held_back("Hello <tool_") == len("<tool_") and held_back("Hello <b>") == 0


def test_parse_one_call_and_the_forgiving_rules():
    two = format_call("a", {"x": 1}) + " and " + format_call("b", {})
    assert parse_tool_call(two) == ToolCall("a", {"x": 1})  # the first of several
    assert parse_tool_call("No call here.") is None
    # Small models stop early: missing closing braces, with or without the close tag.
    assert parse_tool_call('<tool_call>{"name": "x", "arguments": {"a": 1}') == ToolCall("x", {"a": 1})
    assert parse_tool_call('<tool_call>{"name": "x", "arguments": {"a": 1}</tool_call>') == ToolCall("x", {"a": 1})
    assert parse_tool_call('<tool_call>{"name": "x", "parameters": {"a": 2}}</tool_call>') == ToolCall("x", {"a": 2})
    assert parse_tool_call('<tool_call>{"name": "x"}</tool_call>') == ToolCall("x", {})
    # Not a call: no name, a name that is not a string, arguments that are not an object.
    for bad in ('{"arguments": {}}', '{"name": 3, "arguments": {}}', '{"name": "x", "arguments": [1]}',
                '{"name": "x", "arguments": "not json"}', "not json"):
        assert parse_tool_call(f"<tool_call>{bad}</tool_call>") is None, bad
    # Dropped rather than kept when the text is for speech.
    plain, calls = parse_tool_calls("Okay. <tool_call>{oops}</tool_call> Done.", keep_broken=False)
    assert calls == [] and plain == "Okay.  Done."


def test_format_call_round_trips_and_keeps_unparseable_arguments_verbatim():
    call = ToolCall("lookup", {"order_id": "A7", "city": "Zürich"})
    assert call.text() == format_call("lookup", call.arguments) == format_call("lookup", call.arguments_json)
    assert call.text().startswith(TOOL_OPEN + "\n") and call.text().endswith("\n" + TOOL_CLOSE)
    assert "Zürich" in call.text()  # written as the model would, not \u-escaped
    assert parse_tool_call(call.text()) == call
    odd = format_call("lookup", "{oops")
    assert json.loads(odd[len(TOOL_OPEN) : -len(TOOL_CLOSE)]) == {"name": "lookup", "arguments": "{oops"}


# --- the streaming hold-back -----------------------------------------------------------------------

CALL = format_call("get_weather", {"city": "Paris"})
# (answer, spoken text, calls): spoken compared word by word (the whitespace next to a call may go).
STREAMS = [
    ("Sure, the weather in Paris is sunny today.", "Sure, the weather in Paris is sunny today.", []),
    ("Use <b>bold</b> and a < b, or <tool> tags.", "Use <b>bold</b> and a < b, or <tool> tags.", []),
    ("It ends with a lone <tool_cal", "It ends with a lone <tool_cal", []),
    (f"  {CALL}", "", [ToolCall("get_weather", {"city": "Paris"})]),
    (f"Let me check. {CALL} One moment.", "Let me check. One moment.", [ToolCall("get_weather", {"city": "Paris"})]),
    (f"{CALL}\n{format_call('set_alarm', {'hour': 7})}", "", [ToolCall("get_weather", {"city": "Paris"}),
                                                             ToolCall("set_alarm", {"hour": 7})]),
    ('Okay <tool_call>{"name": "x", "arguments": {"a": 1}', "Okay", [ToolCall("x", {"a": 1})]),
    ("Hmm <tool_call>{oops}</tool_call> right.", "Hmm right.", []),
]


def random_splits(text: str, rng: random.Random, n: int) -> list[list[str]]:
    splits = [list(text), [text]]  # character by character, and all at once
    for _ in range(n):
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 12))))
        splits.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])])
    return splits


@pytest.mark.parametrize("answer,spoken,calls", STREAMS)
def test_filter_gives_the_same_speech_and_calls_however_the_tokens_split(answer, spoken, calls):
    rng = random.Random(answer)
    for pieces in random_splits(answer, rng, 150):
        f = ToolCallFilter()
        released = [f.push(p) for p in pieces]
        released.append(f.finish())
        said = "".join(released)
        assert said.split() == spoken.split(), pieces
        assert all(TOOL_OPEN not in r and TOOL_CLOSE not in r and "<tool_call" not in r for r in released), pieces
        assert f.calls() == calls, pieces
        assert f.call() == (calls[0] if calls else None)
        assert f.call_complete == (TOOL_CLOSE in answer)


def test_filter_releases_text_as_soon_as_it_cannot_start_a_call():
    f = ToolCallFilter()
    assert f.push("Sure") == "Sure" and f.push(", done.") == ", done."  # no delay without a "<"
    assert f.push(" <") == "" and f.push("b>") == " <b>"  # held one token, then released whole
    assert f.push(" <tool") == "" and f.held == " <tool"  # a possible call start waits, space and all
    assert f.push("_call>") == "" and f.opened and not f.call_complete
    assert f.push('{"name": "end_call", "arguments": {}}') == "" and f.push("</tool_call>") == ""
    assert f.call_complete and f.call() == ToolCall("end_call", {})
    assert f.push(" Bye!") == ""  # after a call, everything waits for finish()
    # The space held before the call, and the one after; the call survives finish().
    assert f.finish() == "  Bye!" and f.call() == ToolCall("end_call", {})


def test_filter_keeps_broken_calls_visible_only_when_asked():
    text = "Fine. <tool_call>{oops}</tool_call>"
    speech, shown = ToolCallFilter(), ToolCallFilter(keep_broken=True)
    assert speech.push(text) == shown.push(text) == "Fine."
    assert speech.finish() == "" and speech.calls() == []
    assert shown.finish() == " <tool_call>{oops}</tool_call>" and shown.calls() == []


# --- forced calls ----------------------------------------------------------------------------------


def test_forced_prefix_lets_the_model_write_only_what_is_left():
    # The model picks the name after the bare prefix; the full prefix continues exactly that text.
    assert forced_prefix("get_weather").startswith(forced_prefix(None) + "get_weather")
    assert forced_prefix(None) + 'get_weather", "arguments": ' == forced_prefix("get_weather")
    # A tool without arguments: the pre-fill is the whole call, which the filter holds and completes.
    whole = forced_prefix("end_call", with_arguments=False)
    f = ToolCallFilter()
    assert f.push(whole) == "" and f.call_complete and f.call() == ToolCall("end_call", {})
    # With arguments the model writes the object (small models often drop the closing braces).
    f = ToolCallFilter()
    assert f.push(forced_prefix("get_weather")) == "" and f.opened and not f.call_complete
    f.push('{"city": "Paris"}')
    assert f.finish() == "" and f.call() == ToolCall("get_weather", {"city": "Paris"})
    # Schema-guided: the caller writes the keys (forced_argument), the model only the values.
    text = forced_prefix("set_alarm") + "{" + forced_argument("hour", 0) + "7" + forced_argument("label", 1)
    text += '"wake up"' + "}}\n" + TOOL_CLOSE
    assert parse_tool_call(text) == ToolCall("set_alarm", {"hour": 7, "label": "wake up"})
    assert forced_argument("hour", 0) == '"hour": ' and forced_argument("label", 1) == ', "label": '


def test_forced_prefix_of_a_tool_without_arguments_is_the_whole_call():
    # engine/forced_call.py pre-fills a tool that takes no arguments with its whole call.
    assert forced_prefix("end_call", with_arguments=False) == ToolCall("end_call", {}).text()
    assert parse_tool_call(forced_prefix("end_call", with_arguments=False)) == ToolCall("end_call", {})
    # The model may write the name itself: the name-less prefix continues into the named one.
    assert forced_prefix("lookup").startswith(forced_prefix(None) + "lookup")
