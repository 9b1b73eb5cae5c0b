"""How does Silero become a livekit-agents VAD? `VAD` and `VADStream`, through our `SpeechDetector`.

The detector adds what the bare model lacks (hysteresis, minimum speech, hang-over, pre-roll); the
stream reports it in the framework's events: START_OF_SPEECH dated back to the onset, END_OF_SPEECH
with the utterance's audio, INFERENCE_DONE per 32 ms window with the speech probability.
"""
from __future__ import annotations

import collections
import os
import time

from livekit import rtc
from livekit.agents import vad

from rejoinder.streaming.asr import ASR_RATE
from rejoinder.streaming.assets import resolve
from rejoinder.streaming.frames import FrameChunker
from rejoinder.streaming.livekit import from_rtc_frame, to_rtc_frame
from rejoinder.streaming.vad import SileroVAD, SpeechDetector, VADConfig

from .models import PROVIDER

__all__ = ["VAD", "VADStream"]


class VAD(vad.VAD):
    """Silero VAD v6 through our `SpeechDetector` (hysteresis, minimum speech, hang-over, pre-roll)."""

    def __init__(self, *, model_path: str | os.PathLike[str] | None = None, config: VADConfig | None = None) -> None:
        super().__init__(capabilities=vad.VADCapabilities(update_interval=0.032))
        self._model_path = model_path
        self._config = config or VADConfig()
        self._model: SileroVAD | None = None  # the network, loaded once; each stream keeps its own state

    @property
    def model(self) -> str:
        return "silero-vad"

    @property
    def provider(self) -> str:
        return PROVIDER

    def stream(self) -> VADStream:
        if self._model is None:
            self._model = SileroVAD(resolve("vad", self._model_path))
        return VADStream(self, self._model.new_stream(), self._config)


class VADStream(vad.VADStream):
    def __init__(self, vad_: VAD, model: SileroVAD, config: VADConfig) -> None:
        self._detector = SpeechDetector(model, config)
        super().__init__(vad_)

    async def _main_task(self) -> None:
        det = self._detector
        chunker = FrameChunker(ASR_RATE)
        history: collections.deque[tuple[float, rtc.AudioFrame]] = collections.deque(maxlen=75)  # 1.5 s of 20 ms
        speech: list[rtc.AudioFrame] = []
        speech_start_s: float | None = None
        speech_end_s = 0.0
        raw_speech_s = 0.0
        samples = 0
        threshold = det.config.threshold
        async for item in self._input_ch:
            if isinstance(item, self._FlushSentinel):
                # A hard segment boundary (the framework's contract): no speech or silence carries over.
                det.reset()
                chunker.reset()
                history.clear()
                speech, speech_start_s, raw_speech_s, samples = [], None, 0.0, 0
                continue
            for f in chunker.push(from_rtc_frame(item)):
                t0 = time.perf_counter()
                events = det.process_frame(f)
                inference_s = time.perf_counter() - t0
                frame = to_rtc_frame(f)
                frame_start_s = samples / ASR_RATE
                samples += f.samples_per_channel
                now_s = samples / ASR_RATE
                history.append((frame_start_s, frame))
                raw_speech_s = raw_speech_s + f.duration_s if det.last_prob >= threshold else 0.0
                for ev in events:
                    if ev.kind == "speech_start":
                        speech_start_s = ev.audio_time_s
                        speech = [fr for (t, fr) in history if t + fr.duration > ev.audio_time_s]
                        self._event_ch.send_nowait(self._event(
                            vad.VADEventType.START_OF_SPEECH, samples, now_s - ev.audio_time_s, 0.0,
                            list(speech), inference_s, raw_speech_s,
                        ))
                    else:
                        speech_end_s = ev.audio_time_s
                        duration = ev.audio_time_s - (speech_start_s or 0.0)
                        self._event_ch.send_nowait(self._event(
                            vad.VADEventType.END_OF_SPEECH, samples, duration, now_s - ev.audio_time_s,
                            speech, inference_s, raw_speech_s,
                        ))
                        speech, speech_start_s = [], None
                if det.in_speech and not any(e.kind == "speech_start" for e in events):
                    speech.append(frame)
                in_speech = det.in_speech
                self._event_ch.send_nowait(vad.VADEvent(
                    type=vad.VADEventType.INFERENCE_DONE,
                    samples_index=samples,
                    timestamp=time.time(),
                    speech_duration=now_s - speech_start_s if in_speech and speech_start_s is not None else 0.0,
                    silence_duration=0.0 if in_speech else now_s - speech_end_s,
                    frames=[frame],
                    probability=det.last_prob,
                    inference_duration=inference_s,
                    speaking=in_speech,
                    raw_accumulated_silence=det.silence_s,
                    raw_accumulated_speech=raw_speech_s,
                ))

    @staticmethod
    def _event(
        kind: vad.VADEventType, samples: int, speech_s: float, silence_s: float, frames: list[rtc.AudioFrame],
        inference_s: float, raw_speech_s: float,
    ) -> vad.VADEvent:
        return vad.VADEvent(
            type=kind, samples_index=samples, timestamp=time.time(), speech_duration=speech_s,
            silence_duration=silence_s, frames=frames, inference_duration=inference_s,
            speaking=kind == vad.VADEventType.START_OF_SPEECH, raw_accumulated_speech=raw_speech_s,
        )
