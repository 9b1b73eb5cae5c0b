"""Speech that starts on an answer's first words and joins its pieces without a seam.

Real Piper voice (noise off, so every run synthesises the same waveform), real Whisper; every bound
on a join comes from a continuous synthesis of the same text by the same voice (tests/seams.py).
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest
import seams
from speech import shared_whisper
from test_segmenter import LEAD_CASES, llm_tokens

from rejoinder.streaming.audio import resample
from rejoinder.streaming.streamed_tts import JoinConfig, SpeechChunk, StreamedTTS, ends_mid_phrase, trim_silence
from rejoinder.streaming.text_metrics import word_error_rate
from rejoinder.streaming.text_segmenter import SegmenterConfig, segment_text
from rejoinder.streaming.tts import PiperTTS

# Sentences whose first words end at a natural break, so each has a lead-in and a join mid-phrase
# or at a comma.
SENTENCES = (
    "The capital of France is Paris, and it is a beautiful city.",
    "Sure, the library closes early on the weekend, so we should hurry.",
    "I'm sorry, but the meeting has been moved to the afternoon.",
    "Dr. Smith works at the hospital near the old train station.",
    "The weather is lovely today and the park is full of people.",
    "It takes about two hours by train from here to the coast.",
)
ANSWER = " ".join(SENTENCES[:3])  # several sentences: joins at sentence ends too

# Gaps, measured on this voice (bench/first_audio.py prints them): inside one continuous synthesis
# Piper leaves 20-130 ms between words (p50 25 ms) and 230-390 ms at a comma; a raw join of two
# pieces mid-phrase leaves 120-230 ms (its trailing + the next one's leading silence).
WORD_GAP_MAX_S = 0.10  # a join between two words of a phrase
PAUSE_MAX_S = 0.30  # a join at a comma or a sentence end


@pytest.fixture(scope="module")
def voice() -> PiperTTS:
    v = PiperTTS(noise_scale=0.0, noise_w_scale=0.0)
    v.synthesize("Warm up.")
    return v


async def _deltas(tokens: list[str], gate: asyncio.Event | None = None, hold: int | None = None,
                  sent: list[int] | None = None) -> AsyncIterator[str]:
    """One token at a time, as an engine streams them; with `gate`, stop before token `hold` until it is set."""
    for i, tok in enumerate(tokens):
        if gate is not None and i == hold:
            await asyncio.wait_for(gate.wait(), 120)
        if sent is not None:
            sent.append(i)
        yield tok
        await asyncio.sleep(0)


_JOINS = JoinConfig()


def _speak(voice: PiperTTS, text: str, joins: JoinConfig | None = _JOINS) -> tuple[StreamedTTS, list[SpeechChunk]]:
    async def run() -> tuple[StreamedTTS, list[SpeechChunk]]:
        st = StreamedTTS(voice, joins=joins)
        return st, [c async for c in st.run(_deltas(llm_tokens(text)))]

    return asyncio.run(run())


def _float(chunks: list[SpeechChunk]) -> np.ndarray:
    return np.concatenate([c.audio for c in chunks]).astype(np.float32) / 32768.0


def _wer(text: str, audio: np.ndarray, rate: int) -> float:
    heard = shared_whisper().transcribe(resample(audio, rate, 16_000), word_timestamps=False).text
    return word_error_rate(text, heard)


def test_joined_speech_is_understood_as_well_as_whole_sentences(voice: PiperTTS) -> None:
    joined, whole = [], []
    for text in SENTENCES:
        stream, chunks = _speak(voice, text)
        first_clause = segment_text(text, SegmenterConfig.clause_only())[0].text
        assert len(stream.metrics.segment_texts[0]) < len(first_clause)  # it began with a lead-in
        assert "".join(c.text for c in chunks) == text
        joined.append(_wer(text, _float(chunks), voice.sample_rate))
        whole.append(_wer(text, voice.synthesize(text), voice.sample_rate))
    for text, j, w in zip(SENTENCES, joined, whole):
        assert j <= w + 0.1 + 1e-9, f"{text!r}: joined WER {j:.2f} vs whole {w:.2f}"  # one word at most
    assert np.mean(joined) <= np.mean(whole) + 0.03, (joined, whole)


@pytest.mark.parametrize("text", [*SENTENCES, ANSWER], ids=lambda t: t[:30])
def test_no_click_and_no_long_gap_at_any_join(voice: PiperTTS, text: str) -> None:
    ref = seams.reference(voice.synthesize(text), voice.sample_rate)
    _, chunks = _speak(voice, text)
    assert len(chunks) >= 2
    _, joins = seams.joins([c.audio for c in chunks], voice.sample_rate, ref)
    for before, j in zip(chunks, joins):
        where = f"join after {before.text!r} at {j.at_s:.2f}s"
        assert j.jump <= ref.max_jump, f"{where}: step {j.jump:.2f} x local RMS > {ref.max_jump:.2f} inside the voice"
        assert j.flux <= ref.max_flux, f"{where}: spectral flux {j.flux:.2f} > {ref.max_flux:.2f}"
        assert j.hf_flux <= ref.max_hf_flux, f"{where}: flux above 5 kHz {j.hf_flux:.2f} > {ref.max_hf_flux:.2f}"
        bound = WORD_GAP_MAX_S if ends_mid_phrase(before.text) else PAUSE_MAX_S
        assert j.gap_s <= bound, f"{where}: {j.gap_s * 1000:.0f} ms of silence"


def test_the_seam_checks_catch_raw_joins_and_clicks(voice: PiperTTS) -> None:
    """The checks above can fail: raw Piper pieces leave a long gap mid-phrase, and a piece cut off
    inside its voice clicks."""
    text = "The capital of France is Paris."
    ref = seams.reference(voice.synthesize(text), voice.sample_rate)
    _, raw = _speak(voice, text, joins=None)
    assert ends_mid_phrase(raw[0].text)
    _, (j,) = seams.joins([c.audio for c in raw], voice.sample_rate, ref)
    assert j.gap_s > WORD_GAP_MAX_S

    _, chunks = _speak(voice, text)
    a = chunks[0].audio
    cut = int(np.argmax(np.abs(a)))  # inside the loudest vowel
    _, (j,) = seams.joins([a[: cut + 1], chunks[1].audio], voice.sample_rate, ref)
    assert j.jump > ref.max_jump or j.flux > ref.max_flux or j.hf_flux > ref.max_hf_flux, j


def test_one_level_across_the_pieces_of_a_sentence(voice: PiperTTS) -> None:
    _, chunks = _speak(voice, "The capital of France is Paris.")
    assert [c.text for c in chunks] == ["The capital", " of France is Paris."]
    assert seams.level_step_db([c.gain for c in chunks]) < 0.5
    # Piper's own per-sentence normalisation would lift the quieter rest of the sentence by dBs
    per_sentence = PiperTTS(noise_scale=0.0, noise_w_scale=0.0, normalize="sentence")
    _, chunks = _speak(per_sentence, "The capital of France is Paris.")
    assert seams.level_step_db([c.gain for c in chunks]) > 2.0


LEADS = [c for c in LEAD_CASES if c[1]][:8]


@pytest.mark.parametrize(("text", "lead"), LEADS, ids=[c[0][:30] for c in LEADS])
async def test_first_audio_before_the_first_clause_is_complete(voice: PiperTTS, text: str, lead: str) -> None:
    tokens = llm_tokens(text)
    clause_end = segment_text(text, SegmenterConfig.clause_only())[0].end
    # hold back the token that would complete the first clause until the first audio is out
    ends = np.cumsum([len(t) for t in tokens])
    hold = int(np.searchsorted(ends, clause_end))
    gate, sent = asyncio.Event(), []
    stream = StreamedTTS(voice)
    chunks = []
    async for c in stream.run(_deltas(tokens, gate, hold, sent)):
        if not chunks:
            assert len(sent) <= hold, "the first audio waited for the whole clause"
            gate.set()
        chunks.append(c)
    first = "".join(c.text for c in chunks if c.segment_index == 0)
    assert first.strip() == lead and 2 <= len(first.split()) <= 5
    assert "".join(c.text for c in chunks) == text == stream.text
    for c in chunks:
        assert text[c.text_start : c.text_end] == c.text
    m = stream.metrics
    assert m.first_token_at <= m.first_segment_at <= m.first_audio_at and m.first_audio_latency > 0


async def test_a_one_word_answer_is_one_piece(voice: PiperTTS) -> None:
    stream = StreamedTTS(voice)
    chunks = [c async for c in stream.run(_deltas(llm_tokens("Paris.")))]
    assert [c.text for c in chunks] == ["Paris."] and stream.metrics.segments == 1


def test_trim_silence_cuts_padding_and_keeps_the_voice(voice: PiperTTS) -> None:
    rate = voice.sample_rate
    audio = voice.synthesize("The capital")
    out, cut = trim_silence(audio, rate, lead_s=0.01, trail_s=0.03)
    assert cut / rate > 0.1  # Piper left ~150 ms after the voice
    assert out[0] == 0.0 and out[-1] == 0.0  # cut edges fade to zero: no step
    # the voice itself is untouched: the trimmed audio is a slice of the original, bar the fades
    start = next(i for i in range(audio.size) if np.array_equal(audio[i + 200 : i + 400], out[200:400]))
    np.testing.assert_array_equal(out[200:-200], audio[start + 200 : start + out.size - 200])
    lead_left = seams.reference(out, rate)
    assert lead_left.gaps_s == seams.reference(audio, rate).gaps_s  # pauses inside the voice are kept
    same, none_cut = trim_silence(audio, rate)
    assert none_cut == 0 and same.size == audio.size


def test_join_config_validation() -> None:
    with pytest.raises(ValueError):
        JoinConfig(word_gap_s=0.02, lead_s=0.05)
    with pytest.raises(ValueError):
        JoinConfig(fade_s=-1)
