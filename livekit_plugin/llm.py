"""How does our engine become a livekit-agents LLM? `LLM` and its `LLMStream`, tool calls included.

Free answers stream token by token, `<tool_call>` blocks held back and sent as function calls
(`rejoinder.engine.tool_format` is the format). A forced `tool_choice` is *enforced*: the answer is
pre-filled with the call's opening and the argument names from the tool's schema, and the model
writes only the values, each generated until its JSON ends (the schema's type decides how a value is
read: a quoted string, a scalar, any JSON). The engine runs on its own thread; this module only
awaits its token stream.
"""
from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from livekit.agents import APIError, llm, utils
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS, NOT_GIVEN, APIConnectOptions, NotGivenOr

from rejoinder.engine import ContextOverflow, Engine, RepetitionGuard, SamplingParams, TokenStream
from rejoinder.engine.forced_call import ForcedCallError, forced_call
from rejoinder.engine.history import recent_answers
from rejoinder.engine.tool_format import ToolCallFilter
from rejoinder.streaming.assets import resolve

from .chat import chat_messages, fit, render, with_tools
from .models import PROVIDER, shared_engine

__all__ = ["LLM", "LLMStream"]


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
            messages = fit(engine, with_tools(messages, shown), self._params.max_new_tokens)
            prompt = render(engine, messages)
            if forced:
                call = await self._forced_call(prompt, name, schemas)
                self._send(llm.ChoiceDelta(role="assistant", tool_calls=[call]))
            else:
                # never the last answers again, word for word (engine/sampling.py: the repetition guard)
                guard = RepetitionGuard.of_texts(engine.tokenizer, recent_answers(messages))
                await self._free(prompt, parse_tools=bool(shown), params=dataclasses.replace(self._params, avoid=guard))
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

    async def _free(self, prompt: str, *, parse_tools: bool, params: SamplingParams) -> None:
        """Stream text; with tools shown, `<tool_call>` blocks are held back and sent as calls."""
        ts = self._start(prompt, params)
        # Broken blocks stay visible as text: the framework's user should see what the model wrote.
        calls = ToolCallFilter(keep_broken=True) if parse_tools else None
        try:
            async for ev in ts:
                out = calls.push(ev.text) if calls is not None else ev.text
                if out:
                    self._send(llm.ChoiceDelta(role="assistant", content=out))
        finally:
            await ts.aclose()
            self._account(ts)
        if calls is None:
            return
        plain = calls.finish()
        if plain:
            self._send(llm.ChoiceDelta(role="assistant", content=plain))
        found = calls.calls()
        if found:
            found = found if self._parallel else found[:1]
            self._send(llm.ChoiceDelta(role="assistant", tool_calls=[
                llm.FunctionToolCall(name=c.name, arguments=c.arguments_json, call_id=utils.shortuuid("call_"))
                for c in found
            ]))

    async def _forced_call(self, prompt: str, name: str | None, schemas: list[dict[str, Any]]) -> llm.FunctionToolCall:
        tools = {sch["function"]["name"]: sch["function"].get("parameters") or {} for sch in schemas}
        ids = self._rllm.engine.tokenizer.encode(prompt)
        if not self._usage.prompt:
            self._usage.prompt = len(ids)
        streams: list[TokenStream] = []
        try:
            call = await forced_call(self._rllm.engine, ids, tools, name, self._params, on_stream=streams.append)
        except ForcedCallError as exc:
            raise APIError(str(exc), retryable=False) from exc
        finally:
            for ts in streams:
                self._account(ts)
        return llm.FunctionToolCall(name=call.name, arguments=call.arguments_json, call_id=utils.shortuuid("call_"))


# --- tool choice and schemas ----------------------------------------------------------------------


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
