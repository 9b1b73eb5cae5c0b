"""How a WebRTC peer's transport behaves: its timeouts, the send reserve and queue, the data
channel's bounds, the receive-side jitter buffer (`WebRTCOptions`), and the frame it sends."""
from __future__ import annotations

from dataclasses import dataclass

from .rtc_audio import RTC_RATE

__all__ = ["FRAME_MS", "FRAME_SAMPLES", "WebRTCOptions"]

FRAME_MS = 20
FRAME_SAMPLES = RTC_RATE * FRAME_MS // 1000


@dataclass(frozen=True)
class WebRTCOptions:
    # Inbound audio silent for this long (after the first frame) means the peer vanished.
    media_timeout_s: float = 20.0
    # How long audio_in() waits for the first inbound frame (ICE + DTLS + first RTP).
    first_media_timeout_s: float = 30.0
    # Speech the session hands to the outgoing track ahead of its slot (the playout's lead): the
    # encoder pulls a frame every 20 ms, and one not there in time is a hole mid-word. On a loaded
    # 2-core box the playout's wake-ups run 20-60 ms late now and then (bench/cpu_pressure.py); the
    # reserve rides that out. It is taken back unsent at a barge-in (recall_audio), so it costs no
    # reaction time, and adds its length to the first audio of an answer at most.
    send_reserve_s: float = 0.06
    # Speech frames held in the outgoing track (the reserve and room for a catch-up burst);
    # send_audio waits for room beyond that.
    max_queued_frames: int = 6
    # While speaking, how long past its slot a frame may arrive before silence is sent instead.
    # A full frame: the playout's wake-ups on a busy 2-core box run late by more than 12 ms about
    # once every 8 s (an audible gap each time); at 20 ms none were seen.
    late_frame_grace_s: float = 0.02
    # Events kept while the data channel is not open yet (oldest dropped beyond that).
    max_pending_events: int = 256
    # A peer that stops reading its data channel must not make us buffer without end.
    max_channel_buffered_bytes: int = 1 << 20
    # Data channel messages larger than this are ignored (a control message is tiny).
    max_message_bytes: int = 16 << 10
    # Received packets held back before decoding: 0 releases each in-order packet at once (a VAD
    # needs no smoothed timeline); None keeps aiortc's own buffer (4 packets, 80-100 ms).
    receive_jitter_packets: int | None = 0

    def __post_init__(self) -> None:
        reserve = round(self.send_reserve_s * 1000 / FRAME_MS)
        if not 0 <= self.send_reserve_s <= 0.2 or self.max_queued_frames < reserve + 1:
            raise ValueError("need 0 <= send_reserve_s <= 0.2 s and max_queued_frames above the reserve's frames")
