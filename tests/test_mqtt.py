"""Call-center events and control over MQTT, against a real Mosquitto on a free loopback port."""
from __future__ import annotations

import asyncio
import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from mqtt_broker import Broker, Handler, Recorder, events, final, find_mosquitto, interim, is_event, is_status, until

from rejoinder.agent.config import MQTTSettings
from rejoinder.agent.control import CommandRefused as ControlError
from rejoinder.agent.control import control_json_schema, parse_command
from rejoinder.agent.events import (
    AgentText,
    BargeIn,
    SessionEnded,
    SessionStarted,
    SessionState,
    StateChanged,
    TurnMetrics,
    UserSpeech,
    UserTranscript,
)
from rejoinder.agent.mqtt import MQTTConfig, control_topic, events_topic, status_topic


def parse_control(payload):
    return parse_command(payload, "mqtt")

pytestmark = [
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed (CI installs it: .ci/run)"),
    pytest.mark.timeout(60),
]


# --- configuration and schema (no broker needed) ----------------------------------------------------


def test_config_from_url():
    c = MQTTConfig.from_url("mqtts://ops:s%40cret@broker.example:8884", agent_id="desk-1", ca_file="/ca.pem")
    assert (c.host, c.port, c.tls, c.username, c.password) == ("broker.example", 8884, True, "ops", "s@cret")
    assert c.display_url == "mqtts://broker.example:8884"  # no credentials in logs
    assert c.client_id.startswith("rejoinder-desk-1-")
    assert MQTTConfig.from_url("mqtt://h", agent_id="a").port == 1883
    assert MQTTConfig.from_url("mqtts://h", agent_id="a").port == 8883
    assert MQTTConfig.from_url("mqtt://u:p@h", agent_id="a", username="x").username == "x"  # flag wins
    assert (MQTTConfig.from_url("mqtt://h", agent_id="a").client_id
            != MQTTConfig.from_url("mqtt://h", agent_id="a").client_id)
    for bad in ("http://h:1883", "mqtt://", "mqtt://h:notaport"):
        with pytest.raises(ValueError):
            MQTTConfig.from_url(bad, agent_id="a")
    for bad_id in ("a/b", "+", "x#", ""):
        with pytest.raises(ValueError, match="agent id"):
            MQTTConfig.from_url("mqtt://h", agent_id=bad_id)


def test_config_from_env_and_flags():
    from rejoinder.agent.cli import build_parser
    from rejoinder.agent.config import from_args, load

    assert MQTTConfig.from_settings(load({}).mqtt) is None  # MQTT is off unless asked for
    env = {"REJOINDER_MQTT_URL": "mqtts://broker:8883", "REJOINDER_AGENT_ID": "desk-2",
           "REJOINDER_MQTT_USERNAME": "u", "REJOINDER_MQTT_PASSWORD": "p", "REJOINDER_MQTT_INSECURE": "1"}
    c = MQTTConfig.from_settings(load(env).mqtt)
    assert (c.host, c.agent_id, c.username, c.password, c.tls_insecure) == ("broker", "desk-2", "u", "p", True)
    args = build_parser().parse_args(["talk", "--in", "x.wav", "--out", "y.wav", "--mqtt", "mqtt://other:1884",
                                      "--agent-id", "flag-id"])
    c = MQTTConfig.from_settings(from_args(args, env).mqtt, password="q")  # flags win
    assert (c.host, c.port, c.agent_id, c.username, c.password) == ("other", 1884, "flag-id", "u", "q")
    assert MQTTConfig.from_settings(MQTTSettings(url="mqtt://h")).agent_id  # host name by default
    # The same --mqtt flag on every live entry point.
    for cmd in (["talk", "--in", "x.wav", "--out", "y.wav"], ["serve"], ["livekit", "dev"]):
        args = build_parser().parse_args([*cmd, "--mqtt", "mqtt://h:1"])
        assert from_args(args, {}).mqtt.url == "mqtt://h:1", cmd


@pytest.mark.parametrize("payload, reason", [
    (b"{not json", "invalid JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"args": {}}', "missing command"),
    (b'{"command": "dance"}', "unknown command"),
    (b'{"command": "say"}', "missing argument 'text'"),
    (b'{"command": "say", "args": {"text": "   "}}', "must not be empty"),
    (b'{"command": "say", "args": {"text": 5}}', "must be a string"),
    (json.dumps({"command": "say", "args": {"text": "x" * 2001}}).encode(), "longer than 2000"),
    (b'{"command": "say", "args": {"text": "hi", "mode": "shout"}}', "must be one of interrupt, queue"),
    (b'{"command": "say", "args": {"txt": "hi"}}', "unknown argument"),
    (b'{"command": "mute", "args": {"now": "yes"}}', "unknown argument"),
    (b'{"command": "set_persona", "args": {}}', "missing argument 'persona'"),
    (b'{"command": "end", "args": []}', "args must be a JSON object"),
    (b'{"command": "end", "extra": 1}', "unknown field"),
    (b'{"command": "end", "id": {"a": 1}}', "id must be"),
])
def test_parse_control_refuses_with_reason(payload, reason):
    with pytest.raises(ControlError, match=None) as info:
        parse_control(payload)
    assert reason in info.value.message


def test_parse_control_accepts_and_fills_defaults():
    c = parse_control(b'{"command": "say", "args": {"text": "Hello there"}, "id": "op-7"}')
    assert (c.command, c.args, c.id) == ("say", {"text": "Hello there", "mode": "interrupt"}, "op-7")
    assert parse_control(b'{"command": "say", "args": {"text": "x", "mode": "queue"}}').args["mode"] == "queue"
    assert parse_control(b'{"command": "end"}').args == {}
    assert parse_control(b'{"command": "end", "args": {"reason": "resolved"}, "id": 3}').args == {"reason": "resolved"}
    assert (parse_control(b'{"command": "set_persona", "args": {"persona": "Be brief."}}').args
            == {"persona": "Be brief."})
    for cmd in ("mute", "unmute", "interrupt", "status"):
        assert parse_control(json.dumps({"command": cmd}).encode()).command == cmd
    # The error keeps the correlation id so the sender can match the refusal to its request.
    with pytest.raises(ControlError) as info:
        parse_control(b'{"command": "say", "id": "req-1"}')
    assert info.value.id == "req-1"
    schema = control_json_schema()
    names = [v["properties"]["command"]["const"] for v in schema["oneOf"]]
    assert names == ["say", "interrupt", "end", "mute", "unmute", "set_persona", "status", "user_text", "hold",
                     "resume", "transfer"]


# --- events out -------------------------------------------------------------------------------------


async def test_conversation_events_arrive_in_order_with_versioned_payloads(broker, recorder, agent_id, make_bridge):
    bridge = make_bridge(broker.url, agent_id)
    await bridge.start()
    assert await bridge.wait_connected(5)
    sid = "s-" + uuid.uuid4().hex[:6]
    t0 = time.monotonic()
    conversation = [
        SessionStarted(sid, persona="support"),
        StateChanged(sid, SessionState.LISTENING, SessionState.USER_SPEAKING, reason="vad"),
        UserSpeech(sid, started=True, audio_time_s=0.4),
        UserTranscript(sid, text="what is", final=False, utterance_id=1),
        UserTranscript(sid, text="what is the time", final=False, utterance_id=1),
        UserSpeech(sid, started=False, audio_time_s=1.6),
        UserTranscript(sid, text="What is the time?", final=True, utterance_id=1),
        AgentText(sid, turn=1, text="It is", final=False),
        AgentText(sid, turn=1, text="It is noon.", final=True),
        TurnMetrics(sid, turn=1, user_text="What is the time?", agent_text="It is noon.", interrupted=False,
                    preemptive=False, end_of_turn_prob=0.9, user_speech_end_at=t0, asr_final_at=t0 + 0.1,
                    end_of_turn_at=t0 + 0.15, llm_first_token_at=t0 + 0.2, first_clause_at=t0 + 0.3,
                    first_tts_audio_at=t0 + 0.4, first_audio_sent_at=t0 + 0.45, llm_tokens=5),
        BargeIn(sid, turn=1, outcome="interruption", at_s=2.0, onset_at=t0 + 1.0, stopped_at=t0 + 1.12,
                played_text="It is"),
        SessionEnded(sid, reason="hangup", turns=1),
    ]
    for ev in conversation:
        bridge.listen(ev)
    got = await recorder.wait_for(lambda m: "/events/" in m.topic, count=len(conversation))

    assert [m.topic for m in got] == [events_topic(agent_id, sid, ev.type) for ev in conversation]
    bodies = [m.json for m in got]
    assert [b["seq"] for b in bodies] == list(range(1, len(conversation) + 1))
    assert all(b["v"] == 1 and b["session_id"] == sid and isinstance(b["wall_time"], float) for b in bodies)
    for ev, body in zip(conversation, bodies):
        assert body["type"] == ev.type
        assert body["at"] == pytest.approx(ev.at)
    # Interims (transcripts and agent text so far) go at QoS 0, everything else at QoS 1.
    assert [m.qos for m in got] == [0 if getattr(ev, "final", True) is False else 1 for ev in conversation]
    assert [m.qos for m in got].count(0) == 3
    assert bodies[6]["text"] == "What is the time?" and bodies[6]["final"] is True
    assert bodies[9]["voice_to_voice_s"] == pytest.approx(0.45)
    assert bodies[10]["reaction_s"] == pytest.approx(0.12) and bodies[10]["resumed"] is False
    assert bodies[2]["type"] == "user_speech" and bodies[1]["new"] == "user_speaking"
    # Counted once the broker acknowledged them, which may be just after the recorder got them.
    await until(lambda: bridge.stats.published == len(conversation), 5, "PUBACKs")
    # An event after session_ended (the ack of "end") continues the count rather than restarting it.
    bridge.publish_event(sid, {"type": "ack", "command": "end"})
    late = (await recorder.wait_for(lambda m: m.topic.endswith("/events/ack")))[0]
    assert late.json["seq"] == len(conversation) + 1


async def test_presence_retained_online_then_offline_on_clean_close(broker, recorder, agent_id, make_bridge):
    bridge = make_bridge(broker.url, agent_id)
    await bridge.start()
    online = (await recorder.wait_for(is_status(agent_id, "online")))[0]
    assert online.qos == 1
    body = online.json
    assert body["v"] == 1 and body["agent_id"] == agent_id and body["protocol"] == "5" and body["sessions"] == []

    async def handler(command, args):
        return {"ok": True}

    bridge.register_session("call-1", handler)
    updated = await recorder.wait_for(lambda m: is_status(agent_id, "online")(m) and m.json["sessions"] == ["call-1"])
    assert updated
    # A dashboard starting later sees the presence as a retained message.
    with Recorder(broker.port, topics=(status_topic(agent_id),)) as late:
        got = await late.wait_for(is_status(agent_id, "online"))
        assert got[0].retain and got[0].json["sessions"] == ["call-1"]

    await bridge.close()
    offline = (await recorder.wait_for(is_status(agent_id, "offline")))[0]
    assert offline.json["reason"] == "shutdown"
    with Recorder(broker.port, topics=(status_topic(agent_id),)) as late:
        got = await late.wait_for(is_status(agent_id, "offline", retained=True))
        assert got[0].json["reason"] == "shutdown"


async def test_full_queue_drops_interims_first_then_oldest(broker, recorder, agent_id, make_bridge):
    bridge = make_bridge(broker.url, agent_id, queue_limit=5)
    sid = "s1"
    # Queued before the bridge even starts, as when the broker is unreachable.
    for ev in (final(sid, "f1"), interim(sid, "i1"), interim(sid, "i2"), final(sid, "f2"), interim(sid, "i3"),
               final(sid, "f3"), final(sid, "f4")):
        bridge.publish_event(sid, ev)
    assert (bridge.stats.queued, bridge.stats.dropped_interims, bridge.stats.dropped_other) == (5, 2, 0)
    bridge.publish_event(sid, final(sid, "f5"))  # i3, the last interim, goes
    bridge.publish_event(sid, final(sid, "f6"))  # only finals left: the oldest, f1, goes
    stats = bridge.stats
    assert (stats.queued, stats.dropped_interims, stats.dropped_other) == (5, 3, 1)

    await bridge.start()
    got = await recorder.wait_for(lambda m: "/events/" in m.topic, count=5)
    assert [m.json["text"] for m in got] == ["f2", "f3", "f4", "f5", "f6"]
    # seq numbers show the consumer exactly where the gaps are.
    assert [m.json["seq"] for m in got] == [4, 6, 7, 8, 9]
    await asyncio.sleep(0.2)
    assert len(events(recorder, agent_id)) == 5


async def test_publish_event_is_sync_thread_safe_and_never_raises(broker, recorder, agent_id, make_bridge):
    bridge = make_bridge(broker.url, agent_id)
    await bridge.start()
    assert await bridge.wait_connected(5)

    class Weird:
        def __str__(self) -> str:
            return "weird"

    assert bridge.publish_event("s1", {"type": "metrics", "turn": 1, "voice_to_voice_s": float("nan"),
                                       "x": np.float32(0.5), "obj": Weird(), "state": SessionState.SPEAKING,
                                       "final": True}) is None
    # From a worker thread (a model callback): it must still wake the publisher on the loop.
    t = threading.Thread(target=bridge.publish_event, args=("s1", final("s1", "from a thread")))
    t.start()
    t.join()
    # Wildcards or separators in a session id must not let it publish outside its own topic.
    bridge.publish_event("a/b+#", final("a/b+#", "odd id"))
    got = await recorder.wait_for(lambda m: "/events/" in m.topic, count=3)
    metrics = got[0].json
    assert metrics["voice_to_voice_s"] is None and metrics["x"] == 0.5 and metrics["obj"] == "weird"
    assert metrics["state"] == "speaking"
    assert got[1].json["text"] == "from a thread"
    assert got[2].topic == events_topic(agent_id, "a_b__", "transcript")
    assert got[2].json["session_id"] == "a/b+#"


# --- control in -------------------------------------------------------------------------------------


async def test_valid_say_reaches_the_handler_and_is_acknowledged(broker, recorder, agent_id, make_bridge):
    bridge = make_bridge(broker.url, agent_id)
    handler = Handler()
    bridge.register_session("call-7", handler)
    await bridge.start()
    assert await bridge.wait_connected(5)
    recorder.publish(control_topic(agent_id, "call-7"),
                     {"command": "say", "args": {"text": "Please hold."}, "id": "req-1"})
    ack = (await recorder.wait_for(is_event(agent_id, "ack", id="req-1")))[0]
    assert ack.topic == events_topic(agent_id, "call-7", "ack")
    assert ack.qos == 1
    body = ack.json
    assert body["v"] == 1 and body["command"] == "say" and body["result"] == {"ok": True, "spoken": "Please hold."}
    assert handler.calls == [("say", {"text": "Please hold.", "mode": "interrupt"})]


async def test_bad_commands_get_error_events_and_change_nothing(broker, recorder, agent_id, make_bridge):
    bridge = make_bridge(broker.url, agent_id)
    handler = Handler()
    bridge.register_session("call-1", handler)
    await bridge.start()
    assert await bridge.wait_connected(5)
    topic = control_topic(agent_id, "call-1")
    bad = [
        (topic, b"{this is not json", "invalid JSON", None),
        (topic, {"command": "launch_rockets", "id": "b2"}, "unknown command", "b2"),
        (topic, {"command": "say", "args": {"text": ""}, "id": "b3"}, "must not be empty", "b3"),
        (topic, {"command": "say", "args": {"text": "hi", "mode": "whisper"}, "id": "b4"}, "must be one of", "b4"),
        (topic, {"command": "set_persona", "args": {"persona": 42}, "id": "b5"}, "must be a string", "b5"),
        (control_topic(agent_id, "no-such-call"), {"command": "end", "id": "b6"}, "unknown session", "b6"),
    ]
    for t, payload, _, _ in bad:
        recorder.publish(t, payload)
    errors = await recorder.wait_for(is_event(agent_id, "error", where="control"), count=len(bad))
    for (t, _, reason, cid), err in zip(bad, errors):
        body = err.json
        assert reason in body["message"], body
        assert body["id"] == cid and body["v"] == 1 and body["fatal"] is False
        assert err.topic == t.replace("/control", "/events/error")
    assert handler.calls == []
    # The bridge still serves commands after all that.
    recorder.publish(topic, {"command": "mute", "id": "ok-1"})
    await recorder.wait_for(is_event(agent_id, "ack", id="ok-1"))
    assert handler.calls == [("mute", {})]
    assert bridge.stats.control_rejected == len(bad)


async def test_retained_control_messages_are_refused(broker, recorder, agent_id, make_bridge):
    # A retained "end" would hang up every session with that id again on each reconnect.
    recorder.publish(control_topic(agent_id, "call-1"), {"command": "end", "id": "stale"}, retain=True)
    await asyncio.sleep(0.1)
    bridge = make_bridge(broker.url, agent_id)
    handler = Handler()
    bridge.register_session("call-1", handler)
    await bridge.start()
    err = (await recorder.wait_for(is_event(agent_id, "error", where="control")))[0]
    assert "retained" in err.json["message"]
    assert handler.calls == []
    recorder.publish(control_topic(agent_id, "call-1"), b"", retain=True)  # clear it for good measure


async def test_handler_refusal_failure_and_order(broker, recorder, agent_id, make_bridge):
    bridge = make_bridge(broker.url, agent_id, control_timeout_s=0.5)
    refusing = Handler({"ok": False, "error": "not speaking"})
    failing = Handler(RuntimeError("tts is down"))
    order: list[str] = []

    async def slow(command: str, args: dict) -> dict:
        # The first command is slow; the second must still run after it, not beside it.
        order.append(f"start {command}")
        await asyncio.sleep(0.2 if command == "say" else 0)
        order.append(f"end {command}")
        return {"ok": True}

    async def hangs(command: str, args: dict) -> dict:
        await asyncio.sleep(30)
        return {"ok": True}

    bridge.register_session("r", refusing)
    bridge.register_session("f", failing)
    bridge.register_session("s", slow)
    bridge.register_session("h", hangs)
    await bridge.start()
    assert await bridge.wait_connected(5)
    recorder.publish(control_topic(agent_id, "r"), {"command": "interrupt", "id": 1})
    recorder.publish(control_topic(agent_id, "f"), {"command": "say", "args": {"text": "x"}, "id": 2})
    recorder.publish(control_topic(agent_id, "s"), {"command": "say", "args": {"text": "x"}, "id": 3})
    recorder.publish(control_topic(agent_id, "s"), {"command": "end", "id": 4})
    recorder.publish(control_topic(agent_id, "h"), {"command": "status", "id": 5})
    e1 = (await recorder.wait_for(is_event(agent_id, "error", id=1)))[0].json
    assert e1["message"] == "not speaking" and e1["command"] == "interrupt"
    e2 = (await recorder.wait_for(is_event(agent_id, "error", id=2)))[0].json
    assert "tts is down" in e2["message"]
    await recorder.wait_for(is_event(agent_id, "ack", id=4))
    assert order == ["start say", "end say", "start end", "end end"]
    acks = events(recorder, agent_id, "ack")
    assert [m.json["id"] for m in acks if m.topic.endswith("/s/events/ack")] == [3, 4]
    e5 = (await recorder.wait_for(is_event(agent_id, "error", id=5)))[0].json
    assert "no answer within" in e5["message"]


async def test_unregistered_session_no_longer_takes_commands(broker, recorder, agent_id, make_bridge):
    bridge = make_bridge(broker.url, agent_id)
    handler = Handler()
    bridge.register_session("c", handler)
    await bridge.start()
    assert await bridge.wait_connected(5)
    bridge.unregister_session("c")
    await recorder.wait_for(lambda m: is_status(agent_id, "online")(m) and m.json["sessions"] == [], timeout=5)
    recorder.publish(control_topic(agent_id, "c"), {"command": "mute", "id": "late"})
    err = (await recorder.wait_for(is_event(agent_id, "error", id="late")))[0].json
    assert "unknown session" in err["message"]
    assert handler.calls == []


# --- resilience -------------------------------------------------------------------------------------


async def test_broker_absent_at_start_then_queued_finals_arrive(own_broker, make_bridge):
    agent = "late-broker"
    bridge = make_bridge(own_broker.url, agent)
    await bridge.start()  # nothing listens on the port yet: must not raise
    sid = "s1"
    for i in range(3):
        bridge.publish_event(sid, interim(sid, f"part {i}"))
        bridge.publish_event(sid, final(sid, f"final {i}"))
    await asyncio.sleep(0.5)  # a few failed attempts
    assert not bridge.connected and bridge.stats.connects == 0 and bridge.stats.queued == 6
    own_broker.start()
    # the Recorder blocks: subscribed before the bridge connects
    with Recorder(own_broker.port, topics=(f"rejoinder/{agent}/#",)) as rec:
        got = await rec.wait_for(lambda m: "/events/" in m.topic, count=6, timeout=6)
        assert [m.json["text"] for m in got] == ["part 0", "final 0", "part 1", "final 1", "part 2", "final 2"]
        assert [m.qos for m in got] == [0, 1] * 3
        assert bridge.connected and bridge.stats.connects == 1 and bridge.stats.reconnects == 0
        await rec.wait_for(is_status(agent, "online"))


async def test_broker_killed_mid_stream_and_restarted(own_broker, make_bridge):
    agent = "crashy"
    own_broker.start()
    rec = Recorder(own_broker.port, topics=(f"rejoinder/{agent}/#",)).connect()
    try:
        bridge = make_bridge(own_broker.url, agent)
        handler = Handler()
        bridge.register_session("s1", handler)
        await bridge.start()
        assert await bridge.wait_connected(5)
        for i in range(3):
            bridge.publish_event("s1", final("s1", f"before {i}"))
        await rec.wait_for(is_event(agent, "transcript"), count=3)

        own_broker.kill()
        await until(lambda: not bridge.connected, 5, "the bridge to notice the outage")
        for i in range(5):
            bridge.publish_event("s1", interim("s1", f"during {i}…"))
            bridge.publish_event("s1", final("s1", f"during {i}"))
            await asyncio.sleep(0.05)
        assert bridge.stats.queued >= 10

        own_broker.start()
        rec.connect()  # blocks until subscribed, so nothing the bridge flushes is missed
        await until(lambda: bridge.connected, 6, "the bridge to reconnect")
        finals = await rec.wait_for(lambda m: is_event(agent, "transcript", final=True)(m), count=8, timeout=6)
        texts = [m.json["text"] for m in finals]
        # At-least-once: a final in flight when the broker died may come twice; seq tells them apart.
        seen: dict[int, str] = {}
        for m in rec.received(is_event(agent, "transcript", final=True)):
            seen.setdefault(m.json["seq"], m.json["text"])
        assert [seen[k] for k in sorted(seen)] == [f"before {i}" for i in range(3)] + [f"during {i}" for i in range(5)]
        assert texts[-5:] == [f"during {i}" for i in range(5)]
        assert bridge.stats.reconnects == 1 and bridge.stats.queued == 0
        # The restarted broker lost the retained presence and the subscription: both are back.
        await rec.wait_for(is_status(agent, "online"), count=2)
        rec.publish(control_topic(agent, "s1"), {"command": "unmute", "id": "after"})
        await rec.wait_for(is_event(agent, "ack", id="after"))
        assert handler.calls == [("unmute", {})]
    finally:
        rec.close()


LAST_WILL_AGENT = r"""
import asyncio, sys
from rejoinder.agent.mqtt import MQTTBridge, MQTTConfig

async def main():
    bridge = MQTTBridge(MQTTConfig.from_url(sys.argv[1], agent_id=sys.argv[2], keepalive=5))
    await bridge.start()
    if not await bridge.wait_connected(10):
        sys.exit(3)
    print("ready", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_last_will_marks_a_killed_agent_offline(broker, recorder, agent_id):
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", LAST_WILL_AGENT, broker.url, agent_id,
                                                stdout=asyncio.subprocess.PIPE)
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert line.strip() == b"ready"
        online = (await recorder.wait_for(is_status(agent_id, "online")))[0].json
        assert online["pid"] == proc.pid
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        offline = (await recorder.wait_for(is_status(agent_id, "offline"), timeout=5))[0].json
        assert offline["reason"] == "connection lost" and offline["v"] == 1 and offline["pid"] == proc.pid
        with Recorder(broker.port, topics=(status_topic(agent_id),)) as late:
            assert (await late.wait_for(is_status(agent_id, "offline", retained=True)))[0]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# --- connection options -----------------------------------------------------------------------------


async def _old_broker_proxy(target_port: int, seen_levels: list[int]) -> asyncio.base_events.Server:
    """A TCP front for Mosquitto that behaves like an MQTT 3.1.1-only broker.

    Such a broker answers an MQTT 5 CONNECT with CONNACK "unacceptable protocol version" (3.1.1,
    section 3.2.2.3) and closes; anything else is passed through to the real broker.
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readexactly(1)
        length, mult, raw_len = 0, 1, b""
        while True:
            b = await reader.readexactly(1)
            raw_len += b
            length += (b[0] & 0x7F) * mult
            mult *= 128
            if not b[0] & 0x80:
                break
        body = await reader.readexactly(length)
        name_len = int.from_bytes(body[:2], "big")
        level = body[2 + name_len]
        seen_levels.append(level)
        if level == 5:
            writer.write(b"\x20\x02\x00\x01")
            await writer.drain()
            writer.close()
            return
        up_r, up_w = await asyncio.open_connection("127.0.0.1", target_port)
        up_w.write(head + raw_len + body)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                w.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def test_falls_back_to_mqtt_311_when_the_broker_refuses_5(broker, recorder, agent_id, make_bridge):
    levels: list[int] = []
    server = await _old_broker_proxy(broker.port, levels)
    port = server.sockets[0].getsockname()[1]
    try:
        bridge = make_bridge(f"mqtt://127.0.0.1:{port}", agent_id)
        bridge.register_session("s", Handler())
        await bridge.start()
        assert await bridge.wait_connected(5)
        assert levels[:2] == [5, 4]
        online = (await recorder.wait_for(is_status(agent_id, "online")))[0].json
        assert online["protocol"] == "3.1.1"
        bridge.publish_event("s", final("s", "over 3.1.1"))
        recorder.publish(control_topic(agent_id, "s"), {"command": "status", "id": "v3"})
        assert (await recorder.wait_for(is_event(agent_id, "transcript")))[0].json["text"] == "over 3.1.1"
        await recorder.wait_for(is_event(agent_id, "ack", id="v3"))
    finally:
        server.close()


def _self_signed(dirpath: Path) -> tuple[Path, Path]:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    dirpath.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = dirpath / "cert.pem", dirpath / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    return cert_path, key_path


async def test_tls_verifies_the_broker_certificate(tmp_path, make_bridge):
    pytest.importorskip("cryptography")
    cert, key = _self_signed(tmp_path / "pki")
    with Broker(tmp_path / "tls-broker", certfile=cert, keyfile=key) as b:
        assert b.url.startswith("mqtts://")
        with Recorder(b.port, topics=("rejoinder/#",), ca_file=str(cert)) as rec:
            untrusted = make_bridge(b.url, "untrusted")  # system CAs do not know this certificate
            trusted = make_bridge(b.url, "trusted", ca_file=str(cert))
            insecure = make_bridge(b.url, "insecure", tls_insecure=True)
            for br in (untrusted, trusted, insecure):
                await br.start()
            assert await trusted.wait_connected(5) and await insecure.wait_connected(5)
            trusted.publish_event("s", final("s", "encrypted"))
            assert (await rec.wait_for(is_event("trusted", "transcript")))[0].json["text"] == "encrypted"
            assert not untrusted.connected and untrusted.stats.connects == 0


async def test_username_and_password(tmp_path, make_bridge):
    passwd_tool = "/usr/bin/mosquitto_passwd"
    if not os.access(passwd_tool, os.X_OK):
        pytest.skip("mosquitto_passwd not installed")
    pwfile = tmp_path / "passwd"
    subprocess.run([passwd_tool, "-c", "-b", str(pwfile), "agent", "s3cret"], check=True, capture_output=True)
    with Broker(tmp_path / "auth-broker", password_file=pwfile) as b:
        with Recorder(b.port, topics=("rejoinder/#",), username="agent", password="s3cret") as rec:
            good = make_bridge(f"mqtt://agent:s3cret@127.0.0.1:{b.port}", "good")
            bad = make_bridge(f"mqtt://agent:wrong@127.0.0.1:{b.port}", "bad")
            await good.start()
            await bad.start()  # refused credentials: keeps retrying quietly, never raises
            assert await good.wait_connected(5)
            good.publish_event("s", final("s", "authenticated"))
            await rec.wait_for(is_event("good", "transcript"))
            await asyncio.sleep(0.3)
            assert not bad.connected and bad.stats.connects == 0


# --- monitor ----------------------------------------------------------------------------------------


def test_monitor_state_tracks_sessions_and_renders():
    from rich.console import Console

    from rejoinder.agent.cli.monitor import MonitorState

    st = MonitorState()

    def ev(sid: str, type_: str, **body) -> str | None:
        return st.apply(f"rejoinder/desk-1/sessions/{sid}/events/{type_}",
                        json.dumps({"v": 1, "type": type_, **body}).encode())

    assert (st.apply("rejoinder/desk-1/status", json.dumps({"v": 1, "state": "online", "sessions": ["c1"],
                                                            "protocol": "5"}).encode())
            == "desk-1 is online, sessions: c1")
    ev("c1", "session_started")
    assert ev("c1", "transcript", text="I need a", final=False) == "desk-1/c1 caller (interim): I need a"
    ev("c1", "transcript", text="I need a refund.", final=True)
    ev("c1", "agent_text", turn=1, text="Sure, let me", final=False)
    assert ev("c1", "agent_text", turn=1, text="Sure, let me", final=True, interrupted=True) == \
        "desk-1/c1 agent (interrupted): Sure, let me"
    assert ev("c1", "metrics", turn=1, voice_to_voice_s=0.412) == "desk-1/c1 turn 1: voice-to-voice 412 ms"
    ev("c1", "metrics", turn=2, voice_to_voice_s=0.5)
    ev("c1", "metrics", turn=3, voice_to_voice_s=None)  # no audio that turn: no latency, no crash
    assert ev("c1", "barge_in", outcome="echo", reaction_s=None) is None  # its own voice: not a barge-in
    assert ev("c1", "barge_in", outcome="backchannel", reaction_s=0.09, resumed=True) == \
        "desk-1/c1 barge-in: backchannel 90 ms, resumed"
    assert ev("c1", "barge_in", outcome="interruption", reaction_s=0.118) == "desk-1/c1 barge-in: interruption 118 ms"
    ev("c2", "session_started")
    assert ev("c2", "session_ended", reason="hangup", turns=0) == "desk-1/c2 ended (hangup, 0 turns)"
    assert st.apply("rejoinder/desk-1/sessions/c1/events/state", b"{not json") is not None  # reported, not raised

    c1 = st.sessions[("desk-1", "c1")]
    assert (c1.user_text, c1.user_final, c1.turns, c1.latencies, c1.barge_ins) == \
        ("I need a refund.", True, 3, [0.412, 0.5], 2)
    assert [s.session_id for s in st.visible_sessions()] == ["c1", "c2"]  # live first, then ended
    console = Console(record=True, width=200, color_system=None)
    console.print(st.render())
    screen = console.export_text()
    for expected in ("desk-1", "online", "desk-1/c1", "I need a refund.", "Sure, let me", "v2v 500 ms (p50 500 ms)",
                     "barge-ins 2: interruption 118 ms", "ended: hangup"):
        assert expected in screen, (expected, screen)
    assert st.apply("rejoinder/desk-1/status", b"") == "desk-1 status cleared" and "desk-1" not in st.agents
    # Anyone who may publish there can send these; the monitor reports them and carries on.
    assert "unreadable" in st.apply("rejoinder/desk-1/sessions/c1/events/state", b"[" * 5000)
    assert st.apply("rejoinder/desk-9/status", b"[" * 5000) is None
    for junk in (b"[1]", b"null", b'{"sessions": 5}'):
        assert "unreadable" in st.apply("rejoinder/desk-9/status", junk), junk
    assert "unreadable" in st.apply("rejoinder/desk-1/sessions/c9/events/metrics", b'{"turn": "x"}')


async def test_monitor_command_shows_a_live_conversation(broker, agent_id, make_bridge):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rejoinder.agent.cli", "monitor", "--broker", broker.url, "--agent-id", agent_id,
        "--plain", "--duration", "15", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    lines: list[str] = []
    try:
        first = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        assert "connected to" in first, first
        bridge = make_bridge(broker.url, agent_id)
        await bridge.start()
        sid = "call-42"
        bridge.register_session(sid, Handler())
        t0 = time.monotonic()
        for ev in (SessionStarted(sid), UserTranscript(sid, text="Where is", final=False, utterance_id=1),
                   UserTranscript(sid, text="Where is my parcel?", final=True, utterance_id=1),
                   AgentText(sid, turn=1, text="It ships today.", final=True),
                   TurnMetrics(sid, turn=1, user_text="Where is my parcel?", agent_text="It ships today.",
                               interrupted=False, preemptive=False, end_of_turn_prob=None, user_speech_end_at=t0,
                               asr_final_at=None, end_of_turn_at=None, llm_first_token_at=None, first_clause_at=None,
                               first_tts_audio_at=None, first_audio_sent_at=t0 + 0.387),
                   SessionEnded(sid, reason="hangup", turns=1)):
            bridge.listen(ev)
        while not any("ended (hangup" in ln for ln in lines):
            line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
            assert line, "monitor exited early: " + (await proc.stderr.read()).decode()
            lines.append(line.rstrip())
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()
    text = "\n".join(lines)
    assert f"{agent_id} is online, sessions: {sid}" in text
    want = [f"{agent_id}/{sid} started", f"{agent_id}/{sid} caller (interim): Where is",
            f"{agent_id}/{sid} caller: Where is my parcel?", f"{agent_id}/{sid} agent: It ships today.",
            f"{agent_id}/{sid} turn 1: voice-to-voice 387 ms", f"{agent_id}/{sid} ended (hangup, 1 turns)"]
    found = [next(i for i, ln in enumerate(lines) if ln.endswith(w)) for w in want]
    assert found == sorted(found), text


# --- a whole conversation ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def agent_models():
    pytest.importorskip("rejoinder.agent.session")
    from rejoinder.agent.config import AgentConfig
    from rejoinder.agent.models import Models

    cfg = AgentConfig(persona="You are a helpful assistant. Answer in one short sentence.", greeting="",
                      max_new_tokens=24)
    models = Models(cfg)
    yield cfg, models
    models.close()


def _key(ev: dict) -> tuple[str, float]:
    return ev["type"], round(float(ev["at"]), 6)


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_whole_conversation_over_mqtt_survives_a_broker_crash(own_broker, agent_models, make_bridge):
    """A synthesised caller talks to the real agent while a supervisor watches and steers over MQTT.

    The broker dies in the middle of the second question; the conversation must not notice, and
    every final event must reach MQTT, in order, once the broker is back.
    """
    from speech import RATE, piper_say, silence

    from rejoinder.agent.session import Session
    from rejoinder.streaming.audio import resample
    from rejoinder.streaming.transport import InProcessTransport

    cfg, models = agent_models
    agent = "desk-7"
    own_broker.start()
    rec = Recorder(own_broker.port, topics=(f"rejoinder/{agent}/#",)).connect()
    bridge = make_bridge(own_broker.url, agent)
    await bridge.start()
    assert await bridge.wait_connected(5)
    transport = InProcessTransport()
    session = Session(models, cfg, transport)
    sid = session.session_id
    bridge.attach(session)
    await rec.wait_for(lambda m: is_status(agent, "online")(m) and m.json["sessions"] == [sid])

    questions: asyncio.Queue[np.ndarray] = asyncio.Queue()

    async def microphone() -> None:
        # A real microphone never stops: silence between the questions keeps the VAD's clock going.
        while True:
            try:
                audio = questions.get_nowait()
            except asyncio.QueueEmpty:
                audio = silence(0.2)
            await transport.play(audio, RATE)

    def on_transport(type_: str, **fields):
        return transport.wait_event(lambda e: e["type"] == type_ and all(e.get(k) == v for k, v in fields.items()),
                                    timeout=45)

    run = asyncio.create_task(session.run())
    mic = asyncio.create_task(microphone())
    try:
        # Turn 1, broker up.
        questions.put_nowait(piper_say("What is the capital of France?"))
        await on_transport("metrics", turn=1)
        await rec.wait_for(is_event(agent, "metrics", turn=1), timeout=10)

        # The supervisor makes the agent say something.
        said = "Please hold while I check your order."
        t_say = time.monotonic()
        rec.publish(control_topic(agent, sid), {"command": "say", "args": {"text": said}, "id": "op-1"})
        ack = (await rec.wait_for(is_event(agent, "ack", id="op-1"), timeout=10))[0].json
        assert ack["result"]["ok"] is True
        spoken = (await rec.wait_for(lambda m: is_event(agent, "agent_text", final=True)(m) and m.json["at"] > t_say,
                                     timeout=20))[0].json
        assert spoken["text"] == said and spoken["interrupted"] is False
        t_said = time.monotonic()

        # Turn 2, with the broker crashing as the caller starts talking.
        own_broker.kill()
        await until(lambda: not bridge.connected, 5, "the bridge to notice the outage")
        questions.put_nowait(piper_say("Could you tell me how to get to the train station from here?"))
        await on_transport("metrics", turn=2)  # the conversation went on
        queued = bridge.stats.queued
        assert queued > 0
        own_broker.start()
        rec.connect()
        await until(lambda: bridge.connected, 6, "the bridge to reconnect")
        await rec.wait_for(is_event(agent, "metrics", turn=2), timeout=10)

        rec.publish(control_topic(agent, sid), {"command": "end", "args": {"reason": "operator"}, "id": "op-2"})
        await asyncio.wait_for(run, 15)
        ended = (await rec.wait_for(is_event(agent, "session_ended", reason="operator"), timeout=10))[0].json
        end_ack = (await rec.wait_for(is_event(agent, "ack", id="op-2"), timeout=10))[0].json
        assert end_ack["seq"] != ended["seq"]
        # The ended session is detached: presence no longer lists it.
        await rec.wait_for(lambda m: is_status(agent, "online")(m) and m.json["sessions"] == [], timeout=5)
    finally:
        mic.cancel()
        if not run.done():
            run.cancel()
        await asyncio.gather(mic, run, return_exceptions=True)
        rec.close()

    # Every non-interim event the transport got also arrived over MQTT, in the same order (seq
    # de-duplicates the at-least-once re-sends after the crash).
    by_seq: dict[int, dict] = {}
    for m in rec.received(lambda m: m.topic.startswith(f"rejoinder/{agent}/sessions/{sid}/events/")):
        by_seq.setdefault(m.json["seq"], m.json)
    over_mqtt = [_key(e) for _, e in sorted(by_seq.items()) if e.get("final") is not False
                 and e["type"] not in ("ack",) and not (e["type"] == "error" and e.get("where") == "control")]
    direct = [_key(e) for e in transport.sent_events if e.get("final") is not False]
    assert over_mqtt == direct
    finals = [e["text"] for _, e in sorted(by_seq.items()) if e["type"] == "transcript" and e["final"]]
    # Which turn is which, not how well Whisper hears espeak-ng ("capital of France" came back once as
    # "capital of friends" on CI): the question's robust words.
    assert len(finals) == 2 and "capital" in finals[0].lower() and "train station" in finals[1].lower()
    assert bridge.stats.reconnects == 1

    # The `say` was spoken: the agent's audio after the command says those words.
    out = transport.output_audio(origin=t_say)[: int((t_said - t_say + 0.5) * transport.output_sample_rate)]
    heard = models.asr.transcribe(resample(out.astype(np.float32) / 32768, transport.output_sample_rate, RATE),
                                  word_timestamps=False).text.lower()
    assert "hold" in heard and "order" in heard, heard
