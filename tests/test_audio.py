"""Whole-file audio: read_wav over every common WAV flavour, its refusals, write_wav, resample."""
from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import soundfile as sf

from rejoinder.streaming.audio import AudioError, read_wav, resample, rms_dbfs, write_wav


def tone(freq: float, seconds: float, rate: int, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def dominant_freq(x: np.ndarray, rate: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return float(np.fft.rfftfreq(x.size, 1 / rate)[np.argmax(spec)])


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE", "PCM_U8"])
def test_read_wav_every_format(tmp_path, rate, subtype):
    x = tone(440.0, 0.5, rate)
    path = tmp_path / f"t_{rate}_{subtype}.wav"
    sf.write(path, x, rate, subtype=subtype)
    y, got_rate = read_wav(path)
    assert got_rate == rate
    assert y.dtype == np.float32 and y.ndim == 1 and y.size == x.size
    tol = 1e-2 if subtype == "PCM_U8" else 1e-4
    assert np.max(np.abs(y - x)) < tol


def test_read_wav_downmixes_stereo_and_wavex(tmp_path):
    left = tone(300.0, 0.3, 16000, 0.4)
    right = tone(300.0, 0.3, 16000, 0.2)
    path = tmp_path / "stereo.wav"
    # WAVEX (WAVE_FORMAT_EXTENSIBLE) is what many tools write for 24-bit or multichannel files.
    sf.write(path, np.stack([left, right], axis=1), 16000, subtype="PCM_24", format="WAVEX")
    y, rate = read_wav(path)
    assert rate == 16000 and y.ndim == 1
    np.testing.assert_allclose(y, (left + right) / 2, atol=1e-4)


def test_read_wav_from_file_object():
    buf = io.BytesIO()
    sf.write(buf, tone(1000.0, 0.2, 22050), 22050, format="WAV", subtype="PCM_16")
    buf.seek(0)
    y, rate = read_wav(buf)
    assert rate == 22050 and y.size == int(0.2 * 22050)


def test_read_wav_clips_out_of_range_float(tmp_path, caplog):
    path = tmp_path / "loud.wav"
    sf.write(path, np.array([0.0, 1.5, -2.0, 0.5], np.float32).repeat(100), 16000, subtype="FLOAT")
    with caplog.at_level(logging.WARNING, logger="rejoinder"):
        y, _ = read_wav(path)
    assert y.max() == 1.0 and y.min() == -1.0
    assert any("clipped" in r.getMessage() for r in caplog.records)


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg
    return msg


def test_read_wav_refuses_garbage(tmp_path):
    path = tmp_path / "noise.wav"
    path.write_bytes(b"this is not audio at all" * 50)
    with pytest.raises(AudioError) as err:
        read_wav(path)
    assert "not a readable audio file" in _one_line(err)
    assert isinstance(err.value, ValueError)


def test_read_wav_refuses_missing_file(tmp_path):
    with pytest.raises(AudioError) as err:
        read_wav(tmp_path / "nope.wav")
    assert "nope.wav" in _one_line(err)


def test_read_wav_refuses_other_containers(tmp_path):
    path = tmp_path / "tone.flac"
    sf.write(path, tone(440.0, 0.2, 16000), 16000, format="FLAC")
    with pytest.raises(AudioError) as err:
        read_wav(path)
    assert "not a WAV" in _one_line(err)


def test_read_wav_refuses_empty(tmp_path):
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0, np.float32), 16000, subtype="PCM_16")
    with pytest.raises(AudioError) as err:
        read_wav(path)
    assert "no audio" in _one_line(err)


def test_read_wav_refuses_nan(tmp_path):
    x = tone(440.0, 0.1, 16000)
    x[100] = np.nan
    path = tmp_path / "nan.wav"
    sf.write(path, x, 16000, subtype="FLOAT")
    with pytest.raises(AudioError) as err:
        read_wav(path)
    assert "NaN" in _one_line(err)


def test_read_wav_refuses_too_long_and_odd_rates(tmp_path):
    path = tmp_path / "long.wav"
    sf.write(path, np.zeros(8000 * 3, np.float32), 8000, subtype="PCM_16")
    with pytest.raises(AudioError) as err:
        read_wav(path, max_seconds=2.0)
    assert "longer than" in _one_line(err)
    assert read_wav(path, max_seconds=None)[0].size == 24000

    path = tmp_path / "bat.wav"
    sf.write(path, np.zeros(96000, np.float32), 96000, subtype="PCM_16")
    with pytest.raises(AudioError, match="sample rate"):
        read_wav(path)


def test_write_wav_roundtrip(tmp_path):
    x = tone(440.0, 0.25, 24000)
    path = tmp_path / "out.wav"
    write_wav(path, x, 24000)
    info = sf.info(path)
    assert info.subtype == "PCM_16" and info.samplerate == 24000 and info.channels == 1
    y, rate = read_wav(path)
    assert rate == 24000
    assert np.max(np.abs(y - x)) < 1e-4


@pytest.mark.parametrize(("src", "dst"), [(48000, 16000), (44100, 16000), (8000, 16000), (22050, 24000)])
def test_resample_preserves_frequency_and_duration(src, dst):
    x = tone(440.0, 1.0, src)
    y = resample(x, src, dst)
    assert y.dtype == np.float32
    assert abs(y.size - dst) <= 1
    assert abs(dominant_freq(y, dst) - 440.0) < 2.0
    # Level survives (HQ filter: flat passband); skip the filter's edge transients.
    core = y[dst // 10 : -dst // 10]
    assert abs(rms_dbfs(core) - rms_dbfs(x)) < 0.1


def test_resample_identity_and_bad_rates():
    x = tone(440.0, 0.1, 16000)
    y = resample(x, 16000, 16000)
    assert np.array_equal(x, y) and y is not x
    with pytest.raises(ValueError):
        resample(x, 0, 16000)
