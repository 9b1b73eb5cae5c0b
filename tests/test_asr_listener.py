"""The listening pipeline end to end: 48 kHz transport frames -> VAD events + streaming transcripts."""
from __future__ import annotations

import numpy as np
from speech import RATE, dialogue, espeak_say, piper_say, shared_whisper

from rejoinder.streaming.asr_stream import ASREvent
from rejoinder.streaming.audio import resample
from rejoinder.streaming.frames import AudioFrame
from rejoinder.streaming.listener import Listener
from rejoinder.streaming.text_metrics import word_error_rate
from rejoinder.streaming.vad import VADEvent

WER_BOUND = 0.25


async def test_two_turns_through_the_listener():
    refs = ["Please remind me to call my sister after lunch.", "What time is it now?"]
    d = dialogue(0.5, piper_say(refs[0]), 1.5, espeak_say(refs[1], words_per_minute=140), 1.0)
    x = (resample(np.asarray(d.audio), RATE, 48000) * 32767).astype(np.int16)
    listener = Listener(shared_whisper())
    t0 = 500.0
    events = []
    for i in range(0, x.size, 480):  # 10 ms WebRTC-style frames
        await listener.push(AudioFrame(x[i : i + 480], 48000, 1, t0 + i / 48000))
        await listener.settle()  # lockstep: results independent of machine speed
        while (ev := listener.get_nowait()) is not None:
            events.append(ev)
    await listener.close()
    while (ev := listener.get_nowait()) is not None:
        events.append(ev)

    vad = [e for e in events if isinstance(e, VADEvent)]
    finals = [e for e in events if isinstance(e, ASREvent) and e.kind == "final"]
    assert [e.kind for e in vad] == ["speech_start", "speech_end"] * 2
    assert len(finals) == 2
    for ref, fin in zip(refs, finals):
        assert word_error_rate(ref, fin.text) <= WER_BOUND, fin.text
        # The pass requested when speech paused covered the end: the final needed no decode.
        assert fin.decode_s == 0.0
    # Order per turn: start, interims, end, final; interims belong to their utterance.
    kinds = [(type(e).__name__, e.kind) for e in events]
    first_final = kinds.index(("ASREvent", "final"))
    assert kinds.index(("VADEvent", "speech_end")) < first_final
    assert any(k == ("ASREvent", "interim") for k in kinds[:first_final])
    assert all(e.utterance_id in {finals[0].utterance_id, finals[1].utterance_id}
               for e in events if isinstance(e, ASREvent))
    # Capture-clock stamps line up with the dialogue's ground truth.
    for (s_true, _), start in zip(d.spans, vad[0::2]):
        assert abs(start.captured_at - (t0 + s_true)) < 0.3
    for kind in (VADEvent, ASREvent):
        stamps = [e.emitted_at for e in events if isinstance(e, kind)]
        assert stamps == sorted(stamps)
