"""Audio in motion: AudioFrame, the streaming resampler, the 20 ms re-chunker and bad-frame handling."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from rejoinder.streaming.audio import resample
from rejoinder.streaming.frames import AudioFrame, FrameChunker
from rejoinder.streaming.resample import StreamResampler


def tone(freq: float, seconds: float, rate: int, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_audio_frame_conversions():
    x = np.array([[1000, -1000], [32767, -32768]], dtype=np.int16)
    f = AudioFrame(x, 48000, channels=2, timestamp=5.0)
    assert f.samples_per_channel == 2 and f.duration_s == pytest.approx(2 / 48000)
    mono = f.to_float_mono()
    assert mono.dtype == np.float32 and mono.shape == (2,)
    np.testing.assert_allclose(mono, [0.0, -0.5 / 32768], atol=1e-6)
    g = AudioFrame.from_pcm16_bytes(x.tobytes(), 48000, channels=2, timestamp=5.0)
    assert np.array_equal(g.samples, x) and g.timestamp == 5.0
    h = AudioFrame(np.array([0.5, -2.0], np.float32), 16000)
    assert np.array_equal(np.frombuffer(h.to_pcm16_bytes(), "<i2"), [16383, -32767])


@pytest.mark.parametrize(("src", "dst"), [(48000, 16000), (44100, 16000), (8000, 16000), (16000, 16000)])
def test_stream_resampler_matches_one_shot(src, dst):
    """Frame-by-frame output equals one-shot output: no clicks or lost samples at borders."""
    x = tone(440.0, 1.0, src)
    rs = StreamResampler(src, dst)
    step = src // 100  # 10 ms frames
    parts = [rs.process(x[i : i + step]) for i in range(0, x.size, step)]
    y = np.concatenate(parts + [rs.flush()])
    ref = resample(x, src, dst)
    assert abs(y.size - ref.size) <= 1
    n = min(y.size, ref.size)
    assert np.max(np.abs(y[:n] - ref[:n])) < 1e-3
    # And no discontinuity: the largest sample-to-sample step of a 440 Hz sine stays the sine's.
    max_step = 2 * np.pi * 440.0 / dst * 0.5
    assert np.max(np.abs(np.diff(y[dst // 50 : -dst // 50]))) < max_step * 1.05


def test_chunker_makes_20ms_frames_from_odd_sizes_and_rates():
    ch = FrameChunker(16000)
    x = tone(440.0, 1.0, 44100)
    t0 = 100.0
    out: list[AudioFrame] = []
    pos = 0
    sizes = [441, 1000, 7, 2205, 333]  # 10 ms, odd, tiny, 50 ms, odd
    i = 0
    while pos < x.size:
        n = sizes[i % len(sizes)]
        out += ch.push(AudioFrame(x[pos : pos + n], 44100, timestamp=t0 + pos / 44100))
        pos += n
        i += 1
    out += ch.flush()
    assert all(f.sample_rate == 16000 and f.samples.shape == (320,) and f.samples.dtype == np.float32 for f in out)
    assert abs(len(out) - 50) <= 1
    # Timestamps advance by 20 ms per frame, anchored on the input's capture times.
    ts = np.array([f.timestamp for f in out])
    assert abs(ts[0] - t0) < 0.01
    np.testing.assert_allclose(np.diff(ts), 0.02, atol=0.005)
    y = np.concatenate([f.samples for f in out])
    ref = resample(x, 44100, 16000)
    assert np.max(np.abs(y[: ref.size] - ref)) < 1e-3


def test_chunker_stereo_int16_webrtc_style():
    ch = FrameChunker(16000)
    left = (tone(300.0, 0.2, 48000) * 32767).astype(np.int16)
    stereo = np.stack([left, left], axis=1)
    out = []
    for i in range(0, stereo.shape[0], 480):  # 10 ms at 48 kHz, like WebRTC
        out += ch.push(AudioFrame(stereo[i : i + 480], 48000, channels=2))
    out += ch.flush()
    assert len(out) == 10
    y = np.concatenate([f.samples for f in out])
    assert 0.3 < np.abs(y).max() < 0.55


def test_chunker_follows_a_rate_change(caplog):
    ch = FrameChunker(16000)
    with caplog.at_level(logging.INFO, logger="rejoinder"):
        out = ch.push(AudioFrame(tone(440, 0.1, 48000), 48000))
        out += ch.push(AudioFrame(tone(440, 0.1, 8000), 8000))
        out += ch.flush()
    assert abs(len(out) - 10) <= 1
    assert any("rate changed" in r.getMessage() for r in caplog.records)


def test_bad_frames_are_rejected_or_repaired_with_a_log_line(caplog):
    ch = FrameChunker(16000, log_every=1000)
    good = tone(440, 0.02, 16000)
    nan = good.copy()
    nan[5:10] = np.nan
    loud = good * 3.0
    bad_inputs = [
        AudioFrame(good, 0),  # no rate
        AudioFrame(good, 1_000_000),  # absurd rate
        AudioFrame(np.zeros(0, np.float32), 16000),  # empty
        AudioFrame(np.zeros(321, np.int16), 16000, channels=2),  # ragged stereo
        AudioFrame(np.zeros((320, 3), np.float32), 16000, channels=2),  # layout mismatch
        AudioFrame(np.array(["a"] * 320), 16000),  # not numbers
        "not a frame",  # wrong type entirely
    ]
    with caplog.at_level(logging.WARNING, logger="rejoinder"):
        for f in bad_inputs:
            assert ch.push(f) == []  # type: ignore[arg-type]
        repaired = ch.push(AudioFrame(nan, 16000)) + ch.push(AudioFrame(loud, 16000))
        repaired += ch.push(AudioFrame((good * 2**31 * 0.9).astype(np.int32), 16000))
    assert set(ch.stats.rejected) == {"rate", "empty", "layout", "dtype", "type"}
    assert sum(ch.stats.rejected.values()) == len(bad_inputs)
    assert set(ch.stats.repaired) == {"nonfinite", "clipped", "dtype"}
    assert len(repaired) == 3
    for f in repaired:
        assert np.isfinite(f.samples).all() and np.abs(f.samples).max() <= 1.0
    assert np.all(repaired[0].samples[5:10] == 0.0)
    msgs = [r.getMessage() for r in caplog.records]
    assert all(r.name.startswith("rejoinder.") for r in caplog.records)
    assert any("NaN" in m for m in msgs) and any("clipped" in m for m in msgs) and any("sample rate" in m for m in msgs)
    # Still a working chunker afterwards.
    assert len(ch.push(AudioFrame(good, 16000))) == 1


def test_repeated_bad_frames_log_rate_limited(caplog):
    ch = FrameChunker(16000, log_every=100)
    with caplog.at_level(logging.WARNING, logger="rejoinder"):
        for _ in range(250):
            ch.push(AudioFrame(np.zeros(0, np.float32), 16000))
    assert ch.stats.rejected["empty"] == 250
    assert len(caplog.records) == 3  # 1st, 100th, 200th
