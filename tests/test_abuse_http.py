"""`rejoinder serve`'s HTTP surface under hostile input: every refusal is a 4xx JSON error, never a 5xx
or a hang, and the server takes a real call afterwards.

Property-based (hypothesis, bounded examples so the module runs in about a minute): a valid offer
mutated line by line, random bytes and content types, random JSON, truncated and oversized bodies,
random paths and methods. Around them, the regression tests of the defects found on main: an offer
with two data-channel sections (aiortc's "Media sections in answer do not match offer" became a
500), a malformed m= line reported as a bare AssertionError, JSON nested deeper than the parser
recurses (a 500). Tokens, origins and unconnected offers: test_abuse_admission.py. The stand-in agent
(`EchoSession`) answers the calls; the real agent's call is in test_abuse_channel.py.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import logging
import re
import urllib.parse

import pytest
from abuse_helpers import (
    assert_healthy,
    assert_refused,
    assert_takes_a_call,
    fuzz,
    hang_up_if_answered,
    request,
    takes_a_call,
)
from aiortc import RTCConfiguration, RTCPeerConnection
from hypothesis import given
from hypothesis import strategies as st
from webrtc_client import EchoSession, ServerThread, audio_offer, post

from rejoinder.streaming.signalling import OfferError, ServeConfig, validate_offer


@pytest.fixture(scope="module")
def fuzz_server():
    # Room for every mutated offer that stays valid (each is hung up at once).
    srv = ServerThread(ServeConfig(max_sessions=32, max_pending_per_client=32, connect_timeout_s=3.0,
                                   media_timeout_s=3.0, token="", allow_origins=("https://app.example.com",)),
                       EchoSession).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def base_offer(fuzz_server) -> str:
    return asyncio.run(audio_offer())



# --- property-based: SDP, bodies, JSON, tokens, origins, paths ---------------------------------------

_TOKENS = ["0", "-1", "65536", "x", "", " ", "IN IP4 127.0.0.1", "IN IP6 ::1", "UDP/TLS/RTP/SAVPF", "111",
           "webrtc-datachannel", "opus/48000/2", ":", "/", "sha-256", "\x00", "é", "9" * 40, "actpass", "sendonly"]
_LINES = ["m=application 9 UDP/DTLS/SCTP webrtc-datachannel", "m=audio 9 UDP/TLS/RTP/SAVPF 111",
          "m=video 9 UDP/TLS/RTP/SAVPF 96", "m=audio x y", "a=mid:1", "a=mid:0", "a=setup:active", "a=rtcp-mux",
          "a=sendrecv", "a=recvonly", "c=IN IP4 0.0.0.0", "a=candidate:1 1 udp 1 127.0.0.1 9 typ host",
          "a=group:BUNDLE 0 1", "a=msid:- x", "a=fingerprint:sha-256 00", "a=ice-ufrag:abcd", "a=ice-pwd:" + "x" * 22,
          "a=sctp-port:5000", "a=max-message-size:0", "a=rtpmap:111 opus/48000/2", "a=fmtp:111 minptime=x",
          "a=ssrc:1 cname:x", "a=extmap:1 urn:x", "a=rtcp:9 IN IP4 0.0.0.0"]
_IDX = st.integers(0, 10**6)
_MUTATION = st.one_of(
    st.tuples(st.just("delete"), _IDX),
    st.tuples(st.just("duplicate"), _IDX, _IDX),
    st.tuples(st.just("insert"), _IDX, st.sampled_from(_LINES) | st.text(max_size=40)),
    st.tuples(st.just("token"), _IDX, st.integers(0, 12), st.sampled_from(_TOKENS) | st.text(max_size=12)),
    st.tuples(st.just("truncate"), _IDX, st.integers(0, 120)),
    st.tuples(st.just("repeat_data_section"), st.integers(1, 3)),
)


def mutate(sdp: str, mutations: list[tuple]) -> str:
    lines = sdp.strip().split("\r\n")
    for op, *a in mutations:
        i = a[0] % len(lines) if op != "repeat_data_section" else 0
        if op == "delete" and len(lines) > 1:
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, lines[a[1] % len(lines)])
        elif op == "insert":
            lines.insert(i, a[1])
        elif op == "token":
            sep = ":" if lines[i].startswith("a=") and a[1] % 2 else " "
            parts = lines[i].split(sep)
            parts[a[1] % len(parts)] = a[2]
            lines[i] = sep.join(parts)
        elif op == "truncate":
            lines[i] = lines[i][: a[1]]
        elif op == "repeat_data_section":  # the defect: audio + two or more m=application sections
            start = next((k for k, ln in enumerate(lines) if ln.startswith("m=application")), None)
            if start is not None:
                section = lines[start:]
                for n in range(a[0]):
                    lines += [ln.replace("a=mid:1", f"a=mid:{n + 2}") for ln in section]
    return "\r\n".join(lines) + "\r\n"


def test_mutated_offers_are_refused_with_json_never_a_500(fuzz_server, base_offer):
    srv = fuzz_server

    @fuzz(300)
    @given(st.lists(_MUTATION, min_size=1, max_size=4), st.booleans())
    def prop(mutations: list[tuple], whip: bool) -> None:
        sdp = mutate(base_offer, mutations)
        if whip:
            got = request(srv, "POST", "/whip", sdp.encode("utf-8", "surrogatepass"),
                          {"Content-Type": "application/sdp"})
        else:
            got = request(srv, "POST", "/api/offer", json.dumps({"sdp": sdp, "type": "offer"}).encode(),
                          {"Content-Type": "application/json"})
        if got[0] in (200, 201):
            hang_up_if_answered(srv, *got)
        else:
            assert_refused(*got)

    prop()
    assert_healthy(srv)
    assert_takes_a_call(srv)


_CTYPES = ["application/json", "application/sdp", "text/plain", "", "application/json; charset=utf-16",
           "multipart/form-data; boundary=x", "application/sdp; q=1", "APPLICATION/SDP",
           "application/x-www-form-urlencoded"]


def test_random_bodies_and_content_types_are_refused(fuzz_server, base_offer):
    srv = fuzz_server
    good = json.dumps({"sdp": base_offer, "type": "offer"}).encode()

    @fuzz(150)
    @given(st.one_of(st.binary(max_size=3000), st.text(max_size=3000).map(lambda t: t.encode("utf-8", "surrogatepass")),
                     st.integers(0, len(good) - 1).map(lambda n: good[:n]),  # truncated JSON offer
                     st.integers(0, len(base_offer) - 1).map(lambda n: base_offer[:n].encode())),  # truncated SDP
           st.sampled_from(["/api/offer", "/whip"]), st.sampled_from(_CTYPES))
    def prop(body: bytes, path: str, ctype: str) -> None:
        got = request(srv, "POST", path, body, {"Content-Type": ctype} if ctype else {})
        if got[0] in (200, 201):
            hang_up_if_answered(srv, *got)
        else:
            assert_refused(*got)

    prop()
    assert_healthy(srv)
    assert_takes_a_call(srv)


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                     max_leaves=12)


def test_random_json_is_refused(fuzz_server):
    srv = fuzz_server

    @fuzz(150)
    @given(st.one_of(_JSON, st.fixed_dictionaries({"sdp": _JSON | st.text(max_size=200), "type": _JSON})))
    def prop(doc: object) -> None:
        got = request(srv, "POST", "/api/offer", json.dumps(doc).encode(), {"Content-Type": "application/json"})
        assert_refused(*got)

    prop()
    specials = {
        b"[" * 60_000: "bad_json",  # deeper than the JSON parser recurses (was: RecursionError, a 500)
        b'{"sdp": NaN, "type": "offer"}': "bad_json",
        b'{"sdp": "v=0\\ud800", "type": "offer"}': "bad_sdp",  # a lone surrogate inside the SDP
        "\ufeff{}".encode("utf-16"): "bad_encoding",
        b"\xff\xfe\xfa": "bad_encoding",
    }
    for body, code in specials.items():
        assert_refused(*request(srv, "POST", "/api/offer", body, {"Content-Type": "application/json"}), code=code)
    assert_takes_a_call(srv)


def test_huge_and_chunked_bodies_are_refused_with_413(fuzz_server):
    srv = fuzz_server
    huge = json.dumps({"sdp": "v=0\r\n" + "a=x\r\n" * 300_000, "type": "offer"}).encode()
    assert_refused(*request(srv, "POST", "/api/offer", huge, {"Content-Type": "application/json"}),
                   code="body_too_large")

    def chunks():  # no Content-Length: the limit must hold for streamed bodies too
        for _ in range(200):
            yield b"a=x" * 1000

    conn = http.client.HTTPConnection("127.0.0.1", srv.cfg.port, timeout=15)
    try:
        conn.request("POST", "/whip", body=chunks(), headers={"Content-Type": "application/sdp"},
                     encode_chunked=True)
        r = conn.getresponse()
        assert_refused(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read(), code="body_too_large")
    finally:
        conn.close()
    assert_healthy(srv)
    assert_takes_a_call(srv)


def test_random_paths_and_methods_answer_json(fuzz_server):
    srv = fuzz_server

    @fuzz(100)
    @given(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
           st.sampled_from(["/api/offer", "/whip", "/whip/x", "/api/health", "/api", "/whip/../api"]) |
           st.text(max_size=30).map(lambda t: "/" + urllib.parse.quote(t)))
    def prop(method: str, path: str) -> None:
        status, headers, body = request(srv, method, path, b"{}", {"Content-Type": "application/json"})
        assert status < 500, (method, path, status, body[:200])
        if status >= 400:
            assert_refused(status, headers, body)

    prop()
    assert_takes_a_call(srv)


# --- regressions: offers aiortc cannot answer ---------------------------------------------------------


async def test_two_data_channel_sections_are_a_400_not_a_500(fuzz_server):
    srv = fuzz_server
    sdp = mutate(await audio_offer(), [("repeat_data_section", 1)])
    assert sdp.count("m=application") == 2
    status, text, _ = await post(f"{srv.url}/api/offer", json.dumps({"sdp": sdp, "type": "offer"}))
    assert status == 400 and json.loads(text)["code"] == "unsupported_media", text
    assert "application" in json.loads(text)["error"]
    status, text, _ = await post(f"{srv.url}/whip", sdp, "application/sdp")
    assert status == 400 and json.loads(text)["code"] == "unsupported_media", text
    # What aiortc itself refuses while answering is the offer's fault too: a 400 naming aiortc's reason.
    ticket = srv.call(lambda: srv.server.slots.take("test"))
    with pytest.raises(OfferError) as refused:
        srv.run(srv.server.answer(sdp, ticket))
    srv.call(lambda: srv.server.slots.release(ticket))
    assert refused.value.status == 400 and "Media sections in answer do not match offer" in refused.value.message
    await takes_a_call(srv)


async def test_malformed_lines_are_named(fuzz_server):
    good = await audio_offer()
    m_line = next(ln for ln in good.splitlines() if ln.startswith("m=audio"))
    cases = {
        good.replace(m_line, "m=audio x y"): r"line \d+ must read 'm=<media> <port> <protocol> <formats>'.*m=audio x y",
        good.replace(m_line, m_line + " x"): r"'x' is not an RTP payload type",
        re.sub(r"a=rtpmap:(\d+) opus/48000/2", r"a=rtpmap:\1", good): r"line \d+ cannot be read: 'a=rtpmap:\d+'",
        good.replace("a=sendrecv", "a=x-nothing"): "sendrecv",
        "hello": "v=0",
        "v=0\r\nthis is not sdp at all\r\n": "is not '<letter>=<value>'",
        good.replace("a=ice-ufrag", "a=x-removed").replace("a=ice-pwd", "a=x-removed2"): "ICE credentials",
        good.replace("opus/48000/2", "speex/16000"): "Opus",
        "": "empty",
    }
    for sdp, pattern in cases.items():
        for path, body, ctype in (("/api/offer", json.dumps({"sdp": sdp, "type": "offer"}), "application/json"),
                                  ("/whip", sdp, "application/sdp")):
            status, text, _ = await post(f"{fuzz_server.url}{path}", body, ctype)
            doc = json.loads(text)
            assert status == 400 and re.search(pattern, doc["error"]), (path, sdp[:40], doc)
            assert "AssertionError" not in doc["error"]
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.createDataChannel("events")
    await pc.setLocalDescription(await pc.createOffer())
    data_only = pc.localDescription.sdp
    await pc.close()
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("audio")
    pc.addTransceiver("video")
    await pc.setLocalDescription(await pc.createOffer())
    with_video = pc.localDescription.sdp
    await pc.close()
    for sdp, code in {data_only: "no_audio", with_video: "unsupported_media",
                      await audio_offer(direction="recvonly"): "bad_direction"}.items():
        status, text, _ = await post(f"{fuzz_server.url}/api/offer", json.dumps({"sdp": sdp, "type": "offer"}))
        assert (status, json.loads(text)["code"]) == (400, code)
    with pytest.raises(OfferError, match="no audio"):
        validate_offer("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n")
    for body in ("{not json", json.dumps({"sdp": good}), json.dumps(["offer"])):
        status, text, _ = await post(f"{fuzz_server.url}/api/offer", body)
        assert status == 400 and json.loads(text)["code"] == "bad_json"
    status, _, _ = await post(f"{fuzz_server.url}/whip", good, "text/plain")
    assert status == 415
    assert fuzz_server.active() == 0, "refused offers must not hold a slot"
    await takes_a_call(fuzz_server)


async def test_our_own_bug_is_a_logged_json_500_and_the_server_goes_on(caplog):
    async def broken(request):
        raise RuntimeError("a bug of ours")

    srv = ServerThread(ServeConfig(), EchoSession, routes=[("GET", "/boom", broken)]).start()
    try:
        with caplog.at_level(logging.ERROR, logger="rejoinder"):
            status, headers, body = await asyncio.to_thread(request, srv, "GET", "/boom")
        assert status == 500 and json.loads(body)["code"] == "internal_error"
        assert "RuntimeError" not in body.decode(), "the client is not shown our internals"
        assert any(r.exc_info and "a bug of ours" in str(r.exc_info[1]) for r in caplog.records), \
            "the traceback must be logged"
        await takes_a_call(srv)
    finally:
        srv.stop()


