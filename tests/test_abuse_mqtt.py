"""Hostile MQTT control traffic and a crashing broker, against a real Mosquitto and the real bridge.

Whatever arrives on a session's control topic gets exactly one clear refusal (an `error` event with
`where: "control"`, the correlation id when it could be read), reaches no handler, and leaves the
bridge serving: a valid command afterwards is acknowledged and executed. Retained commands are
refused whether they were retained before the agent connected or published while it listens; a
cleared retained message (an empty retained publish) is ignored without a word. A broker killed
mid-session and restarted on the same port is reconnected to within a bounded time, and every
event published meanwhile and after arrives, in order.

The parse-level properties (any bytes, any JSON) are fuzzed with hypothesis; single parse cases are
in test_abuse_channel.py, the ordinary control cases in test_mqtt.py.
"""
from __future__ import annotations

import asyncio
import json
import time

import pytest
from abuse_helpers import fuzz
from hypothesis import given
from hypothesis import strategies as st
from mqtt_broker import Handler, Recorder, final, find_mosquitto, is_event, until

from rejoinder.agent.control import MAX_CONTROL_BYTES, CommandRefused, ControlCommand, parse_command
from rejoinder.agent.mqtt import MQTTBridge, control_topic

pytestmark = [
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed (CI installs it: .ci/run)"),
    pytest.mark.timeout(90),
]


async def serving(make_bridge, url: str, agent_id: str, sid: str = "call-1", **kw) -> tuple[MQTTBridge, Handler]:
    bridge = make_bridge(url, agent_id, **kw)
    handler = Handler()
    bridge.register_session(sid, handler)
    await bridge.start()
    assert await bridge.wait_connected(5)
    return bridge, handler


def refusals(rec: Recorder, agent_id: str) -> list[dict]:
    return [m.json for m in rec.received(is_event(agent_id, "error", where="control"))]


async def still_serves(rec: Recorder, agent_id: str, handler: Handler, sid: str = "call-1", tag: str = "after") -> None:
    """A valid `say` after the abuse is acknowledged and reaches the handler."""
    before = len(handler.calls)
    rec.publish(control_topic(agent_id, sid), {"command": "say", "args": {"text": f"still here {tag}"}, "id": tag})
    ack = (await rec.wait_for(is_event(agent_id, "ack", id=tag), timeout=10))[0].json
    assert ack["command"] == "say" and ack["result"]["ok"] is True
    assert handler.calls[before:] == [("say", {"text": f"still here {tag}", "mode": "interrupt"})]


# --- each hostile payload: one clear refusal, nothing executed ---------------------------------------

SAY = {"command": "say", "args": {"text": "hi"}}
HOSTILE: list[tuple[str, bytes, str, object]] = [
    # (case, payload, words the refusal must contain, the id it must carry)
    ("malformed JSON", b'{"command": "say", "args": {"text": "hi"', "invalid JSON", None),
    ("not JSON at all", b"say hello", "invalid JSON", None),
    ("JSON null", b"null", "JSON object", None),
    ("JSON array", b'[{"command": "end"}]', "JSON object", None),
    ("nested 5000 deep", b"[" * 5000, "nested too deeply", None),
    ("nested objects", b'{"a":' * 3000, "nested too deeply", None),
    ("empty, not retained", b"", "empty payload", None),
    ("unknown command", json.dumps({"command": "format_disk", "id": "u1"}).encode(), "unknown command", "u1"),
    ("command not a string", json.dumps({"command": 7, "id": "u2"}).encode(), "missing command", "u2"),
    ("text is a number", json.dumps({**SAY, "args": {"text": 5}, "id": "t1"}).encode(), "must be a string", "t1"),
    ("text is a list", json.dumps({**SAY, "args": {"text": ["a"]}, "id": "t2"}).encode(), "must be a string", "t2"),
    ("text is null", json.dumps({**SAY, "args": {"text": None}, "id": "t3"}).encode(), "must be a string", "t3"),
    ("mode is a number", json.dumps({**SAY, "args": {"text": "hi", "mode": 1}, "id": "t4"}).encode(),
     "mode must be a string", "t4"),
    ("persona is an object", json.dumps({"command": "set_persona", "args": {"persona": {}}, "id": "t5"}).encode(),
     "must be a string", "t5"),
    ("args is a list", json.dumps({"command": "end", "args": ["now"], "id": "t6"}).encode(), "args must be", "t6"),
    ("id is an object", json.dumps({**SAY, "id": {"x": 1}}).encode(), "id must be", None),
    ("id is NaN", b'{"command": "end", "id": NaN}', "id must be", None),
    ("id is 1e999", b'{"command": "end", "id": 1e999}', "id must be", None),
    ("unknown field", json.dumps({**SAY, "sudo": True, "id": "f1"}).encode(), "unknown field", "f1"),
    ("oversize: the limit + 1", json.dumps({**SAY, "args": {"text": "x" * MAX_CONTROL_BYTES}}).encode(),
     f"larger than {MAX_CONTROL_BYTES}", None),
    ("oversize: 1 MiB", b" " * (1 << 20), f"larger than {MAX_CONTROL_BYTES}", None),
    ("non-UTF-8 bytes", b"\xff\xfe\x00\x80 say", "not UTF-8", None),
    ("Latin-1 inside JSON", b'{"command": "say", "args": {"text": "caf\xe9"}}', "not UTF-8", None),
    ("UTF-16 JSON", json.dumps({**SAY, "id": "w1"}).encode("utf-16"), "not UTF-8", None),
]


async def test_each_hostile_payload_gets_one_clear_refusal_and_nothing_runs(broker, recorder, agent_id, make_bridge):
    bridge, handler = await serving(make_bridge, broker.url, agent_id)
    topic = control_topic(agent_id, "call-1")
    for _, payload, _, _ in HOSTILE:
        recorder.publish(topic, payload)
    got = await recorder.wait_for(is_event(agent_id, "error", where="control"), count=len(HOSTILE), timeout=15)
    # Refusals come in the order the messages did, one each, each saying what was wrong.
    for (case, _, reason, cid), err in zip(HOSTILE, got):
        body = err.json
        assert reason in body["message"], (case, body["message"])
        assert body["id"] == cid and body["fatal"] is False and body["v"] == 1, (case, body)
        assert "Traceback" not in body["message"] and len(body["message"]) < 500, case
        assert err.topic.endswith("/sessions/call-1/events/error")
    await asyncio.sleep(0.3)
    assert len(refusals(recorder, agent_id)) == len(HOSTILE)  # no second reply to anything
    assert handler.calls == []
    assert bridge.stats.control_rejected == len(HOSTILE)
    await still_serves(recorder, agent_id, handler)


# --- retained commands --------------------------------------------------------------------------------


async def test_retained_commands_are_refused_before_and_during_the_connection(broker, recorder, agent_id,
                                                                              make_bridge):
    topic = control_topic(agent_id, "call-1")
    # Retained before the agent connects: the broker hands it over at subscribe time.
    recorder.publish(topic, {"command": "end", "id": "stale"}, retain=True)
    await asyncio.sleep(0.1)
    bridge, handler = await serving(make_bridge, broker.url, agent_id)
    first = (await recorder.wait_for(is_event(agent_id, "error", id="stale")))[0].json
    assert "retained" in first["message"] and first["command"] == "end"

    # Retained while the agent listens: without retain-as-published the broker would strip the flag
    # on the way to the existing subscription and the `say` would run.
    recorder.publish(topic, {"command": "say", "args": {"text": "I should not be said"}, "id": "live"}, retain=True)
    second = (await recorder.wait_for(is_event(agent_id, "error", id="live")))[0].json
    assert "retained" in second["message"] and second["command"] == "say"
    # An invalid retained message is refused for being retained, whatever else is wrong with it.
    recorder.publish(topic, b"{oops", retain=True)
    third = (await recorder.wait_for(is_event(agent_id, "error", where="control"), count=3))[2].json
    assert "retained" in third["message"] and third["id"] is None
    assert handler.calls == []

    # Clearing the retained message (an empty retained publish) asks for nothing: no reply at all.
    recorder.publish(topic, b"", retain=True)
    await asyncio.sleep(0.5)
    assert len(refusals(recorder, agent_id)) == 3
    assert handler.calls == []
    # The same command published the ordinary way runs.
    await still_serves(recorder, agent_id, handler, tag="not-retained")
    assert bridge.stats.control_rejected == 3

    # A fresh connection finds nothing retained any more: no refusal at subscribe time.
    again, handler2 = await serving(make_bridge, broker.url, agent_id, sid="call-2")
    await asyncio.sleep(0.5)
    assert len(refusals(recorder, agent_id)) == 3 and handler2.calls == []
    await again.close()


# --- a burst ------------------------------------------------------------------------------------------


async def test_a_burst_of_200_commands_is_answered_one_for_one_in_order(broker, recorder, agent_id, make_bridge):
    bridge, handler = await serving(make_bridge, broker.url, agent_id)
    topic = control_topic(agent_id, "call-1")
    n = 200
    sent: list[tuple[str, bool]] = []
    for i in range(n):
        if i % 4 == 3:  # every fourth one is refused
            recorder.publish(topic, {"command": "say", "args": {"text": i}, "id": f"b{i}"})
            sent.append((f"b{i}", False))
        else:
            recorder.publish(topic, {"command": "say", "args": {"text": f"n{i}", "mode": "queue"}, "id": f"b{i}"})
            sent.append((f"b{i}", True))
    t0 = time.monotonic()
    is_reply = lambda m: is_event(agent_id, "ack")(m) or is_event(agent_id, "error")(m)
    replies = await recorder.wait_for(lambda m: is_reply(m) and str(m.json["id"]).startswith("b"), count=n, timeout=30)
    elapsed = time.monotonic() - t0
    by_id: dict[str, list[str]] = {}
    for m in replies:
        by_id.setdefault(m.json["id"], []).append(m.json["type"])
    assert {cid: kinds for cid, kinds in by_id.items() if len(kinds) != 1} == {}
    assert by_id == {cid: ["ack" if ok else "error"] for cid, ok in sent}
    # The valid ones ran one at a time in the order they were sent.
    assert [args["text"] for _, args in handler.calls] == [f"n{i}" for i in range(n) if i % 4 != 3]
    assert bridge.stats.control_received == n and bridge.stats.control_rejected == n // 4
    assert elapsed < 30
    await still_serves(recorder, agent_id, handler)


# --- broker crash and restart ---------------------------------------------------------------------------


async def test_broker_killed_and_restarted_events_keep_their_order(own_broker, make_bridge):
    agent = "abuse-crash"
    own_broker.start()
    rec = Recorder(own_broker.port, topics=(f"rejoinder/{agent}/#",)).connect()
    produced: list[int] = []  # seq of every event published, in order
    stop = asyncio.Event()
    try:
        bridge, handler = await serving(make_bridge, own_broker.url, agent, sid="s1")

        async def producer() -> None:
            # A live session keeps producing finals throughout, at ~50 per second.
            i = 0
            while not stop.is_set():
                bridge.publish_event("s1", final("s1", f"e{i}"))
                produced.append(i)
                i += 1
                await asyncio.sleep(0.02)

        task = asyncio.create_task(producer())
        try:
            await rec.wait_for(is_event(agent, "transcript"), count=10)
            own_broker.kill()
            await until(lambda: not bridge.connected, 5, "the bridge to notice the outage")
            cut = len(produced)  # events from here on were published while the broker was down
            await asyncio.sleep(0.6)
            own_broker.start()
            t_up = time.monotonic()
            rec.connect()  # blocks until subscribed: nothing the bridge flushes is missed
            await until(lambda: bridge.connected, 8, "the bridge to reconnect")
            reconnect_s = time.monotonic() - t_up
            await asyncio.sleep(0.5)  # events published after the restart
        finally:
            stop.set()
            await task
        total = len(produced)
        assert total - cut > 30
        await rec.wait_for(is_event(agent, "transcript", text=f"e{total - 1}"), timeout=10)

        # seq counts the session's events: 1 for e0. First arrivals only (at-least-once re-sends
        # after the crash repeat a few), and those must be in publishing order.
        arrivals = [m.json["seq"] for m in rec.received(is_event(agent, "transcript"))]
        first: list[int] = []
        seen: set[int] = set()
        for s in arrivals:
            if s not in seen:
                seen.add(s)
                first.append(s)
        assert first == sorted(first), "events arrived out of order"
        # Nothing published during the outage or after it is missing.
        missing = [i + 1 for i in range(cut, total) if i + 1 not in seen]
        assert missing == []
        assert reconnect_s < 8 and bridge.stats.reconnects == 1 and bridge.stats.queued == 0
        # Control works on the new connection too.
        await still_serves(rec, agent, handler, sid="s1", tag="after-restart")
    finally:
        rec.close()


# --- parse level: any bytes, any JSON ---------------------------------------------------------------------


def _refused_or_parsed(payload: bytes | str) -> None:
    try:
        cmd = parse_command(payload, "mqtt")
    except CommandRefused as exc:
        assert isinstance(exc.message, str) and exc.message.strip() and len(exc.message) < 1000
        assert exc.id is None or isinstance(exc.id, (str, int))
    else:
        assert isinstance(cmd, ControlCommand) and isinstance(cmd.args, dict)


@fuzz(300)
@given(st.binary(max_size=512))
def test_any_bytes_are_parsed_or_refused_never_raised(payload):
    _refused_or_parsed(payload)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20)
MESSAGES = st.fixed_dictionaries({"command": st.sampled_from(["say", "end", "set_persona", "mute", "x"]) | JSON},
                                 optional={"args": JSON | st.dictionaries(
                                     st.sampled_from(["text", "mode", "persona", "reason", "zz"]), JSON, max_size=3),
                                           "id": JSON})


@fuzz(300)
@given(MESSAGES)
def test_any_command_shaped_json_is_parsed_or_refused_never_raised(msg):
    _refused_or_parsed(json.dumps(msg))
