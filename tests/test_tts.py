"""PiperTTS: real synthesis with the embedded voice, and clear errors for broken voice files."""
from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from rejoinder.streaming.assets import resolve
from rejoinder.streaming.tts import PiperTTS, SynthesisCancel, TTSError


@pytest.fixture(scope="module")
def tts() -> PiperTTS:
    return PiperTTS()


def _rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))


def test_sample_rate_and_energy(tts: PiperTTS) -> None:
    assert tts.sample_rate == 22050
    audio = tts.synthesize("Hello there, this is a test of the speech synthesiser.")
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert 1.5 < len(audio) / tts.sample_rate < 8.0
    assert _rms(audio) > 0.03  # speech, not silence or a click
    assert np.max(np.abs(audio)) <= 1.0


def test_duration_grows_with_text_length(tts: PiperTTS) -> None:
    short = "The weather is nice today."
    long = " ".join([short] * 4)
    d_short = len(tts.synthesize(short)) / tts.sample_rate
    d_long = len(tts.synthesize(long)) / tts.sample_rate
    # roughly proportional: four times the text, three to five times the audio (VITS durations vary)
    assert 3.0 < d_long / d_short < 5.0


def test_empty_text_gives_no_audio(tts: PiperTTS) -> None:
    assert tts.synthesize("   ").size == 0
    assert list(tts.iter_synthesize("")) == []


def test_iter_synthesize_one_chunk_per_sentence_with_its_text(tts: PiperTTS) -> None:
    text = "First sentence here. Second one follows! And a third?"
    chunks = list(tts.iter_synthesize(text))
    assert len(chunks) == 3
    assert "".join(c.text for c in chunks) == text
    assert [c.text.strip() for c in chunks] == ["First sentence here.", "Second one follows!", "And a third?"]
    assert all(c.sample_rate == 22050 and c.audio.dtype == np.float32 and _rms(c.audio) > 0.03 for c in chunks)


def test_chunk_texts_always_concatenate_to_input(tts: PiperTTS) -> None:
    # espeak splits "Dr." and "Jan." as sentences of their own and expands "$3.50": the text slices
    # must still cover the input exactly, in order.
    text = "Dr. Smith paid $3.50 on Jan. 5. Then he left."
    chunks = list(tts.iter_synthesize(text))
    assert len(chunks) >= 2
    assert "".join(c.text for c in chunks) == text
    assert chunks[-1].text == "Then he left."


def test_cancel_aborts_running_inference(tts: PiperTTS) -> None:
    text = " ".join(["This is a long sentence that keeps going without a stop"] * 6) + "."
    t0 = time.monotonic()
    full = list(tts.iter_synthesize(text))
    full_time = time.monotonic() - t0
    assert len(full) == 1

    cancel = SynthesisCancel()
    threading.Timer(full_time * 0.2, cancel.cancel).start()
    t0 = time.monotonic()
    got = list(tts.iter_synthesize(text, cancel=cancel))
    elapsed = time.monotonic() - t0
    assert got == []  # the single sentence was aborted mid-inference, nothing leaked out
    # cancelled at 20 % of the full time: it must end far before a full synthesis would (loose
    # bound: timings on a shared 2-core box are noisy; the exact abort latency is in the bench)
    assert elapsed < full_time * 0.2 + max(0.1, 0.4 * full_time)


def test_threads_are_limited(tts: PiperTTS) -> None:
    one = PiperTTS(threads=1)
    assert one.threads == 1
    assert tts.threads >= 1


def test_length_scale_slows_speech(tts: PiperTTS) -> None:
    slow = PiperTTS(length_scale=1.6, threads=1)
    text = "Speaking slowly takes longer."
    ratio = len(slow.synthesize(text)) / len(tts.synthesize(text))
    assert 1.3 < ratio < 1.9


def test_one_gain_per_voice_keeps_quiet_pieces_quiet(tts: PiperTTS) -> None:
    """Pieces of one sentence keep their relative level: the voice's gain, lowered only against clipping."""
    assert tts.normalize == "voice" and tts.voice_gain is not None and tts.voice_gain > 1.0
    assert PiperTTS(threads=1).voice_gain == tts.voice_gain  # measured once per voice (noise off: exact)
    chunks = [c for text in ("The capital", " of France is Paris.", "Hello there!") for c in tts.iter_synthesize(text)]
    for c in chunks:
        peak = float(np.max(np.abs(c.audio)))
        assert peak <= 1.0
        # either the voice's own gain, or less because full scale was reached
        assert c.gain == pytest.approx(tts.voice_gain) or (c.gain < tts.voice_gain and peak == pytest.approx(1.0))
    quiet = next(c for c in chunks if c.text == " of France is Paris.")
    assert np.max(np.abs(quiet.audio)) < 0.95  # Piper's per-sentence scaling would lift it to 1.0

    piper_like = PiperTTS(normalize="sentence", threads=1)
    assert piper_like.voice_gain is None
    for c in piper_like.iter_synthesize("The capital of France. It is Paris."):
        assert float(np.max(np.abs(c.audio))) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(TTSError, match="normalize"):
        PiperTTS(normalize="loud")  # type: ignore[arg-type]


# --- loading errors ------------------------------------------------------------------------------


@pytest.fixture()
def voice_copy(tmp_path: Path) -> Path:
    src = resolve("tts")
    dst = tmp_path / src.name
    shutil.copyfile(f"{src}.json", f"{dst}.json")
    return dst


def _assert_one_line(err: TTSError) -> None:
    msg = str(err)
    assert msg and "\n" not in msg and len(msg) < 300


def test_corrupt_model_raises_tts_error(voice_copy: Path) -> None:
    voice_copy.write_bytes(b"this is not an onnx model" * 100)
    with pytest.raises(TTSError, match="could not be loaded") as info:
        PiperTTS(voice_copy)
    _assert_one_line(info.value)
    assert isinstance(info.value, ValueError)


def test_missing_model_raises_tts_error(tmp_path: Path) -> None:
    with pytest.raises(TTSError, match="not found") as info:
        PiperTTS(tmp_path / "nope.onnx")
    _assert_one_line(info.value)


def test_missing_config_raises_tts_error(voice_copy: Path) -> None:
    voice_copy.write_bytes(b"x")
    Path(f"{voice_copy}.json").unlink()
    with pytest.raises(TTSError, match="config not found") as info:
        PiperTTS(voice_copy)
    _assert_one_line(info.value)


def test_corrupt_config_raises_tts_error(voice_copy: Path) -> None:
    shutil.copyfile(resolve("tts"), voice_copy)
    Path(f"{voice_copy}.json").write_text("{ not json")
    with pytest.raises(TTSError, match="unreadable") as info:
        PiperTTS(voice_copy)
    _assert_one_line(info.value)


def test_phonemizing_text_after_text_does_not_leak(tts: PiperTTS) -> None:
    """espeak-ng leaks ~1.4 KiB per voice change and Piper sets the voice before every text: here it is
    set once (streaming/tts.py `_EspeakVoiceOnce`), and phonemes are what espeak gives for the text."""
    import gc

    from piper import espeakbridge

    from rejoinder.agent import heap

    text = "Hi, I'm Rejoinder. How can I help?"
    first = tts._voice.phonemize(text)
    assert first and all(first)  # two sentences of phonemes
    assert type(espeakbridge).__name__ == "_EspeakVoiceOnce"
    if heap.stats() is None:
        pytest.skip("heap statistics are glibc's")

    def in_use() -> int:
        st = heap.stats()
        assert st is not None
        return st.in_use

    n = 2000
    gc.collect()
    before = in_use()
    for _ in range(n):
        assert tts._voice.phonemize(text) == first
    gc.collect()
    grown = in_use() - before
    assert grown < n * 200, f"{grown / n:.0f} bytes per text (espeak's leak is ~1360)"
