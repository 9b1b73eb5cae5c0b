"""How do received RTP audio packets become frames without waiting? The receive-side jitter buffer.

aiortc's audio receiver holds every packet until four more have arrived (`JitterBuffer(capacity=16,
prefetch=4)`): 80-100 ms added to everything a peer says, and it buys nothing: that buffer only
puts packets back in order, it does not smooth their timing. A server feeds a VAD and a recogniser,
which need no smooth timeline, and the test caller records what arrives. Here an Opus packet is one
frame (always, for audio), so an in-order packet is released the moment it arrives; a gap (lost
packets) is skipped at once rather than waited for; a packet older than the last one released is
late and dropped (it would be out of place in the stream). `depth` > 0 keeps aiortc's behaviour
with that prefetch (for comparisons, or a network that really reorders).

Every packet's arrival and release is stamped (`time.monotonic()`), by RTP timestamp relative to
the stream's first frame: the same number aiortc gives the decoded frame as its `pts`.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any

from aiortc.jitterbuffer import JitterBuffer, JitterFrame

log = logging.getLogger("rejoinder.streaming.rtc_jitter")

__all__ = ["AudioJitterBuffer", "install_jitter_buffer"]

MAX_MISORDER = 100  # as aiortc: a packet this far "behind" means the sender restarted its sequence
_STAMPS = 256


class AudioJitterBuffer(JitterBuffer):
    """An aiortc jitter buffer for one audio stream; `depth=0` releases in-order packets at once."""

    def __init__(self, depth: int = 0) -> None:
        super().__init__(capacity=16, prefetch=max(0, depth))
        self.depth = max(0, depth)
        self.packets = 0
        self.late = 0
        self.lost = 0
        self._next_seq: int | None = None
        self._ts_origin: int | None = None  # raw RTP timestamp of the first released frame
        self._arrived: OrderedDict[int, float] = OrderedDict()  # raw timestamp -> arrival
        self._stamps: OrderedDict[int, tuple[float, float]] = OrderedDict()  # pts -> (arrived, released)

    def add(self, packet: Any) -> tuple[bool, JitterFrame | None]:
        now = time.monotonic()
        self.packets += 1
        self._arrived[packet.timestamp] = now
        while len(self._arrived) > _STAMPS:
            self._arrived.popitem(last=False)
        if self.depth:
            pli, frame = super().add(packet)
        else:
            pli, frame = False, self._add_now(packet)
        if frame is not None:
            self._stamp(frame.timestamp, now)
        return pli, frame

    def _add_now(self, packet: Any) -> JitterFrame | None:
        seq = packet.sequence_number
        data = getattr(packet, "_data", b"")  # aiortc depayloads before add()
        if self._next_seq is not None:
            ahead = (seq - self._next_seq) & 0xFFFF
            if ahead >= 0x8000:  # behind what was already released
                if (self._next_seq - seq) & 0xFFFF <= MAX_MISORDER:
                    self.late += 1
                    return None
            else:
                self.lost += ahead
        self._next_seq = (seq + 1) & 0xFFFF
        if not data:
            return None
        return JitterFrame(data=data, timestamp=packet.timestamp)

    def _stamp(self, raw_ts: int, released: float) -> None:
        if self._ts_origin is None:
            self._ts_origin = raw_ts
        arrived = self._arrived.pop(raw_ts, released)
        self._stamps[self.pts(raw_ts)] = (arrived, released)
        while len(self._stamps) > _STAMPS:
            self._stamps.popitem(last=False)

    def pts(self, raw_ts: int) -> int:
        """The pts aiortc gives the decoded frame of RTP timestamp `raw_ts` (its TimestampMapper)."""
        return (raw_ts - (self._ts_origin or 0)) & 0xFFFFFFFF

    def stamps(self, pts: int) -> tuple[float, float] | None:
        """(arrived, released) of the frame whose decoded pts is `pts`, if still remembered."""
        return self._stamps.pop(pts & 0xFFFFFFFF, None)


def install_jitter_buffer(pc: Any, track: Any, depth: int | None) -> AudioJitterBuffer | None:
    """Give the receiver of `track` an `AudioJitterBuffer(depth)`, before any packet arrives.

    `depth=None` keeps aiortc's own buffer (then no stamps). aiortc has no public setting for this;
    the receiver's buffer attribute is replaced, and if a future aiortc renames it, aiortc's own
    buffer stays (logged) and only the stamps are missing.
    """
    if depth is None:
        return None
    for transceiver in pc.getTransceivers():
        receiver = transceiver.receiver
        if getattr(receiver, "_track", None) is track:
            attr = "_RTCRtpReceiver__jitter_buffer"
            if not isinstance(getattr(receiver, attr, None), JitterBuffer):
                log.warning("aiortc's receiver has no %s; keeping its own jitter buffer", attr)
                return None
            buf = AudioJitterBuffer(depth)
            setattr(receiver, attr, buf)
            return buf
    log.warning("no receiver found for the incoming track; keeping aiortc's jitter buffer")
    return None
