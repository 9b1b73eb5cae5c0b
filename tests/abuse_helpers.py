"""Helpers of the abuse suites: raw HTTP requests, the shape of a refusal, "does it still take a call?".

Import from a test module as `from abuse_helpers import …` (pytest puts tests/ on sys.path).
"""
from __future__ import annotations

import asyncio
import http.client
import json
import re

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from webrtc_client import RTCClient, ServerThread, audio_offer

# Header values as a browser or curl can send them: any text but control characters (a request
# with those is malformed HTTP, answered by aiohttp's parser before the app sees it).
HEADER_CHARS = st.characters(blacklist_categories=("Cc", "Cs"))


def fuzz(examples: int) -> settings:
    """Hypothesis settings of the abuse suites: bounded (the whole suite runs in about a minute on a
    loaded 2-core box), no deadline (a loaded box is slow, not wrong), no example database in the
    checkout (a failure prints the example; `@reproduce_failure` replays it)."""
    return settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def request(srv: ServerThread, method: str, path: str, body: bytes = b"", headers: dict | None = None,
            timeout: float = 15.0) -> tuple[int, dict[str, str], bytes]:
    """One plain HTTP request (http.client: any bytes, any header); a hang fails the test via the timeout."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.cfg.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def assert_refused(status: int, headers: dict[str, str], body: bytes, code: str | None = None) -> dict:
    """A 4xx with a JSON {"error", "code"} a person can read."""
    assert 400 <= status < 500, (status, body[:300])
    assert headers.get("content-type", "").startswith("application/json"), (status, headers, body[:200])
    doc = json.loads(body)
    assert isinstance(doc.get("error"), str) and doc["error"].strip(), doc
    assert "Traceback" not in doc["error"]
    if code is not None:
        assert doc["code"] == code, doc
    return doc


def hang_up_if_answered(srv: ServerThread, status: int, headers: dict[str, str], body: bytes) -> None:
    """A mutation that left the offer valid got a session: free its slot at once."""
    location = headers.get("location") or (json.loads(body).get("resource") if status == 200 else None)
    if location:
        request(srv, "DELETE", location)


def assert_healthy(srv: ServerThread) -> None:
    status, _, body = request(srv, "GET", "/api/health")
    assert status == 200 and json.loads(body)["ok"] is True


async def takes_a_call(srv: ServerThread, **client: object) -> None:
    """A real caller connects, hears the session start, and gets its control answered."""
    c = RTCClient(srv.url, **client)
    try:
        await c.connect()
        await c.wait_event(lambda e: e["type"] == "session_started", 10)
        assert (await c.control("status"))["ok"] is True
    finally:
        await c.close()


def assert_takes_a_call(srv: ServerThread, **client: object) -> None:
    asyncio.run(takes_a_call(srv, **client))


async def dead_offer() -> str:
    """An offer from a peer that will never complete ICE: its candidates point at a port nobody serves,
    and its peer connection is closed before the answer could be applied."""
    return re.sub(r"(a=candidate:\S+ \d+ udp \d+ 127\.0\.0\.1) \d+", r"\1 9", await audio_offer())
