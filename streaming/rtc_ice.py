"""Which addresses may WebRTC use? ICE host candidates restricted to a chosen set (the loopback in tests).

aioice gathers host candidates from every interface address except 127.0.0.1 and has no
per-connection setting for it, so the choice is process-wide (DESIGN.md, "Network in tests").
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("rejoinder.streaming.rtc_ice")

__all__ = ["restrict_ice_hosts"]


def restrict_ice_hosts(hosts: Sequence[str] | None) -> None:
    """Use only `hosts` for ICE, for every peer connection of this process.

    Both ends of every candidate pair: only these addresses are offered as host candidates, and
    connectivity checks (STUN) arriving from any other address are ignored, so a peer on the same
    machine that also gathers its other interface addresses (a browser) can only pair over these.
    aioice gathers host candidates from every interface address except 127.0.0.1 and has no
    per-connection setting for it, so the choice is process-wide: tests, benchmarks and load suites
    give ("127.0.0.1",) to keep all media on the loopback; `None` or () restores aioice's defaults.
    """
    import aioice.ice

    state = aioice.ice.__dict__.setdefault("_rejoinder_originals", {
        "hosts": aioice.ice.get_host_addresses, "received": aioice.ice.StunProtocol.datagram_received})
    if not hosts:
        aioice.ice.get_host_addresses = state["hosts"]
        aioice.ice.StunProtocol.datagram_received = state["received"]
        return
    chosen = [h for h in dict.fromkeys(hosts) if h]
    allowed = frozenset(chosen)
    received = state["received"]

    def host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [h for h in chosen if (":" in h and use_ipv6) or (":" not in h and use_ipv4)]

    def datagram_received(self: Any, data: bytes | str, addr: tuple[Any, ...]) -> None:
        if addr[0] in allowed:
            received(self, data, addr)

    aioice.ice.get_host_addresses = host_addresses
    aioice.ice.StunProtocol.datagram_received = datagram_received
    log.info("ICE restricted to %s", ", ".join(chosen))
