"""The WebRTC media pieces on their own: the outgoing track, the jitter buffer, frame conversion.

No peer connection (except as a stand-in owner): each piece is driven directly and its output
checked sample by sample.
- `AgentAudioTrack`: real-time pacing, silence between answers, a bounded queue, late frames sent
  rather than replaced by silence, and its RTP clock kept on the wall clock across a stalled loop;
- `AudioJitterBuffer`: in-order packets decoded on arrival, gaps skipped, late packets dropped;
- audio at another rate leaves at once and intact (libswresample, first frame not held back).
"""
from __future__ import annotations

import asyncio
import time

import av
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection

from rejoinder.streaming.rtc_jitter import AudioJitterBuffer
from rejoinder.streaming.webrtc import FRAME_SAMPLES, AgentAudioTrack, WebRTCOptions, av_to_audio_frame


def tone(k: int) -> np.ndarray:
    t = np.arange(FRAME_SAMPLES) + k * FRAME_SAMPLES
    return (np.sin(2 * np.pi * 440 * t / 48_000) * 8000).astype(np.int16)


async def test_track_paces_in_real_time_and_fills_gaps_with_silence():
    track = AgentAudioTrack()
    t0 = time.monotonic()
    frames, handed = [], []
    for _ in range(25):
        frames.append(await track.recv())
        handed.append(time.monotonic())
    elapsed = time.monotonic() - t0
    # 25 frames of 20 ms: the first goes at once, the rest every 20 ms -> 480 ms.
    assert 0.42 <= elapsed <= 0.8, elapsed
    assert all(f.sample_rate == 48_000 and f.samples == FRAME_SAMPLES for f in frames)
    # The RTP clock is the wall clock: each frame's pts says when it left (within a frame; a busy
    # box may make the track skip a slot, never send two for one).
    pts = [f.pts for f in frames]
    assert pts[0] == 0 and all(b - a >= FRAME_SAMPLES and (b - a) % FRAME_SAMPLES == 0 for a, b in zip(pts, pts[1:]))
    assert all(abs(f.pts / 48_000 - (h - t0)) < 0.025 for f, h in zip(frames, handed)), (pts, handed)
    assert all(not np.any(f.to_ndarray()) for f in frames), "nothing queued must mean silence"
    assert track.stats.frames_out_silence == 25
    track.stop()


async def test_track_queue_is_bounded_and_keeps_order():
    track = AgentAudioTrack(WebRTCOptions(max_queued_frames=3, send_reserve_s=0.0))
    for k in range(3):
        await track.put(tone(k))
    # A fourth frame must wait for the encoder to take one: the queue never grows past 3 frames,
    # which bounds how much already-committed speech a barge-in can still be heard over.
    blocked = asyncio.ensure_future(track.put(tone(3)))
    await asyncio.sleep(0.01)
    assert not blocked.done()
    assert track.queued_frames == 3
    first = await track.recv()
    await asyncio.wait_for(blocked, 1.0)
    rest = [await track.recv() for _ in range(3)]
    got = [f.to_ndarray().reshape(-1) for f in [first, *rest]]
    for k, g in enumerate(got):
        np.testing.assert_array_equal(g, tone(k))
    track.stop()


async def test_track_drops_oldest_when_nobody_pulls():
    # Before ICE connects nothing pulls frames; send_audio must not hang the session's playout.
    track = AgentAudioTrack(WebRTCOptions(max_queued_frames=2, send_reserve_s=0.0))
    t0 = time.monotonic()
    for k in range(6):
        await track.put(tone(k))
    assert time.monotonic() - t0 < 1.0
    assert track.queued_frames == 2 and track.stats.dropped_out_frames == 4
    np.testing.assert_array_equal((await track.recv()).to_ndarray().reshape(-1), tone(4))
    track.stop()


async def test_track_sends_a_slightly_late_speech_frame_instead_of_silence():
    track = AgentAudioTrack(WebRTCOptions(late_frame_grace_s=0.04))  # wide: a loaded box oversleeps
    await track.put(tone(0))
    await track.recv()  # speech starts; the next slot is 20 ms later

    async def late() -> None:
        await asyncio.sleep(0.020 + 0.008)  # 8 ms after its slot
        await track.put(tone(1))

    feeder = asyncio.ensure_future(late())
    second = await track.recv()
    await feeder
    np.testing.assert_array_equal(second.to_ndarray().reshape(-1), tone(1))
    assert track.stats.late_frames == 1 and track.stats.frames_out_silence == 0
    # With nothing coming, the next slot (after the grace) is silence again.
    third = await track.recv()
    assert not np.any(third.to_ndarray())
    track.stop()


async def test_track_moves_its_clock_over_a_stall_instead_of_bursting():
    # A stalled event loop (the box is busy) must not be followed by the missed slots in a burst:
    # a browser's jitter buffer would take the burst for network delay and play everything after
    # it later. The RTP clock moves over the missed time instead, on a silence frame.
    track = AgentAudioTrack()
    await track.recv()
    t0 = track._t0
    time.sleep(0.15)  # the loop is blocked: 7 slots missed
    jumped = await track.recv()
    assert not np.any(jumped.to_ndarray()) and track.stats.clock_jumps == 1
    after = await track.recv()
    assert abs(after.pts / 48_000 - (time.monotonic() - t0)) < 0.025
    # In speech: a short stall is caught up (no gap in the words); a long one moves the clock on a
    # silence frame, and the speech carries on from where it was, nothing dropped.
    for k in range(3):
        await track.put(tone(k))
    got = [await track.recv()]
    time.sleep(0.03)
    got.append(await track.recv())
    assert track.stats.clock_jumps == 1
    time.sleep(0.3)
    gap = await track.recv()
    assert not np.any(gap.to_ndarray()) and track.stats.clock_jumps == 2
    got.append(await track.recv())
    for k, g in enumerate(got):
        np.testing.assert_array_equal(g.to_ndarray().reshape(-1), tone(k))
    assert abs(got[-1].pts / 48_000 - (time.monotonic() - t0)) < 0.025
    track.stop()


def test_av_frame_to_audio_frame_keeps_channels_and_dates_the_first_sample():
    left = np.arange(960, dtype=np.int16)
    right = -left
    interleaved = np.stack([left, right], axis=1).reshape(1, -1)
    f = av.AudioFrame.from_ndarray(interleaved, format="s16", layout="stereo")
    f.sample_rate = 48_000
    out = av_to_audio_frame(f, received_at=100.0)
    assert out.samples.shape == (960, 2) and out.samples.dtype == np.int16
    np.testing.assert_array_equal(out.samples[:, 0], left)
    np.testing.assert_array_equal(out.samples[:, 1], right)
    assert out.channels == 2 and out.sample_rate == 48_000
    assert out.timestamp == pytest.approx(100.0 - 0.02)


def rtp(seq: int, ts: int, data: bytes = b"opus"):
    from aiortc.rtp import RtpPacket

    packet = RtpPacket(payload_type=111, sequence_number=seq, timestamp=ts)
    packet._data = data  # aiortc depayloads before the jitter buffer sees a packet
    return packet


def test_jitter_buffer_releases_in_order_packets_at_once_and_skips_gaps():
    buf = AudioJitterBuffer(0)
    base = 4_294_960_000  # near the 32-bit wrap, as a random RTP origin can be
    seqs = [65534, 65535, 0, 1]  # across the 16-bit wrap
    out = [buf.add(rtp(s, (base + 960 * k) & 0xFFFFFFFF))[1] for k, s in enumerate(seqs)]
    assert all(f is not None for f in out), "an in-order packet must not wait for the next one"
    # A gap (two packets lost): the next packet is decoded at once rather than waited for.
    after_gap = buf.add(rtp(4, (base + 960 * 6) & 0xFFFFFFFF))[1]
    assert after_gap is not None and buf.lost == 2
    # A packet older than what was already released is out of place: dropped, not played late.
    assert buf.add(rtp(2, (base + 960 * 4) & 0xFFFFFFFF))[1] is None and buf.late == 1
    # Stamps are found by the decoded frame's pts (RTP timestamp since the first frame).
    arrived, released = buf.stamps(960 * 6)
    assert arrived == released and buf.stamps(960 * 6) is None  # taken once
    assert buf.stamps(960 * 3) is not None  # across the 32-bit wrap
    # depth=4 is aiortc's own buffer: the first frame only after four more packets.
    deep = AudioJitterBuffer(4)
    got = [deep.add(rtp(s, 960 * s))[1] for s in range(6)]
    assert got[:4] == [None] * 4 and got[4].timestamp == 0 and got[5].timestamp == 960


async def test_audio_at_another_rate_leaves_at_once_and_intact():
    from rejoinder.streaming.frames import AudioFrame
    from rejoinder.streaming.webrtc import WebRTCTransport

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    transport = WebRTCTransport(pc)
    t = np.arange(16_000) / 16_000
    x = (0.4 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    out = []
    for k in range(50):
        await transport.send_audio(AudioFrame((x[k * 320:(k + 1) * 320] * 32767).astype(np.int16), 16_000, 1, 0.0))
        if k == 0:
            # The resampler's few samples of delay do not hold the first frame back for 20 ms.
            assert transport.output_track.queued_frames == 1
        out.append((await transport.output_track.recv()).to_ndarray().reshape(-1))
    y = np.concatenate(out).astype(np.float32) / 32767
    ideal = (0.4 * np.sin(2 * np.pi * 440 * np.arange(48_000) / 48_000)).astype(np.float32)
    lags = range(0, 200)
    corr = [float(np.dot(y[lag:lag + 40_000], ideal[:40_000])) for lag in lags]
    lag = int(np.argmax(corr))
    assert lag < 96, f"{lag / 48:.1f} ms of delay from resampling and framing"
    err = y[lag:lag + 40_000] - ideal[:40_000]
    assert float(np.sqrt(np.mean(err ** 2))) < 0.01, "the tone did not come through intact"
    transport.output_track.stop()
    await pc.close()
