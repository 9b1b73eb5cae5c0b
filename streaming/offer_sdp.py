"""Is this SDP a usable audio offer? Refusals that say what is wrong, before aiortc sees the text.

aiortc's parser skips lines it does not understand and fails on others with a bare AssertionError
or IndexError, and its peer connection refuses some well-formed offers only when the answer is
built (two data-channel sections: "Media sections in answer do not match offer"). So the shape is
checked here first, and a parse failure is traced back to the line that caused it.
"""
from __future__ import annotations

import re

from aiortc.rtp import FORBIDDEN_PAYLOAD_TYPES
from aiortc.sdp import SessionDescription

from .admission import OfferError

__all__ = ["validate_offer"]

_SDP_LINE = re.compile(r"^[a-z]=\S.*$|^$")
_MEDIA_LINE = re.compile(r"^m=(?P<kind>[^ ]+) (?P<port>[^ ]+) (?P<proto>[^ ]+)(?P<fmt>( [^ ]+)+)$")
_ICE_CHARS = re.compile(r"^[A-Za-z0-9+/]{1,256}$")  # RFC 8839 ice-char


def _bad(message: str, code: str = "bad_sdp") -> OfferError:
    return OfferError(400, code, message)


def _clip(line: str) -> str:
    return repr(line[:60] + ("…" if len(line) > 60 else ""))


def _check_media_line(n: int, line: str) -> None:
    m = _MEDIA_LINE.match(line)
    if not m:
        raise _bad(f"malformed SDP: line {n} must read 'm=<media> <port> <protocol> <formats>': {_clip(line)}")
    if not m["port"].isdigit() or int(m["port"]) > 65535:
        raise _bad(f"malformed SDP: line {n}: the port {m['port'][:20]!r} is not a number from 0 to 65535")
    if not re.fullmatch(r"[A-Z/]+", m["proto"]):
        raise _bad(f"malformed SDP: line {n}: {m['proto'][:30]!r} is not a transport protocol like UDP/TLS/RTP/SAVPF")
    if m["kind"] in ("audio", "video"):
        for f in m["fmt"].split():
            if not f.isdigit() or int(f) > 127 or int(f) in FORBIDDEN_PAYLOAD_TYPES:
                raise _bad(f"malformed SDP: line {n}: {f[:20]!r} is not an RTP payload type (0-127, not 72-76)")


def _parse_failure(lines: list[str], exc: Exception) -> OfferError:
    """Which line makes aiortc's parser fail: the shortest failing prefix (parsing is line by line)."""
    def fails(k: int) -> bool:
        try:
            SessionDescription.parse("\r\n".join(lines[:k]) + "\r\n")
        except Exception:  # noqa: BLE001 - whatever the bad line provokes
            return True
        return False

    lo, hi = 1, len(lines)  # fails(hi) is known; find the smallest failing prefix
    while lo < hi:
        mid = (lo + hi) // 2
        if fails(mid):
            hi = mid
        else:
            lo = mid + 1
    if fails(hi) and (hi == 1 or not fails(hi - 1)):
        return _bad(f"malformed SDP: line {hi} cannot be read: {_clip(lines[hi - 1])}")
    detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return _bad(f"malformed SDP: it cannot be read ({detail[:120]})")


def validate_offer(sdp: str) -> None:
    """Refuse, with a message a person can act on, what is not a usable audio offer."""
    if not sdp.strip():
        raise _bad("empty SDP offer")
    if not sdp.startswith("v=0"):
        raise _bad("malformed SDP: it must start with 'v=0'")
    try:
        sdp.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _bad(f"malformed SDP: invalid character at offset {exc.start}") from None
    # Exactly the text aiortc will be given: a trailing space on the last line is part of its value.
    lines = sdp.splitlines()
    for n, line in enumerate(lines, 1):
        if not _SDP_LINE.match(line):
            raise _bad(f"malformed SDP: line {n} is not '<letter>=<value>': {_clip(line)}")
        if line.startswith("m="):
            _check_media_line(n, line)
    if not any(line.startswith("o=") for line in lines):
        raise _bad("malformed SDP: the origin line (o=) is missing")
    try:
        desc = SessionDescription.parse(sdp)
    except Exception as exc:  # noqa: BLE001 - the parser raises whatever the bad line provokes
        raise _parse_failure(lines, exc) from None
    kinds = [m.kind for m in desc.media]
    audio = [m for m in desc.media if m.kind == "audio"]
    if not audio:
        raise _bad("the offer has no audio section: add a microphone track", "no_audio")
    if len(audio) > 1 or kinds.count("application") > 1 or any(k not in ("audio", "application") for k in kinds):
        raise _bad(f"expected one audio section and at most one data channel (application) section, got {kinds}",
                   "unsupported_media")
    mids = [m.rtp.muxId for m in desc.media]
    if not all(mids):
        raise _bad("malformed SDP: every media section needs an a=mid line")
    if len(mids) != len(set(mids)):
        raise _bad(f"malformed SDP: two media sections share a mid ({mids})")
    for group in desc.group:
        unknown = [str(i) for i in group.items if i not in mids]
        if unknown:
            raise _bad(f"malformed SDP: a=group:{group.semantic} names mids no section has: {' '.join(unknown)[:60]}")
    m = audio[0]
    if m.direction != "sendrecv":
        got = m.direction or "no direction attribute"
        raise _bad(f"audio must be a=sendrecv (the agent listens and talks), got {got}", "bad_direction")
    if not any(c.mimeType.lower() == "audio/opus" for c in m.rtp.codecs):
        raise _bad("the offer does not include the Opus codec", "no_opus")
    if not m.rtcp_mux:
        raise _bad("malformed SDP: the audio section must multiplex RTCP (a=rtcp-mux)")
    for media in desc.media:
        ice, dtls = media.ice, media.dtls
        if not ice.usernameFragment or not ice.password or not dtls or not dtls.fingerprints:
            raise _bad(f"malformed SDP: ICE credentials, DTLS fingerprint or a=setup missing in the {media.kind} "
                       "section")
        if media.msid is not None and len(media.msid.split()) != 2:
            raise _bad(f"malformed SDP: a=msid must name a stream and a track, got {media.msid[:60]!r}")
        if not _ICE_CHARS.match(ice.usernameFragment) or not _ICE_CHARS.match(ice.password):
            raise _bad("malformed SDP: the ICE username fragment and password may only use A-Z a-z 0-9 + /")
