"""Which session's tokens does each KV-cache slot hold? Slots, keys and least-recently-used eviction.

The model's static KV cache has `n` slots (`model.KVCache`: [slots, kv heads, max_seq, head_dim]
per layer), each the cache of one token sequence. A caller names its slot by a key -- a session
id; `None` is the default slot shared by every caller that names none -- so a follow-up turn finds
its own prefix and prefills only its new tokens, whatever other sessions ran in between. With more
keys than slots, the least recently used idle slot is handed over (its owner's next turn prefills
from scratch); a slot a sequence is decoding in is never taken. A slot that holds less of a prompt
than another slot does starts from a copy of that one's K/V (`longest_prefix`): a new session's
persona and tool list are prefilled once per engine, not once per session.

Memory: a slot holds K and V for `max_seq` positions of every layer, 2 * layers * kv_heads *
head_dim * max_seq * dtype bytes (SmolLM2-135M, fp32, 2048 positions: 90 MiB; Llama-3.2-1B, bf16,
4096: 128 MiB). The cache is allocated uninitialised, so on a CPU only the pages of positions
actually written become resident.

Only the engine thread (scheduler.py) touches these, so nothing here locks.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from rejoinder.errors import EngineError

SlotKey = str | None  # a session id; None: the default slot
__all__ = ["KVSlots", "Slot", "SlotKey", "common_prefix"]


@dataclass(eq=False)
class Slot:
    index: int  # the cache row (of every layer's K and V) it owns
    key: SlotKey
    ids: list[int] = field(default_factory=list)  # the token ids whose K/V sit at positions 0..len-1
    busy: bool = False  # a sequence is decoding in it: neither evicted nor rewritten by anyone else


class KVSlots:
    """`n` cache slots handed to keys; least recently used idle slots are reassigned first."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._free = list(range(n - 1, -1, -1))  # pop() hands out 0 first
        self._slots: OrderedDict[SlotKey, Slot] = OrderedDict()  # least recently used first
        self.evictions = 0  # slots handed over to another key (its owner's prefix was lost)

    def __len__(self) -> int:
        return self.n

    def find(self, key: SlotKey) -> Slot | None:
        """The key's slot if it has one (no effect on the eviction order)."""
        return self._slots.get(key)

    def can_take(self, key: SlotKey) -> bool:
        """Whether `take(key)` would succeed now."""
        return key in self._slots or bool(self._free) or any(not s.busy for s in self._slots.values())

    def take(self, key: SlotKey) -> Slot:
        """The key's slot, marked most recently used; a free one, or the least recently used idle
        one (emptied), for a key that has none."""
        slot = self._slots.get(key)
        if slot is None:
            if self._free:
                slot = Slot(self._free.pop(), key)
            else:
                victim = next((k for k, s in self._slots.items() if not s.busy), _NONE)
                if victim is _NONE:
                    raise EngineError(f"all {self.n} KV-cache slots are generating; raise kv_slots for more sessions")
                old = self._slots.pop(victim)  # type: ignore[arg-type]
                slot = Slot(old.index, key)
                self.evictions += 1
            self._slots[key] = slot
        self._slots.move_to_end(key)
        return slot

    def forget(self, key: SlotKey) -> None:
        """Free the key's slot (a session ended). A slot still decoding stays until it is done."""
        slot = self._slots.get(key)
        if slot is not None and not slot.busy:
            del self._slots[key]
            self._free.append(slot.index)

    def clear(self) -> None:
        """Forget what every idle slot holds (their next prompts prefill from scratch)."""
        for slot in self._slots.values():
            if not slot.busy:
                slot.ids = []

    def longest_prefix(self, ids: list[int], exclude: Slot) -> tuple[Slot | None, int]:
        """The other slot sharing the longest prefix with `ids` (the same persona and tools, say), and
        how many tokens; a slot decoding is fine (decoding only writes past what it holds)."""
        best, n = None, 0
        for slot in self._slots.values():
            if slot is not exclude:
                k = common_prefix(slot.ids, ids)
                if k > n:
                    best, n = slot, k
        return best, n

    def keys(self) -> list[SlotKey]:
        """Keys holding a slot, least recently used first."""
        return list(self._slots)


_NONE = object()


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
