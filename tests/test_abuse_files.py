"""The command line given bad files: each a one-line `rejoinder: error: …`, exit status 2, no traceback,
and, where the file can be judged up front, before any model loads.

"Before any model loads" is proven, not timed: the runs point the LLM at a file that does not exist,
so an error about the input or output (and not about the model) means the models were never touched.

Regressions of defects found on main: `reply --in FIFO` hung forever with no writer (and said "WAV
data is damaged" with one); a WAV whose header promised more audio than the file held was answered
silently; an unwritable --out (/proc/x.wav, a directory, /dev/full) was found only after the whole
answer was computed, as "LibsndfileError: … System error." with exit 1.
"""
from __future__ import annotations

import io
import logging
import os
import re
import resource
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from speech import piper_say
from test_cli import REJOINDER, assert_clean_error, run

from rejoinder.streaming.audio import AudioError, read_wav, write_wav

NO_MODEL = {"REJOINDER_LLM_MODEL": "/nonexistent/model.gguf"}  # any model load fails loudly


def tone(seconds: float = 1.0, rate: int = 16_000, channels: int = 1) -> np.ndarray:
    x = (0.3 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * rate)) / rate)).astype(np.float32)
    return np.tile(x[:, None], (1, channels)) if channels > 1 else x


def cut(path: Path, keep: float) -> Path:
    """Keep the header and `keep` of the audio data: the header still promises all of it."""
    data = path.read_bytes()
    start = data.index(b"data") + 8
    path.write_bytes(data[: start + int((len(data) - start) * keep)])
    return path


def write_with(subtype: str, samples: np.ndarray, rate: int = 16_000, fmt: str = "WAV"):
    return lambda p: sf.write(p, samples, rate, subtype=subtype, format=fmt)


def nan_samples() -> np.ndarray:
    x = tone(0.5)
    x[100] = np.nan
    return x


def inf_samples() -> np.ndarray:
    x = tone(0.5)
    x[100] = np.inf
    return x


def make_mp3(p: Path) -> None:
    sf.write(p, tone(1.0), 16_000, format="MP3", subtype="MPEG_LAYER_III")


def mp3_available() -> bool:
    return "MP3" in sf.available_formats()


BAD_INPUTS = [
    pytest.param(lambda p: p.write_bytes(cut_bytes(36)), "not a readable audio file", id="header-only"),
    pytest.param(lambda p: cut(wav(p, tone(2.0)), 0.3), "cut short.*70% missing", id="cut-to-30-percent"),
    pytest.param(lambda p: p.mkdir(), "is a directory", id="directory"),
    pytest.param(write_with("FLOAT", nan_samples()), "NaN", id="nan"),
    pytest.param(write_with("FLOAT", inf_samples()), "NaN or infinite", id="inf"),
    pytest.param(write_with("PCM_16", tone(0.5, 7999), 7999), "7999 Hz is outside", id="rate-7999"),
    pytest.param(write_with("PCM_16", tone(0.1, 400_000), 400_000), "400000 Hz is outside", id="rate-400k"),
    pytest.param(write_with("PCM_16", tone(0.5, channels=9)), "9 channels", id="nine-channels"),
    pytest.param(write_with("PCM_16", tone(0.5), fmt="FLAC"), "not a WAV file.*FLAC", id="flac-renamed"),
    pytest.param(make_mp3, "not a WAV file.*MPEG", id="mp3-renamed",
                 marks=pytest.mark.skipif(not mp3_available(), reason="this libsndfile cannot write MP3")),
]

def wav(p: Path, samples: np.ndarray, rate: int = 16_000) -> Path:
    sf.write(p, samples, rate, subtype="PCM_16")
    return p


def cut_bytes(n: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, tone(0.5), 16_000, subtype="PCM_16", format="WAV")
    return buf.getvalue()[:n]


# `talk` reads its input through the same read_wav: a few cases show it, the rest would repeat them.
_TALK = {"directory", "cut-to-30-percent", "flac-renamed", "nine-channels"}


@pytest.mark.parametrize("command, make, message", [
    pytest.param(cmd, *p.values, id=f"{cmd}-{p.id}", marks=p.marks) for cmd in ("reply", "talk") for p in BAD_INPUTS
    if cmd == "reply" or p.id in _TALK])
def test_bad_input_is_one_line_before_any_model(tmp_path, command, make, message):
    path = tmp_path / "question.wav"  # named .wav whatever it holds
    make(path)
    proc = run(command, "--in", str(path), "--out", str(tmp_path / "out.wav"), env=NO_MODEL, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert_clean_error(proc, "")
    assert re.search(message, proc.stderr.strip().splitlines()[-1]), proc.stderr
    assert "model" not in proc.stderr.lower(), "the models were touched before the input was judged"
    assert not (tmp_path / "out.wav").exists()


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "question.wav"
    os.mkfifo(fifo)
    proc = run("reply", "--in", str(fifo), "--out", str(tmp_path / "a.wav"), env=NO_MODEL, timeout=30)
    assert proc.returncode == 2
    assert_clean_error(proc, "FIFO")
    # With a writer waiting on the other end: the same clear refusal, not "the WAV data is damaged".
    source = wav(tmp_path / "source.wav", tone(1.0))
    writer = subprocess.Popen(["sh", "-c", f"cat '{source}' > '{fifo}'"])
    try:
        proc = run("talk", "--in", str(fifo), "--out", str(tmp_path / "a.wav"), env=NO_MODEL, timeout=30)
        assert proc.returncode == 2
        assert_clean_error(proc, "FIFO")
        assert "damaged" not in proc.stderr
    finally:
        writer.kill()
        writer.wait(5)


@pytest.mark.parametrize("out, message", [
    ("/proc/x.wav", "cannot create it"),
    ("{tmp}", "is a directory"),
    ("/dev/full", "not a regular file"),
    ("{tmp}/no/such/folder/a.wav", "does not exist"),
])
@pytest.mark.parametrize("command", ["reply", "talk"])
def test_unwritable_output_is_refused_before_any_model(tmp_path, command, out, message):
    question = wav(tmp_path / "q.wav", tone(1.0))
    proc = run(command, "--in", str(question), "--out", out.format(tmp=tmp_path), env=NO_MODEL, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert_clean_error(proc, message)
    assert "--out" in proc.stderr and "model" not in proc.stderr.lower()


def test_unwritable_metrics_and_demo_folder_are_refused_before_any_model(tmp_path):
    question = wav(tmp_path / "q.wav", tone(1.0))
    proc = run("talk", "--in", str(question), "--out", str(tmp_path / "a.wav"), "--metrics-json", "/dev/full",
               env=NO_MODEL, timeout=60)
    assert proc.returncode == 2
    assert_clean_error(proc, "--metrics-json /dev/full")
    assert not (tmp_path / "a.wav").exists(), "the probe of --out must not leave a file behind"
    for out_dir, message in (("/dev/full", "not a folder"), ("/proc/demo", "cannot create it")):
        proc = run("demo", "--out-dir", out_dir, env=NO_MODEL, timeout=60)
        assert proc.returncode == 2
        assert_clean_error(proc, message)


def test_a_wav_cut_short_by_a_little_is_read_with_a_warning(tmp_path, caplog):
    path = cut(wav(tmp_path / "cut.wav", tone(2.0)), 0.8)
    with caplog.at_level(logging.WARNING, logger="rejoinder"):
        samples, rate = read_wav(path)
    assert samples.size == pytest.approx(0.8 * 2.0 * rate, abs=2)
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "cut short" in warning and "2.0 s" in warning and "1.6 s" in warning and "20% missing" in warning
    # Tools writing to a pipe mark "length unknown" in the header (ffmpeg 0xFFFFFFFF, sox and
    # espeak-ng 0x7FFFF000): not a cut file.
    for marker in (0xFFFFFFFF, 0x7FFFF000, 0):
        data = bytearray((tmp_path / "cut.wav").read_bytes())
        at = data.index(b"data") + 4
        data[at : at + 4] = struct.pack("<I", marker)
        (tmp_path / "unknown.wav").write_bytes(bytes(data))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="rejoinder"):
            try:
                got = read_wav(tmp_path / "unknown.wav")[0].size
            except AudioError as exc:  # libsndfile itself reads a 0-length data chunk as empty
                assert marker == 0 and "no audio" in str(exc)
                continue
        assert got == samples.size and not caplog.records, marker
    espeak = subprocess.run(["espeak-ng", "--stdout", "Hello there."], capture_output=True).stdout
    if espeak:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="rejoinder"):
            assert read_wav(io.BytesIO(espeak))[0].size > 0
        assert not caplog.records
    with pytest.raises(AudioError, match="cut short.*refusing"):
        read_wav(cut(wav(tmp_path / "half.wav", tone(2.0)), 0.45))


def test_a_failed_write_leaves_no_partial_file_and_keeps_the_old_one(tmp_path):
    out = wav(tmp_path / "answer.wav", tone(0.1))
    before = out.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))  # the disk "fills up" after 20 kB
    try:
        with pytest.raises(OSError) as failed:
            write_wav(out, tone(5.0), 16_000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert "cannot write (File too large)" in str(failed.value)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answer.wav"]


@pytest.mark.slow
def test_reply_warns_about_a_cut_file_answers_it_and_a_disk_full_write_is_one_line(tmp_path):
    """The whole run, with the real models: a question cut short by 20 % is answered (with a warning
    saying how much is missing); the answer cannot be written (the disk "fills up" at 40 kB): one line."""
    question = cut(wav(tmp_path / "q.wav", piper_say("What is the capital of France? Tell me please.")), 0.8)

    def small_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, resource.RLIM_INFINITY))

    proc = subprocess.run([*REJOINDER, "reply", "--in", str(question), "--out", str(tmp_path / "a.wav")],
                          capture_output=True, text=True, timeout=300, preexec_fn=small_disk, env=dict(os.environ))
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert any("cut short" in ln and "20% missing" in ln and "WARNING" in ln for ln in lines), proc.stderr
    assert_clean_error(proc, "a.wav: cannot write (File too large)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.wav"], "no partial answer may be left"

