"""The `rejoinder` command as a user runs it: a real subprocess, real models, real WAV files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from speech import espeak_say, have_espeak, piper_say, shared_whisper, words_heard

from rejoinder.streaming.audio import read_wav, resample
from rejoinder.streaming.text_metrics import word_error_rate

REJOINDER = [sys.executable, "-m", "rejoinder.agent.cli"]
QUESTION = "What is the capital of France?"


def run(*args: str, stdin: str | None = None, env: dict | None = None, timeout: float = 300):
    return subprocess.run(
        [*REJOINDER, *args], input=stdin, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def assert_clean_error(proc, pattern: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("rejoinder: error:"), proc.stderr
    assert len([ln for ln in lines if "error" in ln.lower()]) == 1, proc.stderr
    assert pattern.lower() in lines[-1].lower(), lines[-1]


@pytest.fixture(scope="module")
def question_wav(tmp_path_factory) -> Path:
    """The question in a second voice (espeak-ng when present), as 44.1 kHz stereo 24-bit PCM."""
    audio16 = espeak_say(QUESTION, words_per_minute=120) if have_espeak() else piper_say(QUESTION)
    audio = resample(np.asarray(audio16), 16_000, 44_100)
    stereo = np.stack([audio, 0.8 * audio], axis=1)
    path = tmp_path_factory.mktemp("q") / "question.wav"
    sf.write(path, stereo, 44_100, subtype="PCM_24")
    return path


def test_reply_round_trip_json(question_wav, tmp_path):
    out = tmp_path / "answer.wav"
    proc = run("reply", "--in", str(question_wav), "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert set(result) == {"transcript", "answer", "timings"}
    assert word_error_rate(QUESTION, result["transcript"]) <= 0.2, result["transcript"]
    assert "paris" in result["answer"].lower()
    t = result["timings"]
    for key in ("asr_s", "llm_ttft_s", "llm_tok_s", "tts_s", "total_s"):
        assert t[key] > 0, key
    # the answer WAV really speaks the answer: transcribe it back
    samples, rate = read_wav(out)
    assert rate == 22_050 and len(samples) > rate // 2
    heard = shared_whisper().transcribe(resample(samples, rate, 16_000)).text
    assert heard.strip()
    assert words_heard(result["answer"], heard) >= 0.5, (result["answer"], heard)


def test_reply_human_readable_output(tmp_path):
    q = tmp_path / "q.wav"
    sf.write(q, piper_say("How many legs does a spider have?"), 16_000, subtype="FLOAT")
    proc = run("reply", "--in", str(q), "--out", str(tmp_path / "a.wav"))
    assert proc.returncode == 0, proc.stderr
    assert "you said" in proc.stdout and "spider" in proc.stdout.lower()
    assert "tok/s" in proc.stdout and "TTS" in proc.stdout


@pytest.mark.parametrize(
    "name, make, message",
    [
        ("not-a-wav.wav", lambda p: p.write_text("hello, I am text"), "wav"),
        ("empty.wav", lambda p: p.write_bytes(b""), "empty"),
        ("no-frames.wav", lambda p: sf.write(p, np.zeros((0,), np.float32), 16_000), "no audio|empty"),
        ("ten-minutes.wav", lambda p: sf.write(p, np.zeros(16_000 * 600, np.int16), 16_000), "long"),
        ("missing.wav", lambda p: None, "not found|no such|does not exist"),
    ],
)
def test_reply_bad_input_is_one_line_error(tmp_path, name, make, message):
    path = tmp_path / name
    make(path)
    proc = run("reply", "--in", str(path), "--out", str(tmp_path / "a.wav"), timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("rejoinder: error:")
    import re

    assert re.search(message, last, re.I), last


def test_reply_pure_silence(tmp_path):
    path = tmp_path / "silence.wav"
    sf.write(path, np.zeros(16_000 * 3, np.int16), 16_000)
    proc = run("reply", "--in", str(path), "--out", str(tmp_path / "a.wav"))
    assert_clean_error(proc, "no speech")
    assert not (tmp_path / "a.wav").exists()


def test_reply_corrupt_gguf(tmp_path, llm_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(llm_path.read_bytes()[:1_000_000])
    q = tmp_path / "q.wav"
    sf.write(q, piper_say(QUESTION), 16_000)
    proc = run("reply", "--in", str(q), "--out", str(tmp_path / "a.wav"), "--llm-model", str(bad))
    assert_clean_error(proc, "gguf")
    proc = run("reply", "--in", str(q), "--out", str(tmp_path / "a.wav"), env={"REJOINDER_LLM_MODEL": str(bad)})
    assert_clean_error(proc, "gguf")


def test_chat_repl_keeps_history_and_reuses_prefix():
    proc = run("chat", "--stats", stdin="What is the capital of France?\nAnd of Italy?\n/quit\n")
    assert proc.returncode == 0, proc.stderr
    answers = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(answers) == 2 and "paris" in answers[0].lower()
    stats = [ln for ln in proc.stderr.splitlines() if "reused" in ln]
    assert len(stats) == 2
    import re

    reused = [int(re.search(r"(\d+) reused", s).group(1)) for s in stats]
    assert reused[0] == 0
    assert reused[1] > 20  # the second turn prefilled only its new tokens
