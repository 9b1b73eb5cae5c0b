"""How does Piper become a livekit-agents TTS? `TTS`, with `synthesize()` (ChunkedStream) and `stream()`.

Both paths synthesise clause by clause (`rejoinder.streaming.streamed_tts.StreamedTTS`) at the voice's
own sample rate, mono: audio for the first clause is out while the rest is still text, and closing a
stream aborts the onnx call in flight. Piper runs in worker threads.
"""
from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

from livekit.agents import APIError, tts, utils
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS, APIConnectOptions

from rejoinder.streaming.assets import resolve
from rejoinder.streaming.streamed_tts import StreamedTTS
from rejoinder.streaming.tts import PiperTTS

from .models import PROVIDER

__all__ = ["TTS", "ChunkedStream", "SynthesizeStream"]


class TTS(tts.TTS):
    """Piper at the voice's own sample rate (22.05 kHz for the embedded voice), mono.

    Both paths synthesise clause by clause (`StreamedTTS`): audio for the first clause is out while the
    rest is still text, and closing a stream aborts the onnx call in flight.
    """

    def __init__(
        self,
        *,
        voice: PiperTTS | None = None,
        model_path: str | os.PathLike[str] | None = None,
        executor: Any = None,
    ) -> None:
        self._voice = voice if voice is not None else PiperTTS(resolve("tts", model_path))
        super().__init__(
            capabilities=tts.TTSCapabilities(streaming=True),
            sample_rate=self._voice.sample_rate,
            num_channels=1,
        )
        self._executor = executor

    @property
    def model(self) -> str:
        return Path(self._voice.model_path).stem

    @property
    def provider(self) -> str:
        return PROVIDER

    def _streamed(self) -> StreamedTTS:
        return StreamedTTS(self._voice, executor=self._executor)

    def synthesize(self, text: str, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS) -> ChunkedStream:
        return ChunkedStream(tts=self, input_text=text, conn_options=conn_options)

    def stream(self, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS) -> SynthesizeStream:
        return SynthesizeStream(tts=self, conn_options=conn_options)


async def _one(text: str) -> AsyncIterator[str]:
    yield text


class ChunkedStream(tts.ChunkedStream):
    def __init__(self, *, tts: TTS, input_text: str, conn_options: APIConnectOptions) -> None:
        super().__init__(tts=tts, input_text=input_text, conn_options=conn_options)
        self._rtts = tts

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        output_emitter.initialize(
            request_id=utils.shortuuid("tts_"), sample_rate=self._rtts.sample_rate, num_channels=1,
            mime_type="audio/pcm",
        )
        try:
            async with aclosing(self._rtts._streamed().run(_one(self._input_text))) as chunks:
                async for chunk in chunks:
                    output_emitter.push(chunk.audio.tobytes())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise APIError(f"Piper failed: {exc}", retryable=False) from exc
        output_emitter.flush()


class SynthesizeStream(tts.SynthesizeStream):
    def __init__(self, *, tts: TTS, conn_options: APIConnectOptions) -> None:
        super().__init__(tts=tts, conn_options=conn_options)
        self._rtts = tts

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        output_emitter.initialize(
            request_id=utils.shortuuid("tts_"), sample_rate=self._rtts.sample_rate, num_channels=1,
            mime_type="audio/pcm", stream=True,
        )
        input_ended = False
        while not input_ended:
            started = False

            async def segment_text() -> AsyncIterator[str]:
                # One segment = the text up to the next flush(); segments are numbered by the base class
                # per flush that carried text, so a segment is opened on its first text, not its first audio.
                nonlocal input_ended, started
                async for data in self._input_ch:
                    if isinstance(data, self._FlushSentinel):
                        return
                    if not started:
                        started = True
                        self._mark_started()
                        output_emitter.start_segment(segment_id=utils.shortuuid("seg_"))
                    yield data
                input_ended = True

            try:
                async with aclosing(self._rtts._streamed().run(segment_text())) as chunks:
                    async for chunk in chunks:
                        output_emitter.push(chunk.audio.tobytes())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise APIError(f"Piper failed: {exc}", retryable=False) from exc
            if started:
                output_emitter.end_segment()
