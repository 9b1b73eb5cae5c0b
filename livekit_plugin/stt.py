"""How does Whisper become a livekit-agents STT? `STT` (one-shot `recognize`) and `SpeechStream` (streaming).

The stream runs Rejoinder's own VAD-driven streaming recogniser (`rejoinder.streaming.listener`):
local-agreement interim hypotheses while the user speaks, one final per utterance. Whisper runs in a
worker thread, never on the event loop.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import os
from pathlib import Path

import numpy as np
from livekit import rtc
from livekit.agents import APIError, stt, utils
from livekit.agents.language import LanguageCode
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS, NOT_GIVEN, APIConnectOptions, NotGivenOr

from rejoinder.streaming.asr import ASR_RATE, WhisperASR
from rejoinder.streaming.asr_stream import ASREvent, StreamingASRConfig
from rejoinder.streaming.assets import resolve
from rejoinder.streaming.audio import resample
from rejoinder.streaming.listener import Listener
from rejoinder.streaming.livekit import from_rtc_frame
from rejoinder.streaming.vad import SileroVAD, VADConfig, VADEvent

from .log import logger as log
from .models import PROVIDER

__all__ = ["STT", "SpeechStream"]


def _buffer_to_16k(buffer: utils.AudioBuffer) -> tuple[np.ndarray, float]:
    """Float32 mono 16 kHz samples of a framework AudioBuffer, and its duration."""
    frame = rtc.combine_audio_frames(buffer) if isinstance(buffer, list) else buffer
    if frame.samples_per_channel == 0:
        return np.zeros(0, np.float32), 0.0
    x = from_rtc_frame(frame).to_float_mono()
    return resample(x, frame.sample_rate, ASR_RATE), frame.samples_per_channel / frame.sample_rate


def _language(code: str | None) -> LanguageCode:
    return LanguageCode(code or "en")



class STT(stt.STT):
    """Whisper (faster-whisper, local) with our streaming recogniser.

    `stream()` segments the audio itself (Silero VAD), so it emits START_OF_SPEECH, INTERIM_TRANSCRIPT
    (local-agreement hypotheses while the user speaks), FINAL_TRANSCRIPT, RECOGNITION_USAGE and
    END_OF_SPEECH per utterance, whatever the session's own VAD does.
    """

    def __init__(
        self,
        *,
        asr: WhisperASR | None = None,
        model_dir: str | os.PathLike[str] | None = None,
        language: str = "en",
        vad_model: str | os.PathLike[str] | None = None,
        vad_config: VADConfig | None = None,
        asr_config: StreamingASRConfig | None = None,
    ) -> None:
        super().__init__(
            capabilities=stt.STTCapabilities(streaming=True, interim_results=True, offline_recognize=True)
        )
        self._asr = asr if asr is not None else WhisperASR(resolve("asr", model_dir), language=language or None)
        self._language = language
        self._vad_model = vad_model
        self._vad_network: SileroVAD | None = None  # loaded on first use; streams share it
        self._vad_config = vad_config
        self._asr_config = asr_config

    @property
    def model(self) -> str:
        return Path(self._asr.model_dir).name

    @property
    def provider(self) -> str:
        return PROVIDER

    @property
    def asr(self) -> WhisperASR:
        return self._asr

    def _new_vad(self) -> SileroVAD:
        # Silero keeps recurrent state: every stream needs its own, on the one loaded network.
        if self._vad_network is None:
            self._vad_network = SileroVAD(resolve("vad", self._vad_model))
        return self._vad_network.new_stream()

    async def _recognize_impl(
        self,
        buffer: utils.AudioBuffer,
        *,
        language: NotGivenOr[str] = NOT_GIVEN,
        conn_options: APIConnectOptions,
    ) -> stt.SpeechEvent:
        samples, duration = _buffer_to_16k(buffer)
        try:
            tr = await asyncio.to_thread(self._asr.transcribe, samples)
        except Exception as exc:
            raise APIError(f"Whisper failed: {exc}", retryable=False) from exc
        logprobs = [s.avg_logprob for s in tr.segments]
        confidence = math.exp(sum(logprobs) / len(logprobs)) if logprobs else 0.0
        return stt.SpeechEvent(
            type=stt.SpeechEventType.FINAL_TRANSCRIPT,
            request_id=utils.shortuuid("stt_"),
            alternatives=[
                stt.SpeechData(
                    language=_language(tr.language or self._language),
                    text=tr.text,
                    start_time=0.0,
                    end_time=duration,
                    confidence=min(1.0, confidence),
                )
            ],
        )

    def stream(
        self,
        *,
        language: NotGivenOr[str] = NOT_GIVEN,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
    ) -> SpeechStream:
        return SpeechStream(stt=self, conn_options=conn_options)


class SpeechStream(stt.RecognizeStream):
    """One stream's utterances, each bracketed by its own START_OF_SPEECH ... END_OF_SPEECH.

    The listener may open the next utterance (VAD speech start, interims) while the previous one's
    final is still being decoded. The framework's events do not overlap, so such an utterance waits:
    its START_OF_SPEECH goes out right after the previous END_OF_SPEECH, then its held transcripts
    (the latest interim, and the final if it is already there). Timestamps are each utterance's own
    speech start in the stream.
    """

    def __init__(self, *, stt: STT, conn_options: APIConnectOptions) -> None:
        # The framework resamples pushed frames to 16 kHz for us (its native resampler).
        super().__init__(stt=stt, conn_options=conn_options, sample_rate=ASR_RATE)
        self._rstt = stt
        self._request_id = utils.shortuuid("stt_")
        self._starts: dict[int, float] = {}  # utterance id -> where its speech began (stream seconds)
        self._next_uid = 1  # the utterance id the next VAD speech start opens (the listener's ASR counts)
        self._open: int | None = None  # the utterance between its START_OF_SPEECH and END_OF_SPEECH
        self._waiting: collections.deque[int] = collections.deque()  # began while another was open
        self._held: dict[int, list[ASREvent]] = {}  # transcripts of waiting utterances

    async def _run(self) -> None:
        listener = Listener(
            self._rstt.asr, vad=self._rstt._new_vad(), vad_config=self._rstt._vad_config,
            asr_config=self._rstt._asr_config,
        )
        self._next_uid = listener.asr.next_utterance_id
        forward = asyncio.create_task(self._forward(listener), name="rejoinder-stt-forward")
        try:
            async for item in self._input_ch:
                if isinstance(item, self._FlushSentinel):
                    # A segment boundary: whatever is open is finished now rather than after the hang-over.
                    await listener.close()
                    continue
                await listener.push(from_rtc_frame(item))
            await listener.close()
        finally:
            forward.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await forward
        while (ev := listener.get_nowait()) is not None:
            self._emit(ev)
        # Input ended mid-utterance without a final: still close what was opened, in order.
        while self._open is not None:
            self._end(self._open)
            self._advance()

    async def _forward(self, listener: Listener) -> None:
        async for ev in listener.events():
            self._emit(ev)

    def _emit(self, ev: VADEvent | ASREvent) -> None:
        if isinstance(ev, VADEvent):
            if ev.kind == "speech_start":
                # Speech start opens the listener's next ASR utterance: ids count up from its first.
                uid, self._next_uid = self._next_uid, self._next_uid + 1
                self._starts[uid] = ev.audio_time_s
                if self._open is None:
                    self._begin(uid)
                else:
                    self._waiting.append(uid)
            # speech_end: the final (and END_OF_SPEECH after it) follows once the last pass is in.
            return
        uid = ev.utterance_id
        if uid == self._open:
            self._transcript(uid, ev)
            return
        if uid not in self._starts:  # not opened by a speech start we saw: nothing to bracket it with
            log.debug("ASR event for unknown utterance %d dropped", uid)
            return
        held = self._held.setdefault(uid, [])
        if ev.kind == "interim" and held and held[-1].kind == "interim":
            held[-1] = ev  # a later interim supersedes the earlier one
        else:
            held.append(ev)

    def _begin(self, uid: int) -> None:
        self._open = uid
        self._request_id = utils.shortuuid("stt_")
        self._event_ch.send_nowait(stt.SpeechEvent(type=stt.SpeechEventType.START_OF_SPEECH,
                                                   request_id=self._request_id))
        for ev in self._held.pop(uid, []):
            if self._open != uid:
                break
            self._transcript(uid, ev)

    def _end(self, uid: int) -> None:
        self._event_ch.send_nowait(stt.SpeechEvent(type=stt.SpeechEventType.END_OF_SPEECH,
                                                   request_id=self._request_id))
        self._starts.pop(uid, None)
        self._open = None

    def _advance(self) -> None:
        """Open the next waiting utterance (and any after it whose final was already held)."""
        while self._open is None and self._waiting:
            self._begin(self._waiting.popleft())

    def _transcript(self, uid: int, ev: ASREvent) -> None:
        send = self._event_ch.send_nowait
        rid = self._request_id
        start = self._starts[uid] + self.start_time_offset
        data = stt.SpeechData(language=_language(self._rstt._language), text=ev.text, start_time=start,
                              end_time=start + ev.audio_s)
        if ev.kind == "interim":
            if ev.text:
                send(stt.SpeechEvent(type=stt.SpeechEventType.INTERIM_TRANSCRIPT, request_id=rid, alternatives=[data]))
            return
        if ev.text:
            send(stt.SpeechEvent(type=stt.SpeechEventType.FINAL_TRANSCRIPT, request_id=rid, alternatives=[data]))
        send(stt.SpeechEvent(
            type=stt.SpeechEventType.RECOGNITION_USAGE, request_id=rid,
            recognition_usage=stt.RecognitionUsage(audio_duration=ev.audio_s),
        ))
        self._end(uid)
        self._advance()
