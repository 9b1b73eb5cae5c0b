"""Who may make an offer, and when? Origins, the token, the body, session slots and unconnected offers.

Every refusal is an `OfferError` carrying its HTTP status, a short code and a message for a person;
the server turns it into a JSON error.

Origins. A browser page may call the API only from an allowed origin (scheme://host:port, all three
compared). Allowed are the origins given with --allow-origin ("*": any) and the server's own, which
come from the address it listens on, never from the request's Host header (a forged or rebound Host
is how DNS rebinding gets a foreign page into a local server):

  - bound to a loopback address: http://localhost:PORT, http://127.0.0.1:PORT, http://[::1]:PORT;
  - bound to every interface (0.0.0.0, or :: for IPv6 as well): http://<address>:PORT for every
    address of the machine's interfaces (re-read when an unknown address asks, so a new DHCP lease
    is picked up), plus the loopback names. A page reached through a host *name* (mybox.lan, or the
    https:// name of a TLS proxy in front) must be listed with --allow-origin;
  - bound to one address or name: http://<that>:PORT.

The server itself speaks plain HTTP, so its own origins are http:// only; https://… is always an
explicit --allow-origin. Requests without an Origin header (non-browser clients) are not
origin-checked: only browsers send it, and only browsers can be made to call us by a foreign page.

Slots. `Slots` counts the sessions (negotiating or running, up to --max-sessions) and, per client
address, the offers answered but not connected yet (up to --max-pending-per-client). An offer that
never connects therefore holds a slot for at most --connect-timeout and one address cannot hold
more than its share of those; when every slot is taken, the server drops the oldest offer that has
been unconnected for longer than a real caller needs (`Slots.stale`) to make room. Behind a reverse
proxy every caller has the proxy's address: raise --max-pending-per-client there.
"""
from __future__ import annotations

import hmac
import ipaddress
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from aiohttp import web

from rejoinder.errors import ConfigError, RejoinderError

log = logging.getLogger("rejoinder.streaming.admission")

__all__ = ["OfferError", "Origin", "OriginPolicy", "Slots", "Ticket", "check_token", "parse_origin", "read_body"]


class OfferError(RejoinderError):
    """A request the server refuses, with its HTTP status and a message for the client."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


# --- origins -------------------------------------------------------------------------------------------

_DEFAULT_PORTS = {"http": 80, "https": 443}
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_WILDCARDS = ("", "0.0.0.0", "::")


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str  # lower case; an IP address in its canonical form, IPv6 without brackets
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def _canonical_host(host: str) -> str:
    host = host.strip().lower().strip("[]")
    try:
        return str(ipaddress.ip_address(host.split("%")[0]))
    except ValueError:
        return host.rstrip(".")


def parse_origin(text: str) -> Origin | None:
    """An Origin header value (or --allow-origin entry) as (scheme, host, port); None if it is not one."""
    if not text or len(text) > 512 or any(c.isspace() for c in text):
        return None
    try:
        parts = urlsplit(text.rstrip("/"))
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname or parts.username is not None or parts.password is not None:
        return None
    if parts.path or parts.query or parts.fragment:
        return None
    return Origin(scheme, _canonical_host(parts.hostname), port if port is not None else _DEFAULT_PORTS[scheme])


def interface_addresses() -> set[str]:
    """Every address of this machine's network interfaces (IPv4 and IPv6, canonical form)."""
    try:
        import ifaddr  # aioice's own dependency: there whenever aiortc is
    except ImportError:  # pragma: no cover - aiortc always brings it
        return set(_LOOPBACK_NAMES)
    out: set[str] = set()
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            addr = ip.ip[0] if isinstance(ip.ip, tuple) else ip.ip
            out.add(_canonical_host(addr))
    return out


class OriginPolicy:
    """Which browser origins may call the API: the explicit list, and the server's own listen address."""

    REFRESH_S = 5.0  # at most this often, an unknown address re-reads the interfaces

    def __init__(self, bind_host: str, port: int, allow: Sequence[str],
                 addresses: Callable[[], Iterable[str]] = interface_addresses) -> None:
        self.any = "*" in allow
        self.explicit: set[Origin] = set()
        for entry in allow:
            if entry == "*":
                continue
            o = parse_origin(entry)
            if o is None:
                raise ConfigError(f"--allow-origin {entry!r} is not an origin like https://app.example.com[:port]")
            self.explicit.add(o)
        self.port = port
        host = _canonical_host(bind_host)
        self.wildcard = host in _WILDCARDS
        self.ipv6 = host == "::"
        self._addresses = addresses
        self._read_at = -math.inf
        own: set[str] = set()
        if self.wildcard or _is_loopback(host):
            own.update(_LOOPBACK_NAMES)
        if not self.wildcard:
            own.add(host)
        self._own_hosts = own
        self._interfaces: set[str] = set()
        if self.wildcard:
            self._refresh()

    def _refresh(self) -> None:
        self._read_at = time.monotonic()
        found = {a for a in self._addresses() if self.ipv6 or ":" not in a}
        self._interfaces = {a for a in found if not a.startswith("fe80:")}  # link-local needs a zone: not a URL

    def own_origins(self) -> set[Origin]:
        return {Origin("http", h, self.port) for h in self._own_hosts | self._interfaces}

    def allows(self, origin: str) -> bool:
        if self.any:
            return True
        o = parse_origin(origin)
        if o is None:
            return False
        if o in self.explicit:
            return True
        if o.scheme != "http" or o.port != self.port:
            return False
        if o.host in self._own_hosts or o.host in self._interfaces:
            return True
        if self.wildcard and _is_ip(o.host) and time.monotonic() - self._read_at > self.REFRESH_S:
            self._refresh()
            return o.host in self._interfaces
        return False


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- token and body ------------------------------------------------------------------------------------


def check_token(request: web.Request, token: str) -> None:
    """The shared secret, as `Authorization: Bearer …` or `?token=…` (constant-time compare)."""
    if not token:
        return
    given = ""
    auth = request.headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    elif "token" in request.query:
        given = request.query["token"]
    if not given or not hmac.compare_digest(given.encode("utf-8", "replace"), token.encode()):
        raise OfferError(401, "unauthorized", "missing or wrong access token", {"WWW-Authenticate": "Bearer"})


async def read_body(request: web.Request, limit: int) -> str:
    """The body as text: at most `limit` bytes (413 beyond, also for chunked bodies), UTF-8 (400 if not)."""
    if request.content_length is not None and request.content_length > limit:
        raise OfferError(413, "body_too_large", f"request body over {limit} bytes")
    parts: list[bytes] = []
    size = 0
    while chunk := await request.content.read(limit + 1 - size):
        parts.append(chunk)
        size += len(chunk)
        if size > limit:
            raise OfferError(413, "body_too_large", f"request body over {limit} bytes")
    try:
        return b"".join(parts).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OfferError(400, "bad_encoding", f"request body is not UTF-8 (byte {exc.start})") from None


# --- slots ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Ticket:
    """One admitted offer's claim on a slot; `pending` until its peer connects."""

    client: str
    pending: bool = True
    released: bool = False
    taken_at: float = field(default_factory=time.monotonic)


class Slots:
    """Session slots, and the unconnected offers each client address holds."""

    def __init__(self, max_sessions: int, max_pending_per_client: int, connect_timeout_s: float) -> None:
        self.max_sessions = max_sessions
        self.max_pending_per_client = max_pending_per_client
        self.connect_timeout_s = connect_timeout_s
        # An offer unconnected for longer than this is not a caller about to arrive: its slot may be
        # given to a new offer when all are taken. ICE + DTLS between reachable peers take well under
        # a second; a few seconds leaves room for a slow network and a loaded server.
        self.stale_after_s = min(3.0, connect_timeout_s / 2)
        self.admitted = 0
        self._pending: Counter[str] = Counter()
        self._tickets: list[Ticket] = []  # pending ones, oldest first

    def take(self, client: str) -> Ticket:
        """A slot for an offer from `client`; OfferError 429 (its unconnected offers) or 503 (full)."""
        if self._pending[client] >= self.max_pending_per_client:
            oldest = min(t.taken_at for t in self._tickets if t.client == client)
            wait = max(1, math.ceil(oldest + self.connect_timeout_s - time.monotonic()))
            n = self._pending[client]
            raise OfferError(
                429, "too_many_pending",
                f"{n} offer{'s' if n != 1 else ''} from this address {'have' if n != 1 else 'has'} not connected yet "
                f"(at most {self.max_pending_per_client}); connect or hang up first, or retry in {wait} s",
                {"Retry-After": str(wait)})
        if self.admitted >= self.max_sessions:
            raise OfferError(503, "busy", f"all {self.max_sessions} session slots are in use; try again later",
                             {"Retry-After": "10"})
        self.admitted += 1
        self._pending[client] += 1
        ticket = Ticket(client)
        self._tickets.append(ticket)
        return ticket

    def connected(self, ticket: Ticket) -> None:
        """Its peer is up: it no longer counts against its client's unconnected offers."""
        if ticket.pending and not ticket.released:
            ticket.pending = False
            self._forget_pending(ticket)

    def release(self, ticket: Ticket) -> None:
        """The slot is free again (idempotent)."""
        if ticket.released:
            return
        ticket.released = True
        self.admitted -= 1
        if ticket.pending:
            ticket.pending = False
            self._forget_pending(ticket)

    def _forget_pending(self, ticket: Ticket) -> None:
        self._pending[ticket.client] -= 1
        if self._pending[ticket.client] <= 0:
            del self._pending[ticket.client]
        self._tickets.remove(ticket)

    def pending(self, client: str | None = None) -> int:
        return sum(self._pending.values()) if client is None else self._pending[client]

    def stale(self) -> list[Ticket]:
        """Tickets unconnected for longer than `stale_after_s`, oldest first."""
        now = time.monotonic()
        return [t for t in self._tickets if now - t.taken_at > self.stale_after_s]
