"""Who may call, and when, under abuse: tokens, origins (DNS rebinding, schemes), capacity, and offers
that never connect. Each refusal is a JSON error, and a real caller still gets in afterwards.

The regression tests of two defects found on main: the origin check trusted the request's own Host
header (a forged `Host: evil.example` with a matching Origin was accepted and echoed back), and two
offers that never connected held both default slots for the whole connect timeout, again and again.
"""
from __future__ import annotations

import asyncio
import json
import urllib.parse

import aiohttp
import pytest
from abuse_helpers import HEADER_CHARS, assert_refused, assert_takes_a_call, dead_offer, fuzz, request, takes_a_call
from hypothesis import given
from hypothesis import strategies as st
from webrtc_client import EchoSession, RTCClient, ServerThread, SignallingError, audio_offer, post, wait_until

from rejoinder.errors import ConfigError
from rejoinder.streaming.admission import OriginPolicy, Slots
from rejoinder.streaming.signalling import OfferError, ServeConfig


@pytest.fixture(scope="module")
def origin_server():
    srv = ServerThread(ServeConfig(connect_timeout_s=3.0, media_timeout_s=3.0,
                                   allow_origins=("https://app.example.com",)), EchoSession).start()
    yield srv
    srv.stop()


def test_random_tokens_are_refused_and_the_right_one_works():
    srv = ServerThread(ServeConfig(token="s3cret-token", connect_timeout_s=3.0), EchoSession).start()
    try:
        offer = json.dumps({"sdp": asyncio.run(audio_offer()), "type": "offer"}).encode()

        @fuzz(100)
        @given(st.text(HEADER_CHARS, max_size=80), st.booleans())
        def prop(token: str, in_query: bool) -> None:
            if token == "s3cret-token":
                return
            if in_query:
                got = request(srv, "POST", "/api/offer?token=" + urllib.parse.quote(token), offer,
                              {"Content-Type": "application/json"})
            else:  # header values go out as latin-1 bytes, as a browser or curl would send them
                got = request(srv, "POST", "/api/offer", offer, {"Content-Type": "application/json",
                                                                 "Authorization": b"Bearer " + token.encode()})
            assert_refused(*got, code="unauthorized")
            assert got[1].get("www-authenticate") == "Bearer"

        prop()
        assert srv.active() == 0
        assert_takes_a_call(srv, token="s3cret-token")
    finally:
        srv.stop()


def test_random_origins_are_refused_unless_allowed(origin_server):
    srv = origin_server
    port = srv.cfg.port
    own = {f"http://127.0.0.1:{port}", f"http://localhost:{port}", f"http://[::1]:{port}", "https://app.example.com",
           "https://app.example.com:443"}

    def preflight(origin: str, host: str | None = None) -> tuple[int, dict[str, str], bytes]:
        headers = {"Origin": origin.encode("utf-8"), "Access-Control-Request-Method": "POST"}
        if host is not None:
            headers["Host"] = host
        return request(srv, "OPTIONS", "/api/offer", b"", headers)

    hosts = st.sampled_from(["127.0.0.1", "localhost", "[::1]", "evil.example", "app.example.com", "192.0.2.1",
                             "LOCALHOST", "127.0.0.1.evil.example", "[::ffff:127.0.0.1]"])
    ports = st.sampled_from([port, port + 1, 80, 443, None])

    @fuzz(150)
    @given(st.one_of(
        st.builds(lambda s, h, p: f"{s}://{h}" + (f":{p}" if p else ""), st.sampled_from(["http", "https", "ws"]),
                  hosts, ports),
        st.text(HEADER_CHARS, max_size=40)))
    def prop(origin: str) -> None:
        status, headers, body = preflight(origin)
        sent = origin.strip(" \t")  # what the server sees: HTTP drops the whitespace around a value
        if sent.lower() in own:
            assert status == 204 and headers["access-control-allow-origin"] == sent, (origin, status)
        else:
            assert_refused(status, headers, body, code="origin_not_allowed")
            assert "access-control-allow-origin" not in headers

    prop()
    # DNS rebinding: a foreign name resolved to us sends its own Host and a matching Origin. Allowed
    # origins come from the listen address, so the pair is refused, and nothing is echoed.
    for forged in (f"evil.example:{port}", "evil.example"):
        origin = f"http://{forged}"
        status, headers, body = preflight(origin, host=forged)
        assert_refused(status, headers, body, code="origin_not_allowed")
        assert "access-control-allow-origin" not in headers
        got = request(srv, "POST", "/api/offer", b"{}", {"Origin": origin, "Host": forged,
                                                         "Content-Type": "application/json"})
        assert_refused(*got, code="origin_not_allowed")
    # The scheme counts: this server speaks plain http, so an https page of the same host is another origin.
    assert_refused(*preflight(f"https://127.0.0.1:{port}"), code="origin_not_allowed")
    # The page's own origin works, as the browser sends it (tests/test_web_chromium.py loads the page).
    assert_takes_a_call(srv, origin=f"http://127.0.0.1:{port}")
    assert_takes_a_call(srv, origin="https://app.example.com")


async def test_token_and_origin_are_enforced():
    cfg = ServeConfig(token="s3cret-token", allow_origins=("https://app.example.com",), connect_timeout_s=3.0)
    srv = ServerThread(cfg, EchoSession).start()
    try:
        offer = json.dumps({"sdp": await audio_offer(), "type": "offer"})
        status, text, headers = await post(f"{srv.url}/api/offer", offer)
        assert status == 401 and json.loads(text)["code"] == "unauthorized"
        assert headers.get("WWW-Authenticate") == "Bearer"
        status, _, _ = await post(f"{srv.url}/api/offer", offer, headers={"Authorization": "Bearer wrong"})
        assert status == 401
        status, _, _ = await post(f"{srv.url}/api/offer?token=wrong", offer)
        assert status == 401
        # A page on another site may not drive the API, even with the token.
        status, text, _ = await post(f"{srv.url}/api/offer", offer,
                                     headers={"Authorization": "Bearer s3cret-token", "Origin": "https://evil.example"})
        assert status == 403 and json.loads(text)["code"] == "origin_not_allowed"
        async with aiohttp.ClientSession() as http:
            async with http.options(f"{srv.url}/api/offer", headers={"Origin": "https://app.example.com",
                                                                      "Access-Control-Request-Method": "POST"}) as r:
                assert r.status == 204
                assert r.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
                assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
        assert srv.active() == 0

        ok = RTCClient(srv.url, token="s3cret-token", origin="https://app.example.com")
        await ok.connect()
        await ok.wait_event(lambda e: e["type"] == "session_started", 5)
        await ok.close()
        whip = RTCClient(srv.url, use_whip=True)  # no token
        with pytest.raises(SignallingError) as refused:
            await whip.connect()
        assert refused.value.status == 401
        await whip.close()
        async with aiohttp.ClientSession() as http:
            # The token in the query string, for WHIP tools that cannot set headers.
            async with http.post(f"{srv.url}/whip?token=s3cret-token", data=await audio_offer(),
                                 headers={"Content-Type": "application/sdp"}) as r:
                assert r.status == 201 and r.headers["Location"].startswith("/whip/")
                location = r.headers["Location"]
            async with http.delete(f"{srv.url}{location}") as r:
                assert r.status == 401, "hanging up someone's session needs the token too"
            async with http.delete(f"{srv.url}{location}?token=s3cret-token") as r:
                assert r.status == 200
        await takes_a_call(srv, token="s3cret-token")
    finally:
        srv.stop()


def test_origin_policy_follows_the_listen_address():
    local = OriginPolicy("127.0.0.1", 8080, ())
    assert all(local.allows(o) for o in ("http://127.0.0.1:8080", "http://localhost:8080", "http://[::1]:8080",
                                         "http://LOCALHOST:8080/"))
    assert not any(local.allows(o) for o in ("https://127.0.0.1:8080", "http://127.0.0.1:8081", "http://127.0.0.1",
                                             "http://192.0.2.7:8080", "null", "http://user@127.0.0.1:8080",
                                             "http://127.0.0.1:8080/path"))
    # Every interface: its addresses (re-read when an unknown one asks), never a name it was not given.
    found = {"192.0.2.7", "fd00::2", "127.0.0.1", "::1"}
    every = OriginPolicy("0.0.0.0", 8080, (), addresses=lambda: set(found))
    assert every.allows("http://192.0.2.7:8080") and every.allows("http://localhost:8080")
    assert not every.allows("http://[fd00::2]:8080"), "0.0.0.0 is IPv4 only"
    assert not every.allows("http://mybox.lan:8080") and not every.allows("http://evil.example:8080")
    found.add("198.51.100.4")  # a new lease
    every._read_at -= OriginPolicy.REFRESH_S + 1
    assert every.allows("http://198.51.100.4:8080")
    assert OriginPolicy("::", 8080, (), addresses=lambda: set(found)).allows("http://[fd00::2]:8080")
    named = OriginPolicy("mybox.lan", 8080, ("https://app.example.com",))
    assert named.allows("http://mybox.lan:8080") and named.allows("https://app.example.com:443")
    assert not named.allows("http://localhost:8080") and not named.allows("http://app.example.com")
    assert OriginPolicy("127.0.0.1", 8080, ("*",)).allows("https://anything.example")
    with pytest.raises(ConfigError, match="allow-origin"):
        ServeConfig(allow_origins=("app.example.com",))


# --- regressions: unconnected offers may not starve real callers ----------------------------------------


async def test_unconnected_offers_from_one_address_are_limited():
    cfg = ServeConfig(max_sessions=3, max_pending_per_client=1, connect_timeout_s=2.0)
    srv = ServerThread(cfg, EchoSession).start()
    try:
        status, _, _ = await post(f"{srv.url}/whip", await dead_offer(), "application/sdp")
        assert status == 201 and srv.active() == 1
        status, text, headers = await post(f"{srv.url}/whip", await audio_offer(), "application/sdp")
        assert status == 429 and json.loads(text)["code"] == "too_many_pending", text
        assert 1 <= int(headers["Retry-After"]) <= 2
        # Another address is not held back, and its call is real.
        await takes_a_call(srv, source_address="127.0.0.2")
        # The unconnected offer is dropped at the connect deadline, not the media timeout.
        assert await wait_until(lambda: srv.active() == 0, 6)
        assert any(r == "not connected within 2 s" for _, r in srv.ended()), srv.ended()
        await takes_a_call(srv)  # the address may call again
    finally:
        srv.stop()


async def test_offers_that_never_connect_give_their_slots_to_real_callers():
    # The defaults' shape: two slots, one unconnected offer per address; the attacker uses two addresses.
    srv = ServerThread(ServeConfig(max_sessions=2, connect_timeout_s=8.0), EchoSession).start()
    stale = srv.call(lambda: srv.server.slots.stale_after_s)
    try:
        for source in ("127.0.0.3", "127.0.0.4"):
            status, _, _ = await post(f"{srv.url}/whip", await dead_offer(), "application/sdp", source_address=source)
            assert status == 201
        # Fresh offers may be callers about to connect: a newcomer waits (503) rather than evicting them.
        early = RTCClient(srv.url, source_address="127.0.0.2")
        with pytest.raises(SignallingError) as busy:
            await early.connect()
        await early.close()
        assert busy.value.status == 503
        await asyncio.sleep(stale + 0.3)
        caller = RTCClient(srv.url, source_address="127.0.0.2")
        await caller.connect()  # takes the oldest unconnected offer's slot
        try:
            await caller.wait_event(lambda e: e["type"] == "session_started", 10)
            assert any("slot given to a new offer" in r for _, r in srv.ended()), srv.ended()
            # The attacker comes back, again and again: it only ever displaces its own stale offers.
            for source in ("127.0.0.6", "127.0.0.7"):
                await asyncio.sleep(stale + 0.3)
                status, _, _ = await post(f"{srv.url}/whip", await dead_offer(), "application/sdp",
                                          source_address=source)
                assert status == 201
                assert srv.active() == 2
            assert (await caller.control("status"))["ok"] is True, "a connected caller is never displaced"
        finally:
            await caller.close()
        await asyncio.sleep(stale + 0.3)
        await takes_a_call(srv, source_address="127.0.0.5")  # and the next caller gets in too
    finally:
        srv.stop()


def test_slots_account_for_every_path():
    slots = Slots(max_sessions=2, max_pending_per_client=1, connect_timeout_s=10.0)
    a = slots.take("10.0.0.1")
    with pytest.raises(OfferError) as refused:
        slots.take("10.0.0.1")
    assert refused.value.status == 429
    b = slots.take("10.0.0.2")
    with pytest.raises(OfferError) as full:
        slots.take("10.0.0.3")
    assert full.value.status == 503
    slots.connected(a)
    assert slots.pending("10.0.0.1") == 0 and slots.admitted == 2
    slots.release(a)
    slots.release(a)  # idempotent: every cleanup path may release
    slots.release(b)
    assert slots.admitted == 0 and slots.pending() == 0 and slots.stale() == []


async def test_capacity_limit_answers_503_and_frees_slots():
    srv = ServerThread(ServeConfig(max_sessions=1, connect_timeout_s=3.0), EchoSession).start()
    try:
        first = RTCClient(srv.url)
        await first.connect()
        second = RTCClient(srv.url)
        with pytest.raises(SignallingError) as busy:
            await second.connect()
        assert busy.value.status == 503 and busy.value.body["code"] == "busy"
        await second.close()
        assert await first.hang_up() == 200
        await first.close()
        await takes_a_call(srv)
    finally:
        srv.stop()


async def test_a_session_that_cannot_start_gives_500_and_frees_its_slot():
    def broken(transport, peer_id):
        raise RuntimeError("no models")

    srv = ServerThread(ServeConfig(max_sessions=1), broken).start()
    try:
        status, text, _ = await post(f"{srv.url}/api/offer", json.dumps({"sdp": await audio_offer(), "type": "offer"}))
        assert status == 500 and json.loads(text)["code"] == "session_failed"
        assert srv.active() == 0
    finally:
        srv.stop()
