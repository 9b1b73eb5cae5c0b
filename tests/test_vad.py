"""VAD models and the speech detector, on synthesised dialogues with known boundaries."""
from __future__ import annotations

import numpy as np
import pytest
from speech import RATE, dialogue, espeak_say, piper_say, silence

from rejoinder.streaming.vad import (
    VAD,
    SileroVAD,
    SpeechDetector,
    VADConfig,
    WebRTCVAD,
    make_vad,
    speech_segments,
)

BOUNDARY_TOL_S = 0.3


@pytest.fixture(scope="module")
def silero() -> SileroVAD:
    return SileroVAD()


@pytest.fixture(scope="module")
def two_utterances():
    return dialogue(
        0.5,
        piper_say("Hello there, could you help me with something?"),
        1.5,
        espeak_say("Yes of course, what do you need?"),
        0.7,
    )


def test_models_satisfy_protocol(silero):
    assert isinstance(silero, VAD)
    assert isinstance(WebRTCVAD(), VAD)
    assert isinstance(make_vad("webrtc", aggressiveness=3), WebRTCVAD)
    with pytest.raises(ValueError):
        make_vad("bogus")


def test_silero_scores_speech_high_and_silence_low(silero):
    speech = piper_say("This is a clear sentence spoken by the test voice.")
    silero.reset()
    w = silero.window_samples
    probs = [silero.speech_prob(np.asarray(speech[i : i + w])) for i in range(0, speech.size - w, w)]
    silero.reset()
    quiet = [silero.speech_prob(np.zeros(w, np.float32)) for _ in range(30)]
    assert np.mean(np.array(probs) > 0.5) > 0.6
    assert max(quiet) < 0.1
    with pytest.raises(ValueError):
        silero.speech_prob(np.zeros(100, np.float32))


@pytest.mark.parametrize("kind", ["silero", "webrtc"])
def test_two_utterances_two_segments(kind, silero, two_utterances):
    vad = silero if kind == "silero" else WebRTCVAD(aggressiveness=3)
    segs = speech_segments(two_utterances.audio, vad=vad)
    assert len(segs) == 2, segs
    for seg, (start, end) in zip(segs, two_utterances.spans):
        assert abs(seg.start_s - start) < BOUNDARY_TOL_S, (seg, start)
        assert abs(seg.end_s - end) < BOUNDARY_TOL_S, (seg, end)


def test_silence_and_noise_give_no_segments(silero):
    rng = np.random.default_rng(0)
    assert speech_segments(silence(3.0), vad=silero) == []
    noise = (0.01 * rng.standard_normal(3 * RATE)).astype(np.float32)
    assert speech_segments(noise, vad=silero) == []


def test_short_click_is_not_speech(silero):
    """min_speech_s keeps a burst shorter than it from starting a segment."""
    burst = piper_say("Hey.")
    from speech import trim

    burst = trim(burst)[: int(0.12 * RATE)]
    audio = np.concatenate([silence(0.5), burst, silence(1.0)])
    assert speech_segments(audio, vad=silero, config=VADConfig(min_speech_s=0.25)) == []


def test_config_is_validated():
    with pytest.raises(ValueError):
        VADConfig(threshold=1.5)
    with pytest.raises(ValueError):
        VADConfig(threshold=0.5, neg_threshold=0.7)
    with pytest.raises(ValueError):
        VADConfig(hangover_s=-1)


def test_chunk_size_does_not_change_decisions(silero, two_utterances):
    """The detector buffers internally: 20 ms frames, odd chunks and one big buffer agree exactly."""
    audio = np.asarray(two_utterances.audio)

    def run(chunk: int) -> list[tuple[str, float]]:
        det = SpeechDetector(silero)
        out = []
        for i in range(0, audio.size, chunk):
            out += [(e.kind, e.audio_time_s) for e in det.process(audio[i : i + chunk])]
        return out + [(e.kind, e.audio_time_s) for e in det.flush()]

    ref = run(audio.size)
    assert [k for k, _ in ref] == ["speech_start", "speech_end", "speech_start", "speech_end"]
    assert run(320) == ref
    assert run(777) == ref


def _heap_in_use_mib() -> float:
    from rejoinder.agent import heap

    st = heap.stats()
    if st is None:
        pytest.skip("glibc without mallinfo2")
    return st.in_use / 2**20


def test_streams_share_the_network_but_not_the_state(silero, two_utterances):
    """Interleaved streams on one network answer exactly as separate instances do; and a stream
    costs its state, not another ~11 MiB ONNX session (bench/load.py --soak found one per call)."""
    audio = two_utterances.audio
    a_in = audio[: 512 * 40].astype(np.float32)
    b_in = audio[512 * 40 : 512 * 80].astype(np.float32)
    solo_a, solo_b = SileroVAD(), SileroVAD()
    want_a = [solo_a.speech_prob(a_in[i : i + 512]) for i in range(0, a_in.size, 512)]
    want_b = [solo_b.speech_prob(b_in[i : i + 512]) for i in range(0, b_in.size, 512)]
    a, b = silero.new_stream(), silero.new_stream()
    got_a, got_b = [], []
    for i in range(0, a_in.size, 512):
        got_a.append(a.speech_prob(a_in[i : i + 512]))
        got_b.append(b.speech_prob(b_in[i : i + 512]))
    np.testing.assert_allclose(got_a, want_a, atol=1e-5)
    np.testing.assert_allclose(got_b, want_b, atol=1e-5)
    assert max(want_a + want_b) > 0.5 > min(want_a + want_b)  # both speech and silence were scored

    before = _heap_in_use_mib()
    streams = [silero.new_stream() for _ in range(20)]
    for s in streams:
        s.speech_prob(a_in[:512])
    grew = _heap_in_use_mib() - before
    assert grew < 5.0, f"20 streams took {grew:.1f} MiB (a separate SileroVAD takes ~11 MiB each)"


def test_cut_ends_an_open_segment_and_the_detector_starts_afresh(silero):
    """`cut()`: the session ends an utterance the echo canceller's engagement changed under it."""
    speech = np.asarray(piper_say("Hello there, could you help me with something today, please?"), np.float32)
    det = SpeechDetector(silero.new_stream(), VADConfig(min_speech_s=0.2, hangover_s=0.3))
    assert det.cut() == []  # nothing open: nothing to end
    events, k = [], 0
    while not det.in_speech and k < speech.size:
        events += det.process(speech[k : k + 320])
        k += 320
    assert [e.kind for e in events] == ["speech_start"]
    cut = det.cut()
    assert [e.kind for e in cut] == ["speech_end"] and not det.in_speech
    assert cut[0].audio_time_s == pytest.approx(k / RATE, abs=0.04)  # ended now, not at the audio's end
    # The rest of the same speech is a new segment, after min_speech_s of it.
    rest = det.process(speech[k:])
    assert rest and rest[0].kind == "speech_start"
    assert rest[0].audio_time_s >= cut[0].audio_time_s - det.config.pre_roll_s
