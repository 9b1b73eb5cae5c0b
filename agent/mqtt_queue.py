"""What the MQTT bridge keeps while the broker is away, and what it drops first when that is too much.

`_OutQueue` is a bounded FIFO of publishes; when full, the oldest interim (`"final": false`) event
goes first, a later final supersedes it, before anything else. Used by `agent.mqtt`.
"""
from __future__ import annotations

import collections
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["MQTTStats", "is_interim"]


def is_interim(event: Mapping[str, Any]) -> bool:
    """An event a later one supersedes (interim transcript, agent text so far): QoS 0, dropped first."""
    return event.get("final") is False


@dataclass(frozen=True)
class _Out:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    interim: bool


@dataclass
class MQTTStats:
    published: int = 0
    dropped_interims: int = 0
    dropped_other: int = 0
    reconnects: int = 0  # successful connections after the first
    connects: int = 0
    control_received: int = 0
    control_rejected: int = 0
    queued: int = 0
    connected: bool = False


class _OutQueue:
    """Bounded FIFO; when full, the oldest interim goes first, else the oldest event.

    Guarded by a thread lock so publish_event may be called from a worker thread too.
    """

    def __init__(self, limit: int, stats: MQTTStats) -> None:
        self.limit = limit
        self.stats = stats
        self._q: collections.deque[_Out] = collections.deque()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._q)

    def put(self, item: _Out) -> None:
        with self._lock:
            self._q.append(item)
            self._trim()

    def take(self, n: int) -> list[_Out]:
        with self._lock:
            return [self._q.popleft() for _ in range(min(n, len(self._q)))]

    def put_back(self, items: list[_Out]) -> None:
        """Return unacknowledged items to the head, in their original order."""
        with self._lock:
            self._q.extendleft(reversed(items))
            self._trim()

    def _trim(self) -> None:
        while len(self._q) > self.limit:
            for i, o in enumerate(self._q):
                if o.interim:
                    del self._q[i]
                    self.stats.dropped_interims += 1
                    break
            else:
                self._q.popleft()
                self.stats.dropped_other += 1
