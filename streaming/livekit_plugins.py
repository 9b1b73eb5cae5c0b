"""Rejoinder's local models as livekit-agents 1.x plugins, and a LiveKit `Transport` for our own session.

Drop-in parts for any `AgentSession` (also importable as `livekit.plugins.rejoinder`):

    STT           Whisper behind our VAD-driven streaming recogniser (interim + final) and one-shot `recognize`
    LLM           our engine: chat context, sampling settings, Hermes-style tool calls, forced `tool_choice`
    TTS           Piper, `synthesize()` and streamed `stream()` at the voice's own sample rate
    VAD           Silero through our `SpeechDetector`
    TurnDetector  the semantic end-of-turn score computed on the engine (the framework's `_TurnDetector`)

and `LiveKitTransport`, which carries Rejoinder's own full-duplex session (`rejoinder livekit`) over a
LiveKit room: the participant's microphone track in, an agent audio track out, events as data packets,
transcriptions as `lk.transcription` text streams, the agent state as the `lk.agent.state` attribute.

Everything CPU-heavy runs off the event loop (the engine on its own thread, Whisper and Piper in worker
threads), as the rest of this package does. This module never imports `rejoinder.agent`.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import difflib
import functools
import json
import logging
import math
import os
import threading
import time
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterable, AsyncIterator, Callable, Literal, Mapping, Protocol, Sequence

import numpy as np
from livekit import rtc
from livekit.agents import APIError, Plugin, llm, stt, tts, utils, vad
from livekit.agents.language import LanguageCode
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS, NOT_GIVEN, APIConnectOptions, NotGivenOr

from ..engine import ContextOverflow, Engine, EngineOptions, SamplingParams, TokenStream
from ..engine.end_of_turn import EndOfTurnScorer
from .asr import ASR_RATE, WhisperASR
from .asr_stream import ASREvent, StreamingASRConfig
from .assets import resolve
from .audio import resample
from .frames import AudioFrame, FrameChunker
from .listener import Listener
from .resample import StreamResampler
from .streamed_tts import StreamedTTS
from .transport import TransportClosed
from .tts import PiperTTS
from .vad import SileroVAD, SpeechDetector, VADConfig, VADEvent

log = logging.getLogger("rejoinder.streaming.livekit")

__all__ = [
    "LLM",
    "LLMStream",
    "LiveKitTransport",
    "RejoinderPlugin",
    "STT",
    "SpeechStream",
    "TTS",
    "TurnDetector",
    "VAD",
    "VADStream",
    "chat_messages",
    "from_rtc_frame",
    "parse_tool_calls",
    "shared_engine",
    "to_rtc_frame",
]

PROVIDER = "rejoinder"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rejoinder")
    except PackageNotFoundError:
        return "0.0.0"


__version__ = _version()


# --- frames ---------------------------------------------------------------------------------------


def from_rtc_frame(frame: rtc.AudioFrame, timestamp: float | None = None) -> AudioFrame:
    """A LiveKit frame (int16 interleaved) as our AudioFrame, without rescaling."""
    x = np.frombuffer(frame.data, dtype=np.int16).copy()
    if frame.num_channels > 1:
        x = x.reshape(-1, frame.num_channels)
    return AudioFrame(x, frame.sample_rate, frame.num_channels, time.monotonic() if timestamp is None else timestamp)


def to_rtc_frame(frame: AudioFrame) -> rtc.AudioFrame:
    """Our AudioFrame (int16 or float in [-1, 1], mono or (n, channels)) as a LiveKit int16 frame."""
    x = np.asarray(frame.samples)
    if x.dtype != np.int16:
        x = (np.clip(x.astype(np.float32), -1.0, 1.0) * 32767.0).astype(np.int16)
    n = int(x.shape[0]) if x.ndim else 0
    return rtc.AudioFrame(
        data=np.ascontiguousarray(x).reshape(-1).tobytes(),
        sample_rate=frame.sample_rate,
        num_channels=frame.channels,
        samples_per_channel=n,
    )


def _buffer_to_16k(buffer: utils.AudioBuffer) -> tuple[np.ndarray, float]:
    """Float32 mono 16 kHz samples of a framework AudioBuffer, and its duration."""
    frame = rtc.combine_audio_frames(buffer) if isinstance(buffer, list) else buffer
    if frame.samples_per_channel == 0:
        return np.zeros(0, np.float32), 0.0
    x = from_rtc_frame(frame).to_float_mono()
    return resample(x, frame.sample_rate, ASR_RATE), frame.samples_per_channel / frame.sample_rate


def _language(code: str | None) -> LanguageCode:
    return LanguageCode(code or "en")


# --- the engine, shared ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def shared_engine(model_path: str | None = None, max_seq_len: int = 2048, device: str = "cpu") -> Engine:
    """One Engine per model path, so the LLM and the turn detector share a KV cache by default.

    Sharing matters beyond memory: the turn detector's prompt is the chat so far plus the user's words,
    which is exactly the prefix the next answer starts with, so scoring pre-fills most of the answer's
    prompt and the answer reuses it.
    """
    return Engine.load(resolve("llm", model_path), EngineOptions(max_seq_len=max_seq_len, device=device))


# --- chat context -> our chat messages ------------------------------------------------------------

Message = dict[str, str]

_TOOL_CALL_OPEN = "<tool_call>"
_TOOL_CALL_CLOSE = "</tool_call>"


def _format_call(name: str, arguments: str | Mapping[str, Any]) -> str:
    try:
        args = json.loads(arguments) if isinstance(arguments, str) else dict(arguments)
    except json.JSONDecodeError:
        args = arguments  # kept verbatim: the model should see what it wrote
    return f"{_TOOL_CALL_OPEN}\n{json.dumps({'name': name, 'arguments': args}, ensure_ascii=False)}\n{_TOOL_CALL_CLOSE}"


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")


def chat_messages(chat_ctx: llm.ChatContext) -> list[Message]:
    """The chat context as role/content messages for a chat template.

    Assistant tool calls become `<tool_call>` blocks in the assistant's text (the Hermes/Qwen format our
    parser reads back), tool results stay `tool` messages (see `_render` for templates that refuse them).
    Leading system/developer messages are merged: several templates only honour one system prompt.
    """
    items, _ = chat_ctx.to_provider_format("openai", inject_dummy_user_message=False)
    out: list[Message] = []
    for m in items:
        role = "system" if m.get("role") == "developer" else str(m.get("role"))
        text = _content_text(m.get("content"))
        if role == "assistant" and m.get("tool_calls"):
            calls = [_format_call(tc["function"]["name"], tc["function"]["arguments"]) for tc in m["tool_calls"]]
            text = "\n".join([text, *calls] if text else calls)
        if role == "system" and out and all(p["role"] == "system" for p in out):
            out[-1]["content"] = f"{out[-1]['content']}\n\n{text}".strip()
            continue
        out.append({"role": role, "content": text})
    return out


def _tools_prompt(schemas: Sequence[dict[str, Any]]) -> str:
    # Qwen2.5's / Hermes' own wording: models fine-tuned for tools recognise it, and the format is the
    # one `parse_tool_calls` reads.
    listing = "\n".join(json.dumps(s, ensure_ascii=False) for s in schemas)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{listing}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )


def _with_tools(messages: list[Message], schemas: Sequence[dict[str, Any]]) -> list[Message]:
    if not schemas:
        return messages
    section = _tools_prompt(schemas)
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{messages[0]['content']}\n\n{section}"}, *messages[1:]]
    return [{"role": "system", "content": section}, *messages]


def _tool_as_user(messages: list[Message]) -> list[Message]:
    """Tool results as user turns wrapped in <tool_response>, consecutive ones merged (Qwen's rendering)."""
    out: list[Message] = []
    for m in messages:
        if m["role"] != "tool":
            out.append(m)
            continue
        block = f"<tool_response>\n{m['content']}\n</tool_response>"
        if out and out[-1]["role"] == "user" and out[-1]["content"].startswith("<tool_response>"):
            out[-1] = {"role": "user", "content": f"{out[-1]['content']}\n{block}"}
        else:
            out.append({"role": "user", "content": block})
    return out


def _render(engine: Engine, messages: list[Message], add_generation_prompt: bool = True) -> str:
    # Templates that know a "tool" role (Qwen, Llama 3, SmolLM2's generic ChatML) render it as their model
    # was trained; one that raises on it gets Qwen's user-turn rendering instead.
    try:
        return engine.tokenizer.render_chat(messages, add_generation_prompt)
    except Exception:
        if not any(m["role"] == "tool" for m in messages):
            raise
        return engine.tokenizer.render_chat(_tool_as_user(messages), add_generation_prompt)


def _fit(engine: Engine, messages: list[Message], room: int) -> list[Message]:
    """Drop the oldest non-system turns until the prompt leaves `room` tokens for the answer."""
    msgs = list(messages)
    while True:
        n = len(engine.tokenizer.encode(_render(engine, msgs)))
        if n + room < engine.max_seq_len:
            return msgs
        first = 1 if msgs and msgs[0]["role"] == "system" else 0
        if len(msgs) - first <= 1:
            raise ContextOverflow(f"the last message alone ({n} tokens) does not fit a context of {engine.max_seq_len}")
        del msgs[first]


# --- tool calls -----------------------------------------------------------------------------------


def parse_tool_calls(text: str) -> tuple[str, list[tuple[str, str]]]:
    """Split model output into (plain text, [(name, arguments JSON)]) for `<tool_call>` blocks.

    A block whose JSON does not parse is kept as text rather than dropped: the caller (and the user)
    should see what the model said. An unclosed block at the end counts if its JSON is complete, since
    generation may stop right after the object.
    """
    plain: list[str] = []
    calls: list[tuple[str, str]] = []
    pos = 0
    while True:
        start = text.find(_TOOL_CALL_OPEN, pos)
        if start < 0:
            plain.append(text[pos:])
            break
        plain.append(text[pos:start])
        body_start = start + len(_TOOL_CALL_OPEN)
        end = text.find(_TOOL_CALL_CLOSE, body_start)
        body = text[body_start : end if end >= 0 else len(text)]
        parsed = _parse_call_body(body)
        if parsed is None:
            plain.append(text[start : end + len(_TOOL_CALL_CLOSE) if end >= 0 else len(text)])
        else:
            calls.append(parsed)
        if end < 0:
            break
        pos = end + len(_TOOL_CALL_CLOSE)
    return "".join(plain), calls


def _parse_call_body(body: str) -> tuple[str, str] | None:
    try:
        obj, _ = json.JSONDecoder().raw_decode(body.strip())
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models double-encode
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return obj["name"], json.dumps(args, ensure_ascii=False)


def _held_back(text: str) -> int:
    """Length of the tail of `text` that could be the start of `<tool_call>` (not safe to stream yet)."""
    for n in range(min(len(text), len(_TOOL_CALL_OPEN) - 1), 0, -1):
        if _TOOL_CALL_OPEN.startswith(text[-n:]):
            return n
    return 0


def _tool_schemas(tools: Sequence[llm.Tool]) -> list[dict[str, Any]]:
    if not tools:
        return []
    return llm.ToolContext(list(tools)).parse_function_tools("openai", strict=False)


def _forced_tool(tool_choice: NotGivenOr[llm.ToolChoice], schemas: list[dict[str, Any]]) -> tuple[bool, str | None]:
    """(must call a tool, which one or None for the model to pick) under livekit's `tool_choice`."""
    if not schemas or not utils.is_given(tool_choice) or tool_choice in ("auto", "none"):
        return False, None
    if isinstance(tool_choice, dict):
        name = tool_choice.get("function", {}).get("name")
        if name not in {s["function"]["name"] for s in schemas}:
            raise APIError(f"tool_choice names {name!r}, which is not among the tools given", retryable=False)
        return True, name
    # "required"
    return True, schemas[0]["function"]["name"] if len(schemas) == 1 else None


def _first_type(schema: Mapping[str, Any]) -> str | None:
    t = schema.get("type")
    if isinstance(t, list):
        t = next((x for x in t if x != "null"), None)
    if t is None:
        for alt in schema.get("anyOf", []) or schema.get("oneOf", []):
            if isinstance(alt, Mapping) and alt.get("type") not in (None, "null"):
                return _first_type(alt)
    return t


# --- STT ------------------------------------------------------------------------------------------


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
        # Silero keeps recurrent state: every stream needs its own.
        return SileroVAD(resolve("vad", self._vad_model))

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
    def __init__(self, *, stt: STT, conn_options: APIConnectOptions) -> None:
        # The framework resamples pushed frames to 16 kHz for us (its native resampler).
        super().__init__(stt=stt, conn_options=conn_options, sample_rate=ASR_RATE)
        self._rstt = stt
        self._utt_start_s: float | None = None
        self._request_id = utils.shortuuid("stt_")

    async def _run(self) -> None:
        listener = Listener(
            self._rstt.asr, vad=self._rstt._new_vad(), vad_config=self._rstt._vad_config,
            asr_config=self._rstt._asr_config,
        )
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
        if self._utt_start_s is not None:  # input ended mid-utterance without a final: still close it
            self._event_ch.send_nowait(stt.SpeechEvent(type=stt.SpeechEventType.END_OF_SPEECH, request_id=self._request_id))
            self._utt_start_s = None

    async def _forward(self, listener: Listener) -> None:
        async for ev in listener.events():
            self._emit(ev)

    def _emit(self, ev: VADEvent | ASREvent) -> None:
        send = self._event_ch.send_nowait
        rid = self._request_id
        lang = _language(self._rstt._language)
        if isinstance(ev, VADEvent):
            if ev.kind == "speech_start" and self._utt_start_s is None:
                self._utt_start_s = ev.audio_time_s
                send(stt.SpeechEvent(type=stt.SpeechEventType.START_OF_SPEECH, request_id=rid))
            # speech_end: the final (and END_OF_SPEECH after it) follows once the last pass is in.
            return
        start = (self._utt_start_s or 0.0) + self.start_time_offset
        data = stt.SpeechData(language=lang, text=ev.text, start_time=start, end_time=start + ev.audio_s)
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
        send(stt.SpeechEvent(type=stt.SpeechEventType.END_OF_SPEECH, request_id=rid))
        self._utt_start_s = None
        self._request_id = utils.shortuuid("stt_")


# --- LLM ------------------------------------------------------------------------------------------


class LLM(llm.LLM):
    """Our engine behind livekit's LLM interface.

    Tool calls use the Hermes/Qwen convention (tool signatures in the system prompt, `<tool_call>` JSON
    blocks in the answer), so a tool-tuned local model (Qwen2.5, Llama 3.x in that format) calls tools on
    its own under `tool_choice="auto"`. `tool_choice` naming a function (or "required") is *enforced*:
    the answer is pre-filled with the call's opening and the argument names from the tool's schema, and
    the model only writes the values, so even the embedded 135M model, which ignores tool
    instructions, produces a well-formed call.

    `tool_followup="answer"` (default) generates the turn right after tool results without tool
    definitions: a small model shown the tools again tends to repeat the call instead of answering.
    Use "auto" with models that chain calls.
    """

    def __init__(
        self,
        *,
        engine: Engine | None = None,
        model_path: str | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        max_new_tokens: int = 160,
        seed: int | None = None,
        tool_followup: Literal["answer", "auto"] = "answer",
    ) -> None:
        super().__init__()
        self._engine = engine if engine is not None else shared_engine(model_path)
        self._model_name = Path(resolve("llm", model_path)).name if engine is None else "rejoinder-engine"
        self._params = SamplingParams(
            temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens, seed=seed
        )
        self._tool_followup = tool_followup

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def model(self) -> str:
        return self._model_name

    @property
    def provider(self) -> str:
        return PROVIDER

    def sampling(self, extra: NotGivenOr[dict[str, Any]] = NOT_GIVEN) -> SamplingParams:
        p = self._params
        if not utils.is_given(extra) or not extra:
            return p
        return SamplingParams(
            temperature=float(extra.get("temperature", p.temperature)),
            top_p=float(extra.get("top_p", p.top_p)),
            top_k=int(extra.get("top_k", p.top_k)),
            max_new_tokens=int(extra.get("max_completion_tokens", extra.get("max_tokens", p.max_new_tokens))),
            seed=extra.get("seed", p.seed),
        )

    def chat(
        self,
        *,
        chat_ctx: llm.ChatContext,
        tools: list[llm.Tool] | None = None,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
        parallel_tool_calls: NotGivenOr[bool] = NOT_GIVEN,
        tool_choice: NotGivenOr[llm.ToolChoice] = NOT_GIVEN,
        extra_kwargs: NotGivenOr[dict[str, Any]] = NOT_GIVEN,
    ) -> LLMStream:
        return LLMStream(
            self,
            chat_ctx=chat_ctx,
            tools=tools or [],
            conn_options=conn_options,
            params=self.sampling(extra_kwargs),
            tool_choice=tool_choice,
            parallel_tool_calls=parallel_tool_calls if utils.is_given(parallel_tool_calls) else True,
        )


@dataclass
class _Usage:
    prompt: int = 0
    cached: int = 0
    completion: int = 0


class LLMStream(llm.LLMStream):
    def __init__(
        self,
        llm_: LLM,
        *,
        chat_ctx: llm.ChatContext,
        tools: list[llm.Tool],
        conn_options: APIConnectOptions,
        params: SamplingParams,
        tool_choice: NotGivenOr[llm.ToolChoice],
        parallel_tool_calls: bool,
    ) -> None:
        super().__init__(llm_, chat_ctx=chat_ctx, tools=tools, conn_options=conn_options)
        self._rllm = llm_
        self._params = params
        self._tool_choice = tool_choice
        self._parallel = parallel_tool_calls
        self._id = utils.shortuuid("chat_")
        self._usage = _Usage()

    async def _run(self) -> None:
        engine = self._rllm.engine
        messages = chat_messages(self._chat_ctx)
        schemas = [] if self._tool_choice == "none" else _tool_schemas(self._tools)
        try:
            forced, name = _forced_tool(self._tool_choice, schemas)
            after_tool = bool(messages) and messages[-1]["role"] == "tool"
            shown = [] if (after_tool and not forced and self._rllm._tool_followup == "answer") else schemas
            messages = _fit(engine, _with_tools(messages, shown), self._params.max_new_tokens)
            prompt = _render(engine, messages)
            if forced:
                call = await self._forced_call(prompt, name, schemas)
                self._send(llm.ChoiceDelta(role="assistant", tool_calls=[call]))
            else:
                await self._free(prompt, parse_tools=bool(shown))
        except (APIError, asyncio.CancelledError):
            raise
        except ContextOverflow as exc:
            raise APIError(str(exc), retryable=False) from exc
        except Exception as exc:  # engine failures surface as the framework's error type
            raise APIError(f"generation failed: {exc}", retryable=False) from exc
        u = self._usage
        self._event_ch.send_nowait(llm.ChatChunk(
            id=self._id,
            usage=llm.CompletionUsage(
                completion_tokens=u.completion, prompt_tokens=u.prompt, prompt_cached_tokens=u.cached,
                total_tokens=u.prompt + u.completion,
            ),
        ))

    def _send(self, delta: llm.ChoiceDelta) -> None:
        self._event_ch.send_nowait(llm.ChatChunk(id=self._id, delta=delta))

    def _start(self, text: str, params: SamplingParams) -> TokenStream:
        ids = self._rllm.engine.tokenizer.encode(text)
        if not self._usage.prompt:
            self._usage.prompt = len(ids)
        return self._rllm.engine.stream(ids, params)

    def _account(self, ts: TokenStream) -> None:
        st = ts.stats or self._rllm.engine.last_stats
        if self._usage.completion == 0:
            self._usage.cached = st.reused_tokens
        self._usage.completion += st.new_tokens

    async def _free(self, prompt: str, *, parse_tools: bool) -> None:
        """Stream text; with tools shown, `<tool_call>` blocks are held back and sent as calls."""
        ts = self._start(prompt, self._params)
        text, sent = "", 0
        try:
            async for ev in ts:
                text += ev.text
                if not parse_tools:
                    if ev.text:
                        self._send(llm.ChoiceDelta(role="assistant", content=ev.text))
                    continue
                opened = text.find(_TOOL_CALL_OPEN, sent)
                safe = opened if opened >= 0 else len(text) - _held_back(text)
                if safe <= sent:  # inside a call, or only a possible "<tool_call" prefix so far
                    continue
                self._send(llm.ChoiceDelta(role="assistant", content=text[sent:safe]))
                sent = safe
        finally:
            await ts.aclose()
            self._account(ts)
        if not parse_tools:
            return
        plain, calls = parse_tool_calls(text[sent:])
        if plain.strip():
            self._send(llm.ChoiceDelta(role="assistant", content=plain))
        if calls:
            calls = calls if self._parallel else calls[:1]
            self._send(llm.ChoiceDelta(role="assistant", tool_calls=[
                llm.FunctionToolCall(name=n, arguments=a, call_id=utils.shortuuid("call_")) for n, a in calls
            ]))

    async def _until(self, text: str, done: Callable[[str], int | None], max_new_tokens: int) -> tuple[str, bool]:
        """Generate after `text` until `done(generated)` returns a cut index; (generated[:cut], found)."""
        params = SamplingParams(
            temperature=self._params.temperature, top_p=self._params.top_p, top_k=self._params.top_k,
            seed=self._params.seed, max_new_tokens=max_new_tokens,
        )
        ts = self._start(text, params)
        out = ""
        try:
            async for ev in ts:
                out += ev.text
                cut = done(out)
                if cut is not None:
                    return out[:cut], True
        finally:
            await ts.aclose()  # stops the engine right after the value: no tokens wasted past it
            self._account(ts)
        return out, False

    async def _forced_call(self, prompt: str, name: str | None, schemas: list[dict[str, Any]]) -> llm.FunctionToolCall:
        text = prompt + _TOOL_CALL_OPEN + '\n{"name": "'
        names = [s["function"]["name"] for s in schemas]
        if name is None:
            guess, _ = await self._until(text, _string_end, 24)
            name = (difflib.get_close_matches(_unquote(guess), names, n=1, cutoff=0.0) or names)[0]
        text += name + '", "arguments": {'
        schema = next(s["function"] for s in schemas if s["function"]["name"] == name).get("parameters") or {}
        props: dict[str, Any] = schema.get("properties") or {}
        # Only required arguments: optional ones have defaults the tool applies, and a small model asked
        # for every optional field fills them with noise.
        keys = [k for k in schema.get("required", []) if k in props]
        args: dict[str, Any] = {}
        for i, key in enumerate(keys):
            text += (", " if i else "") + json.dumps(key) + ": "
            value = await self._value(text, props[key], name, key)
            args[key] = value
            text += json.dumps(value, ensure_ascii=False)
        return llm.FunctionToolCall(name=name, arguments=json.dumps(args, ensure_ascii=False), call_id=utils.shortuuid("call_"))

    async def _value(self, text: str, schema: Mapping[str, Any], tool: str, key: str) -> Any:
        kind = _first_type(schema)
        enum = schema.get("enum")
        if kind == "string" or (enum and all(isinstance(e, str) for e in enum)):
            raw, _ = await self._until(text + '"', _string_end, 48)
            value = _unquote(raw)
            if enum:
                value = (difflib.get_close_matches(value, enum, n=1, cutoff=0.0) or enum)[0]
            return value
        if kind in ("integer", "number", "boolean"):
            raw, _ = await self._until(text, _scalar_end, 12)
            token = raw.strip().rstrip(",}").strip()
            try:
                value = json.loads(token)
            except json.JSONDecodeError:
                value = None
            ok = (
                isinstance(value, bool) if kind == "boolean"
                else isinstance(value, (int, float)) and not isinstance(value, bool)
            )
            if not ok:
                raise APIError(f"the model wrote {token!r} for {tool}.{key} ({kind})", retryable=False)
            return int(value) if kind == "integer" else value
        raw, found = await self._until(text, _json_end, 96)
        if not found:
            raise APIError(f"the model wrote no valid JSON for {tool}.{key}", retryable=False)
        return json.JSONDecoder().raw_decode(raw.lstrip())[0]


def _string_end(s: str) -> int | None:
    """Index of the first unescaped quote (the end of a JSON string body), or None."""
    escaped = False
    for i, ch in enumerate(s):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            return i
        elif ch == "\n":  # a string value never spans lines here: the model has wandered off
            return i
    return None


def _unquote(body: str) -> str:
    try:
        return json.loads(f'"{body}"')
    except json.JSONDecodeError:
        return body


def _scalar_end(s: str) -> int | None:
    stripped = s.lstrip()
    if not stripped:
        return None
    offset = len(s) - len(stripped)
    for i, ch in enumerate(stripped):
        if ch in ",}\n" or (ch == " " and i > 0):
            return offset + i
    return None


def _json_end(s: str) -> int | None:
    stripped = s.lstrip()
    if not stripped:
        return None
    try:
        _, end = json.JSONDecoder().raw_decode(stripped)
    except json.JSONDecodeError:
        return None
    # "12" might still become "123": a bare number is complete only once something follows it.
    if end == len(stripped) and stripped[0] not in "{[\"tfn":
        return None
    return len(s) - len(stripped) + end


# --- TTS ------------------------------------------------------------------------------------------


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


# --- VAD ------------------------------------------------------------------------------------------


class VAD(vad.VAD):
    """Silero VAD v6 through our `SpeechDetector` (hysteresis, minimum speech, hang-over, pre-roll)."""

    def __init__(self, *, model_path: str | os.PathLike[str] | None = None, config: VADConfig | None = None) -> None:
        super().__init__(capabilities=vad.VADCapabilities(update_interval=0.032))
        self._model_path = model_path
        self._config = config or VADConfig()

    @property
    def model(self) -> str:
        return "silero-vad"

    @property
    def provider(self) -> str:
        return PROVIDER

    def stream(self) -> VADStream:
        return VADStream(self, SileroVAD(resolve("vad", self._model_path)), self._config)


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


# --- end of turn ----------------------------------------------------------------------------------


class TurnDetector:
    """livekit-agents' turn-detector protocol on our semantic end-of-turn score (`engine.end_of_turn`).

    The score is the probability that the engine's model would close the user's (still open) message
    next. Below `unlikely_threshold` the framework waits up to its max endpointing delay for more
    words; above, it ends the turn after the min delay. Measured on the embedded SmolLM2-135M:
    complete turns score 0.008-0.9, sentences cut mid-phrase 0.0000-0.006.
    """

    def __init__(
        self,
        *,
        engine: Engine | None = None,
        model_path: str | None = None,
        unlikely_threshold: float = 0.007,
        languages: Sequence[str] | None = ("en",),
        max_messages: int = 8,
    ) -> None:
        self._engine = engine if engine is not None else shared_engine(model_path)
        self._scorer = EndOfTurnScorer.shared(self._engine)
        self._threshold = unlikely_threshold
        self._languages = None if languages is None else {LanguageCode(lang).language for lang in languages}
        self._max_messages = max_messages

    @property
    def model(self) -> str:
        return "rejoinder-eot"

    @property
    def provider(self) -> str:
        return PROVIDER

    async def unlikely_threshold(self, language: LanguageCode | None) -> float | None:
        return self._threshold if await self.supports_language(language) else None

    async def supports_language(self, language: LanguageCode | None) -> bool:
        if self._languages is None or language is None:
            return True
        return LanguageCode(str(language)).language in self._languages

    async def predict_end_of_turn(self, chat_ctx: llm.ChatContext, *, timeout: float | None = 3.0) -> float:
        messages = chat_messages(chat_ctx)
        if not messages or messages[-1]["role"] != "user":
            return 1.0  # no user words pending: nothing to wait for
        # The system prompt stays: it is the prefix the answer's prompt starts with, so the KV cache
        # this pass fills is the one the answer reuses.
        system = messages[:1] if messages[0]["role"] == "system" else []
        history = system + messages[len(system) : -1][-self._max_messages :]
        text = messages[-1]["content"]
        fut = asyncio.ensure_future(self._score(history, text))
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            # The engine thread is busy (an answer is being generated): a late score is no score, and
            # holding the turn open for it would only add delay. The pass still finishes on its own.
            log.warning("end-of-turn score not ready within %.1f s; treating the turn as complete", timeout)
            return 1.0

    async def _score(self, history: list[Message], text: str) -> float:
        try:
            return await self._scorer.ascore(history, text)
        except Exception:
            if not any(m["role"] == "tool" for m in history):
                raise
            return await self._scorer.ascore(_tool_as_user(history), text)


# --- plugin registration --------------------------------------------------------------------------


class RejoinderPlugin(Plugin):
    def __init__(self) -> None:
        super().__init__("livekit.plugins.rejoinder", __version__, "rejoinder", log)

    def download_files(self) -> None:
        # Nothing is downloaded: the models ship in PyPI packages. This joins the split Whisper model
        # into the cache once, so the first job does not pay for it.
        for role in ("vad", "asr", "llm", "tts"):
            log.info("%s model: %s", role, resolve(role))


def _register() -> None:
    if any(isinstance(p, RejoinderPlugin) for p in Plugin.registered_plugins):
        return
    if threading.current_thread() is threading.main_thread():
        Plugin.register_plugin(RejoinderPlugin())
    else:  # livekit refuses registration off the main thread; plugins still work unregistered
        log.debug("livekit.plugins.rejoinder imported off the main thread: not registered")


_register()


# --- the transport of `rejoinder livekit` -------------------------------------------------------


class _TextWriter(Protocol):
    async def write(self, text: str) -> None: ...

    async def aclose(self) -> None: ...


class RoomLink(Protocol):
    """What the transport needs of the agent's side of a room (an `rtc.LocalParticipant` is one)."""

    async def publish_data(self, payload: bytes | str, *, reliable: bool = True, topic: str = "") -> None: ...

    async def stream_text(
        self, *, topic: str = "", attributes: dict[str, str] | None = None, sender_identity: str | None = None
    ) -> _TextWriter: ...

    async def set_attributes(self, attributes: dict[str, str]) -> None: ...


TOPIC_EVENTS = "rejoinder.events"
TOPIC_TRANSCRIPTION = "lk.transcription"
_AGENT_STATES = {"listening": "listening", "user_speaking": "listening", "thinking": "thinking", "speaking": "speaking"}
_EOF = object()


class LiveKitTransport:
    """One LiveKit participant as a `rejoinder.streaming.transport.Transport`.

    Audio in is the participant's microphone track (delivered by LiveKit at `input_sample_rate`, so the
    resampling happens natively); audio out goes to an `rtc.AudioSource` published as the agent's track.
    Session events are published as JSON data packets on topic "rejoinder.events", and the ones the
    LiveKit clients understand are also translated: transcripts to `lk.transcription` text streams
    (user segments sent on the user's behalf, tied to their track), the agent state to `lk.agent.state`.

    An interruption clears the source's queue, so audio already handed to LiveKit stops at once instead
    of playing out the queue.
    """

    def __init__(
        self,
        *,
        source: rtc.AudioSource,
        audio: AsyncIterable[rtc.AudioFrameEvent] | AsyncIterable[rtc.AudioFrame],
        link: RoomLink | None = None,
        user_identity: str = "",
        user_track_sid: Callable[[], str] | str = "",
        agent_track_sid: str = "",
        input_queue_frames: int = 500,
    ) -> None:
        self.output_sample_rate = source.sample_rate
        self._source = source
        self._audio = audio
        self._link = link
        self._user_identity = user_identity
        self._user_track_sid = user_track_sid
        self._agent_track_sid = agent_track_sid
        self._in: asyncio.Queue[Any] = asyncio.Queue(input_queue_frames)
        self._pump: asyncio.Task[None] | None = None
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._publisher: asyncio.Task[None] | None = None
        self._resampler: StreamResampler | None = None
        self._closed = False
        self._dropped = 0
        self.frames_in = 0
        self.frames_out = 0

    # --- construction in a room -----------------------------------------------------------------

    @classmethod
    async def join(
        cls,
        room: rtc.Room,
        participant: rtc.RemoteParticipant,
        *,
        output_sample_rate: int = 48_000,
        input_sample_rate: int = 16_000,
        track_name: str = "rejoinder",
    ) -> LiveKitTransport:
        """Publish the agent's audio track in `room` and listen to `participant`'s microphone."""
        source = rtc.AudioSource(output_sample_rate, 1, queue_size_ms=200)
        track = rtc.LocalAudioTrack.create_audio_track(track_name, source)
        pub = await room.local_participant.publish_track(
            track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
        )
        audio = rtc.AudioStream.from_participant(
            participant=participant, track_source=rtc.TrackSource.SOURCE_MICROPHONE,
            sample_rate=input_sample_rate, num_channels=1,
        )

        def user_track_sid() -> str:
            # The microphone publication may arrive after we start: look it up when a transcript goes out.
            for p in participant.track_publications.values():
                if p.source == rtc.TrackSource.SOURCE_MICROPHONE:
                    return p.sid
            return ""

        return cls(
            source=source, audio=audio, link=room.local_participant, user_identity=participant.identity,
            user_track_sid=user_track_sid, agent_track_sid=pub.sid,
        )

    # --- the Transport protocol -----------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    async def audio_in(self) -> AsyncIterator[AudioFrame]:
        if self._pump is None:
            self._pump = asyncio.create_task(self._read_audio(), name="rejoinder-livekit-audio-in")
        while True:
            item = await self._in.get()
            if item is _EOF:
                return
            yield item

    async def _read_audio(self) -> None:
        try:
            async for ev in self._audio:
                frame = ev.frame if isinstance(ev, rtc.AudioFrameEvent) else ev
                self._put_in(from_rtc_frame(frame))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("LiveKit audio stream failed")
        self._put_in(_EOF)

    def _put_in(self, item: Any) -> None:
        if self._in.full():
            # The session stalled for seconds: old audio is worth less than the newest (and EOF must land).
            with contextlib.suppress(asyncio.QueueEmpty):
                self._in.get_nowait()
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 500 == 0:
                log.warning("session not reading audio: dropped %d frame(s)", self._dropped)
        self._in.put_nowait(item)
        if item is not _EOF:
            self.frames_in += 1

    async def send_audio(self, frame: AudioFrame) -> None:
        if self._closed:
            raise TransportClosed("LiveKit transport closed")
        out = self._to_output(frame)
        if out is None:
            return
        await self._source.capture_frame(out)
        self.frames_out += 1

    def _to_output(self, frame: AudioFrame) -> rtc.AudioFrame | None:
        rate = self.output_sample_rate
        if frame.sample_rate == rate and frame.channels == 1:
            return to_rtc_frame(frame)
        if self._resampler is None or self._resampler.from_rate != frame.sample_rate:
            self._resampler = StreamResampler(frame.sample_rate, rate)
        y = self._resampler.process(frame.to_float_mono())
        if y.size == 0:
            return None
        return to_rtc_frame(AudioFrame(y, rate, 1, frame.timestamp))

    async def send_event(self, event: Mapping[str, Any]) -> None:
        ev = dict(event)
        kind = ev.get("type")
        interrupted = (kind == "barge_in" and ev.get("outcome") == "interruption") or (
            kind == "agent_speech" and not ev.get("started") and ev.get("interrupted")
        )
        if interrupted:
            self._source.clear_queue()
            self._resampler = None  # its filter holds the tail of the interrupted answer
        if self._link is None or self._closed:
            return
        # Publishing waits on the network; the session must not. One task publishes in order.
        self._events.put_nowait(ev)
        if self._publisher is None:
            self._publisher = asyncio.create_task(self._publish(), name="rejoinder-livekit-events")

    async def _publish(self) -> None:
        assert self._link is not None
        while True:
            ev = await self._events.get()
            if ev is _EOF:
                return
            try:
                await self._publish_one(self._link, ev)
            except Exception as exc:  # noqa: BLE001 - one lost event must not end the call
                log.warning("could not publish a %s event to the room: %s", ev.get("type"), exc)

    async def _publish_one(self, link: RoomLink, ev: dict[str, Any]) -> None:
        kind = ev.get("type")
        await link.publish_data(json.dumps(ev, default=str).encode(), reliable=True, topic=TOPIC_EVENTS)
        if kind == "transcript":
            sid = self._user_track_sid() if callable(self._user_track_sid) else self._user_track_sid
            await self._transcription(
                link, str(ev.get("text", "")), f"user-{ev.get('utterance_id')}", bool(ev.get("final")), sid,
                self._user_identity or None,
            )
        elif kind == "agent_text":
            await self._transcription(
                link, str(ev.get("text", "")), f"agent-{ev.get('turn')}", bool(ev.get("final")),
                self._agent_track_sid, None,
            )
        elif kind == "state" and ev.get("new") in _AGENT_STATES:
            await link.set_attributes({"lk.agent.state": _AGENT_STATES[ev["new"]]})

    @staticmethod
    async def _transcription(
        link: RoomLink, text: str, segment: str, final: bool, track_sid: str, sender: str | None
    ) -> None:
        attributes = {"lk.segment_id": segment, "lk.transcription_final": "true" if final else "false"}
        if track_sid:
            attributes["lk.transcribed_track_id"] = track_sid
        # A whole-text update per stream, as livekit-agents' own non-delta transcription output does.
        writer = await link.stream_text(topic=TOPIC_TRANSCRIPTION, attributes=attributes, sender_identity=sender)
        await writer.write(text)
        await writer.aclose()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._put_in(_EOF)
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
        aclose = getattr(self._audio, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
        if self._publisher is not None:
            self._events.put_nowait(_EOF)
            try:
                await asyncio.wait_for(self._publisher, 2.0)  # the last transcripts are worth a moment
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001
                self._publisher.cancel()
        with contextlib.suppress(Exception):
            await self._source.aclose()
