"""The data channel under abuse: junk, wrong types, oversize messages and bursts are answered with
errors, the session stays up, and what the server holds stays bounded.

With the stand-in agent (`EchoSession`) first, for speed, then one call to the real agent at the end:
`say` with text that is not a string, or too long, is refused with the reason and nothing is spoken
(the one control table, agent/control.py, checks every channel; the same payloads parsed for MQTT
are checked here too). The caller (tests/webrtc_client.py) must survive whatever the server echoes:
a `ping` with an object for its id used to crash it.
"""
from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
from abuse_helpers import takes_a_call
from speech import piper_say, trim
from webrtc_client import EchoSession, RTCClient, ServerThread, shared_agent, wait_until

from rejoinder.agent.control import MAX_CONTROL_BYTES, CommandRefused, parse_command
from rejoinder.agent.serving import agent_session_factory
from rejoinder.streaming.signalling import ServeConfig
from rejoinder.streaming.text_metrics import normalized_words
from rejoinder.streaming.webrtc import WebRTCOptions

MAX_MESSAGE = WebRTCOptions().max_message_bytes


@pytest.fixture(scope="module")
def echo_server():
    srv = ServerThread(ServeConfig(max_sessions=2, connect_timeout_s=5.0, media_timeout_s=5.0), EchoSession).start()
    yield srv
    srv.stop()


def server_peer(srv: ServerThread, client: RTCClient):
    return srv.call(lambda: next(p for p in srv.server.peers.values() if p.session.session_id == client.session_id))


async def reply_after(client: RTCClient, mark: float, timeout: float = 10.0) -> dict:
    return await client.wait_event(lambda e: e["type"] in ("error", "pong", "control_result"), timeout, after=mark)


async def test_junk_on_the_data_channel_is_answered_and_the_session_stays_up(echo_server):
    client = RTCClient(echo_server.url)
    await client.connect()
    try:
        await client.wait_event(lambda e: e["type"] == "session_started", 10)
        cases: list[tuple[str | bytes, str]] = [
            ("this is not json", "not JSON"),
            ("{\"type\": \"control\", ", "not JSON"),
            ("123", "not an object"),
            ("null", "not an object"),
            ('"say hello"', "not an object"),
            ("[1, 2, 3]", "not an object"),
            (b"\x00\x01binary", "too large or binary"),
            ("x" * (MAX_MESSAGE + 1), "too large"),
            (json.dumps({"type": "control", "command": "say", "args": {"text": "y" * 60_000}}), "too large"),
        ]
        for message, reason in cases:
            mark = time.monotonic()
            client.send_raw(message)
            got = await reply_after(client, mark)
            assert got["type"] == "error" and reason in got["message"], (str(message)[:40], got)
        # Odd ids come back as they were sent (the stand-in echoes a control's id as it is); the caller
        # must cope: a control_result with a dict id used to crash its message handler.
        for odd in ({"a": 1}, [1, 2], None, 1.5, "x" * 1000):
            for kind in ("ping", "control"):
                mark = time.monotonic()
                client.send_raw(json.dumps({"type": kind, "id": odd, "command": "status", "t": {"nested": [odd]}}))
                got = await reply_after(client, mark)
                assert got["type"] == ("pong" if kind == "ping" else "control_result") and got["id"] == odd
        assert (await client.control("status"))["ok"] is True
        # Audio still flows both ways after all that.
        said = await client.say(np.concatenate([trim(piper_say("Testing one two three.")), np.zeros(16_000)]), 16_000)
        await client.wait_event(lambda e: e["type"] == "echo_done", 20, after=said.start)
        assert client.first_speech_after(said.start) is not None
    finally:
        await client.close()
    await takes_a_call(echo_server)


async def test_a_burst_of_1000_messages_is_answered_and_nothing_piles_up(echo_server):
    client = RTCClient(echo_server.url)
    await client.connect()
    try:
        await client.wait_event(lambda e: e["type"] == "session_started", 10)
        peer = server_peer(echo_server, client)
        mark = time.monotonic()
        kinds = ("ping", "junk", "control", "oversize")
        for k in range(1000):
            kind = kinds[k % 4]
            if kind == "ping":
                client.send_raw(json.dumps({"type": "ping", "id": k}))
            elif kind == "junk":
                client.send_raw(f"junk {k}")
            elif kind == "control":
                client.send_raw(json.dumps({"type": "control", "id": k, "command": "status"}))
            else:
                client.send_raw("z" * (MAX_MESSAGE + 1))

        def answered() -> int:
            return sum(1 for e in client.events if e["_received_at"] >= mark
                       and e["type"] in ("pong", "error", "control_result"))

        assert await wait_until(lambda: answered() >= 1000, 60), f"{answered()} of 1000 answered"
        replies = [e for e in client.events if e["_received_at"] >= mark]
        assert sorted(e["id"] for e in replies if e["type"] == "pong") == list(range(0, 1000, 4))
        assert sorted(e["id"] for e in replies if e["type"] == "control_result") == list(range(2, 1000, 4))
        assert sum(e["type"] == "error" for e in replies) == 500
        # Nothing is left behind on the server: no reply task, no queued event, nothing dropped.
        stats = echo_server.call(lambda: (len(peer.transport._tasks), len(peer.transport._pending),
                                          peer.transport.stats.events_dropped, peer.transport.stats.messages_in))
        assert stats[:3] == (0, 0, 0) and stats[3] >= 1000, stats
        assert len(peer.session.controls) == 250
        assert (await client.control("status"))["ok"] is True
    finally:
        await client.close()
    await takes_a_call(echo_server)


# --- the same payloads through the control table, as MQTT parses them ----------------------------------

_BAD_TEXT = [(None, "must be a string"), (123, "must be a string"), ({"a": 1}, "must be a string"),
             ([1, 2], "must be a string"), (True, "must be a string"), ("x" * 15_000, "longer than 2000"),
             ("   ", "must not be empty")]


@pytest.mark.parametrize("text, reason", _BAD_TEXT)
def test_mqtt_say_with_bad_text_is_refused(text, reason):
    with pytest.raises(CommandRefused) as refused:
        parse_command(json.dumps({"command": "say", "args": {"text": text}, "id": "op-1"}).encode(), "mqtt")
    assert reason in refused.value.message and refused.value.id == "op-1"


@pytest.mark.parametrize("payload, reason", [
    (b"null", "JSON object"), (b"123", "JSON object"), (b'"say"', "JSON object"), (b"\xff\xfe", "invalid JSON"),
    (b"{" * 5000, "invalid JSON"), (b" " * (MAX_CONTROL_BYTES + 1), "larger than"),
    (b'{"command": "say", "args": {"text": "hi"}, "id": {"a": 1}}', "id must be"),
])
def test_mqtt_payloads_that_are_not_commands_are_refused(payload, reason):
    with pytest.raises(CommandRefused) as refused:
        parse_command(payload, "mqtt")
    assert reason in refused.value.message


# --- the real agent ----------------------------------------------------------------------------------


@pytest.mark.slow
async def test_the_agent_refuses_bad_say_speaks_nothing_and_survives_a_burst():
    models, cfg = shared_agent()
    srv = ServerThread(ServeConfig(max_sessions=1, connect_timeout_s=10.0, media_timeout_s=5.0),
                       agent_session_factory(models, cfg)).start()
    client = RTCClient(srv.url)
    try:
        await client.connect()
        await client.wait_event(lambda e: e["type"] == "agent_speech" and not e["started"], 60)  # the greeting
        await asyncio.sleep(0.3)  # its last frames through the jitter buffer
        mark = time.monotonic()
        for text, reason in _BAD_TEXT:
            got = await client.control("say", {"text": text})
            assert got["ok"] is False and reason in got["error"], (repr(text)[:30], got)
        for args, reason in (({}, "missing argument 'text'"), ({"text": "hi", "mode": "shout"}, "must be one of"),
                             ({"text": "hi", "volume": 11}, "unknown argument")):
            got = await client.control("say", args)
            assert got["ok"] is False and reason in got["error"], got
        client.send_raw(json.dumps({"type": "control", "command": "say", "args": {"text": "hi"}, "id": {"a": 1}}))
        got = await client.wait_event(lambda e: e["type"] == "control_result" and "id must be" in e.get("error", ""),
                                      10, after=mark)
        assert got["ok"] is False
        client.send_raw(json.dumps({"type": "nonsense"}))
        got = await client.wait_event(lambda e: e["type"] == "error", 10, after=mark)
        assert "unknown message type" in got["message"]
        # A burst: refusals and status questions, all answered, none spoken.
        for k in range(300):
            args = {"text": 123} if k % 2 else {}
            client.send_raw(json.dumps({"type": "control", "id": 10_000 + k, "command": "say" if k % 2 else "status",
                                        "args": args}))
        burst = [10_000 + k for k in range(300)]
        assert await wait_until(lambda: {e.get("id") for e in client.events_of("control_result")} >= set(burst), 60)
        results = {e["id"]: e for e in client.events_of("control_result") if e.get("id") in set(burst)}
        assert all(results[i]["ok"] is (k % 2 == 0) for k, i in enumerate(burst))
        await asyncio.sleep(1.0)
        assert not [e for e in client.events_of("agent_speech") if e["_received_at"] >= mark], "a refused say spoke"
        assert client.first_speech_after(mark) is None, "audio arrived after only refused commands"
        # The session is intact: a valid say is spoken, word for word.
        mark = time.monotonic()
        assert (await client.control("say", {"text": "Thank you for waiting."}))["ok"] is True
        done = await client.wait_event(lambda e: e["type"] == "agent_text" and e["final"], 30, after=mark)
        assert normalized_words(done["text"]) == ["thank", "you", "for", "waiting"]
        assert client.first_speech_after(mark) is not None
    finally:
        await client.close()
        assert await wait_until(lambda: srv.active() == 0, 20), "the session did not end"
        srv.stop()
