"""What can `rejoinder serve` be told? `ServeConfig`: where it listens, who may call, how many at
once, how long an offer may take to connect, the media path's knobs; `agent.config` generates the
flags and environment variables from its fields."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rejoinder.errors import ConfigError

from .admission import parse_origin

__all__ = ["ServeConfig", "default_web_dir"]


def default_web_dir() -> Path:
    """The bundled web client: package data of the installed wheel, or the checkout's web/ folder."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("rejoinder.web")  # a namespace package: data files only
    except ModuleNotFoundError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parent.parent / "web"


def _m(help: str, **meta: Any) -> dict[str, Any]:
    return {"help": help, **meta}


@dataclass(frozen=True)
class ServeConfig:
    """The server's settings; `agent.config` generates `rejoinder serve`'s flags from these fields."""

    host: str = field(default="127.0.0.1", metadata=_m("address to bind"))
    port: int = field(default=8080, metadata=_m("TCP port"))
    max_sessions: int = field(default=2, metadata=_m("concurrent conversations; more get HTTP 503"))
    token: str = field(default="", metadata=_m(  # empty: no token needed
        "shared secret clients must send (Bearer or ?token=); prefer the environment variable"))
    # Origins (scheme://host[:port]) a browser page may call the API from, besides the server's own
    # (http:// on the listen address; see admission.py). "*" allows any. Requests without an Origin
    # header (non-browser clients) are not origin-checked.
    allow_origins: tuple[str, ...] = field(default=(), metadata=_m(
        "extra origin allowed to call the API, e.g. https://app.example.com ('*': any); repeatable; "
        "comma-separated in the environment; needed for a host name or a TLS proxy in front",
        flag="--allow-origin", metavar="ORIGIN"))
    max_body_bytes: int = field(default=64 * 1024, metadata=_m("largest accepted request body"))  # offers: 2-8 KB
    # ICE + DTLS between reachable peers take well under a second; an offer that has not connected
    # by then holds a slot for nothing (a scanner, a broken client, a caller that cannot reach us).
    connect_timeout_s: float = field(default=10.0, metadata=_m(
        "seconds for ICE and DTLS to come up after the answer; an offer not connected by then is dropped",
        flag="--connect-timeout", env="REJOINDER_CONNECT_TIMEOUT"))
    max_pending_per_client: int = field(default=1, metadata=_m(
        "answered offers not connected yet that one client address may hold; more get HTTP 429 "
        "(behind a reverse proxy every caller has its address: raise this)"))
    media_timeout_s: float = field(default=20.0, metadata=_m(
        "seconds without audio from a peer before its session ends", flag="--media-timeout",
        env="REJOINDER_MEDIA_TIMEOUT"))
    max_session_minutes: float = field(default=60.0, metadata=_m("longest conversation"))
    web_dir: Path = field(default_factory=default_web_dir, metadata=_m("folder of the web client"))
    # ICE host candidates: empty offers every interface address (aioice's default, what real
    # deployments need); tests and benchmarks give 127.0.0.1 to keep media on the loopback.
    ice_hosts: tuple[str, ...] = field(default=(), metadata=_m(
        "only offer these addresses as ICE host candidates (default: every interface); repeatable",
        flag="--ice-host", metavar="ADDRESS"))
    # Inbound RTP packets held back before decoding. 0: each in-order packet is decoded the moment
    # it arrives (the VAD and recogniser need no smoothed timeline); 4 is aiortc's own buffer
    # (80-100 ms later), for comparison or a network that truly reorders packets.
    receive_jitter_packets: int = field(default=0, metadata=_m(
        "received audio packets held before decoding (0: none; 4: aiortc's default)"))
    # Agent speech handed to the sender ahead of its 20 ms slot, so a loaded CPU's stalls do not
    # leave holes mid-word (taken back at a barge-in: no cost to the reaction time).
    send_reserve_ms: int = field(default=60, metadata=_m(
        "agent audio queued ahead of the sender's clock, riding out CPU stalls (0: none; at most 200)"))

    def __post_init__(self) -> None:
        if self.max_sessions < 1:
            raise ConfigError("--max-sessions must be at least 1")
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port {self.port} is not a TCP port")
        if self.max_body_bytes < 1024:
            raise ConfigError("--max-body-bytes must be at least 1024")
        if not 0 <= self.receive_jitter_packets <= 15:
            raise ConfigError("--receive-jitter-packets must be between 0 and 15")
        if self.max_pending_per_client < 1:
            raise ConfigError("--max-pending-per-client must be at least 1")
        if not 0 <= self.send_reserve_ms <= 200:
            raise ConfigError("--send-reserve-ms must be within 0-200")
        if not 0 < self.connect_timeout_s <= 300:
            raise ConfigError("--connect-timeout must be within 0-300 s")
        for origin in self.allow_origins:
            if origin != "*" and parse_origin(origin) is None:
                raise ConfigError(f"--allow-origin {origin!r} is not an origin like https://app.example.com[:port]")

    @property
    def max_session_s(self) -> float:
        return self.max_session_minutes * 60.0
