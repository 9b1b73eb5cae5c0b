"""The generation engine: load a model, keep its KV cache across turns, stream tokens, cancel any time.

One Engine owns one model and one KV cache, so calls are serialised on a single worker thread; the
asyncio side (`stream`) never blocks the event loop. The cache remembers which token ids it holds;
a new prompt that starts with them (the conversation so far) only prefills what is new. Decode
steps and short prompts run on the engine's `Decoder` (decoder.py: native C on CPU, Triton on
CUDA, or the eager model itself); longer prompts on the eager model.
"""
from __future__ import annotations

import asyncio
import os
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from rejoinder.errors import BadInputError, ConfigError

from ..kernels import pack_q4_0_blocks, pack_q4_1_blocks, pack_q8_0_blocks
from ..kernels.cpu_native import NativeKernelsUnavailable
from ..kernels.ggml import Q4_0, Q4_1, Q8_0, GGMLWeight
from .config import ModelConfig
from .decoder import Decoder, EagerDecoder
from .errors import ContextOverflow, ModelFileError
from .model import Transformer
from .sampling import SamplingParams, sample
from .tokenizer import ChatTokenizer, Message, tokenizer_from_folder, tokenizer_from_gguf

T = TypeVar("T")


@dataclass(frozen=True)
class EngineOptions:
    max_seq_len: int = 4096
    device: str = "cpu"
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    threads: int = 0  # 0: leave torch's default
    # Who runs single-token decode steps. "native": the compiled CPU step (engine/cpu_decoder.py;
    # fp32 CPU models, GGUF Q4/Q8 weights kept in their blocks); "triton": the Triton kernels in a
    # CUDA graph (engine/triton_decoder.py; CUDA only); "eager": the torch model for every step
    # (the reference and the baseline); "auto": triton on CUDA, native on CPU when a C compiler is
    # at hand (eager, with a warning, when not).
    backend: str = "auto"

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
        if self.dtype not in dtypes:
            raise ConfigError(f"unknown engine dtype {self.dtype!r}; one of auto, {', '.join(dtypes)}")
        return dtypes[self.dtype]


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    text: str  # the text this token completes (may be "" while a UTF-8 sequence is incomplete)
    index: int  # 0-based position among the generated tokens
    t: float  # time.monotonic() when the token was sampled


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens whose KV came from the cache
    prefill_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    ttft_s: float = 0.0  # request start -> first token sampled
    decode_s: float = 0.0
    finish_reason: str = ""  # "stop", "length", "cancelled"
    started_at: float = 0.0

    @property
    def decode_tok_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s > 0 else 0.0


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


BACKENDS = ("auto", "native", "triton", "eager")


class Engine:
    def __init__(
        self,
        model: Transformer,
        tokenizer: ChatTokenizer,
        options: EngineOptions = EngineOptions(),
        blocks: dict[str, GGMLWeight] | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.options = options
        self.device = next(model.parameters()).device
        self.max_seq_len = min(options.max_seq_len, model.cfg.max_position)
        model.setup_cache(self.max_seq_len)
        self._eager = EagerDecoder(model)  # prefills long prompts whatever runs the steps
        self.decoder: Decoder = self._decoder(options, blocks)
        self._cached_ids: list[int] = []
        # EndOfTurnScorer.shared keeps this engine's one scorer here (building it walks the vocabulary)
        self._end_of_turn_scorer: object | None = None
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rejoinder-engine")
        self.last_stats = GenerationStats()

    def _decoder(self, options: EngineOptions, blocks: dict[str, GGMLWeight] | None) -> Decoder:
        """What runs decode steps for this model, device and backend option."""
        if options.backend not in BACKENDS:
            raise ConfigError(f"unknown engine backend {options.backend!r}; one of {', '.join(BACKENDS)}")
        if self.device.type == "cuda":
            if options.backend == "native":
                raise ConfigError("backend 'native' is the float32 CPU path")
            if options.backend == "eager":
                return self._eager
            from .triton_decoder import TritonDecoder

            decoder = TritonDecoder(self.model, _packed_for_triton(blocks or {}))
            decoder.capture()
            return decoder
        if options.backend == "triton":
            raise ConfigError("backend 'triton' needs a CUDA device")
        native_fits = self.device.type == "cpu" and next(self.model.parameters()).dtype == torch.float32
        if options.backend == "eager" or (options.backend == "auto" and not native_fits):
            return self._eager
        if not native_fits:
            raise ConfigError("backend 'native' is the float32 CPU path")
        from .cpu_decoder import NativeDecoder

        threads = options.threads if options.threads > 0 else torch.get_num_threads()
        try:
            return NativeDecoder(self.model, blocks, threads=threads)
        except NativeKernelsUnavailable as exc:
            if options.backend == "native":
                raise
            warnings.warn(f"{exc}; decode steps run in eager torch (several times slower)", stacklevel=3)
            return self._eager

    @property
    def backend(self) -> str:
        """What runs decode steps: "native", "triton" or "eager"."""
        return self.decoder.name

    # --- loading --------------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        options: EngineOptions = EngineOptions(),
        progress: Callable[[int, int], None] | None = None,
    ) -> Engine:
        """Load a GGUF file or an HF-style safetensors folder (config.json + tokenizer.json)."""
        path = Path(path)
        blocks = None
        if options.threads > 0:
            torch.set_num_threads(options.threads)
        if path.is_dir():
            from .safetensors_loader import generation_eos_ids, load_safetensors_folder

            cfg, state, raw = load_safetensors_folder(path)
            tokenizer = tokenizer_from_folder(path, generation_eos_ids(path, raw))
        elif path.is_file():
            from .gguf_loader import load_gguf

            keep = options.backend != "eager"
            contents = load_gguf(path, progress, keep_blocks=keep)
            cfg, state, blocks = contents.config, contents.state_dict, contents.blocks
            tokenizer = tokenizer_from_gguf(contents.metadata)
        else:
            raise ModelFileError(f"model path does not exist: {path}")
        model = build_model(cfg, state, options)
        return cls(model, tokenizer, options, blocks)

    def reset(self) -> None:
        """Forget the cached prefix (the next prompt is prefilled from scratch)."""
        with self._lock:
            self._cached_ids = []

    # --- core decoding (runs on the engine thread) -----------------------------------------------

    @torch.inference_mode()
    def _forward(self, ids: Sequence[int], start: int) -> torch.Tensor:
        """Logits [1, V] after `ids` at positions start..: the one speed seam. Decode steps and short
        prompts go to the decoder, longer prompts to the eager model's GEMMs."""
        if len(ids) == 1:
            return self.decoder.step(ids[0], start)[None].clone()  # decoders reuse their buffer
        if len(ids) <= self.decoder.prefill_max:
            return self.decoder.prefill(ids, start)[None].clone()
        return self._eager.prefill(ids, start)[None]

    @torch.inference_mode()
    def prefill(self, ids: Sequence[int]) -> torch.Tensor:
        """Make the cache hold exactly `ids` and return the next-token logits [V] (float32)."""
        ids = list(ids)
        if not ids:
            raise BadInputError("empty prompt")
        if len(ids) >= self.max_seq_len:
            raise ContextOverflow(f"prompt of {len(ids)} tokens does not fit a context of {self.max_seq_len}")
        common = _common_prefix(self._cached_ids, ids)
        if common == len(ids):
            common -= 1  # we need logits, so at least the last token is run again
        self._cached_ids = self._cached_ids[:common]  # anything past the divergence is stale
        logits = self._forward(ids[common:], common)
        self._cached_ids = ids
        self.last_stats.reused_tokens = common
        self.last_stats.prefill_tokens = len(ids) - common
        return logits[0]

    def generate(
        self,
        ids: Sequence[int],
        params: SamplingParams = SamplingParams(),
        cancel: threading.Event | None = None,
    ) -> Iterator[TokenEvent]:
        """Synchronous token generator. Setting `cancel` stops it before the next forward pass."""
        with self._lock:
            yield from self._generate_locked(list(ids), params, cancel)

    def _generate_locked(self, ids: list[int], params: SamplingParams, cancel: threading.Event | None):
        stats = GenerationStats(prompt_tokens=len(ids), started_at=time.monotonic())
        self.last_stats = stats
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(params.seed)
        stop_ids = self.tokenizer.stop_ids
        if cancel is not None and cancel.is_set():
            stats.finish_reason = "cancelled"
            return
        logits = self.prefill(ids)
        stats.reused_tokens, stats.prefill_tokens = self.last_stats.reused_tokens, self.last_stats.prefill_tokens
        self.last_stats = stats
        stats.prefill_s = time.monotonic() - stats.started_at
        generated: list[int] = []
        emitted = ""
        t_first = 0.0
        while True:
            token = int(sample(logits[None], params, gen, generated)[0])
            now = time.monotonic()
            if not generated:
                t_first = now
                stats.ttft_s = now - stats.started_at
            if token in stop_ids:
                stats.finish_reason = "stop"
                break
            generated.append(token)
            stats.new_tokens = len(generated)
            text = self.tokenizer.decode(generated)
            delta = ""
            if not text.endswith("\ufffd"):  # hold back half a UTF-8 character
                delta, emitted = text[len(emitted):], text
            yield TokenEvent(token, delta, len(generated) - 1, now)
            if len(generated) >= params.max_new_tokens:
                stats.finish_reason = "length"
                break
            if len(self._cached_ids) + 1 >= self.max_seq_len:
                stats.finish_reason = "length"
                break
            if cancel is not None and cancel.is_set():
                stats.finish_reason = "cancelled"
                break
            with torch.inference_mode():
                logits = self._forward([token], len(self._cached_ids))[0]
            self._cached_ids.append(token)
        stats.decode_s = (time.monotonic() - t_first) if t_first else 0.0

    # --- conveniences ----------------------------------------------------------------------------

    def next_token_probs(self, ids: Sequence[int]) -> torch.Tensor:
        """Probabilities [V] of the token after `ids` (prefix reuse applies; the cache then holds `ids`)."""
        with self._lock:
            with torch.inference_mode():
                return torch.softmax(self.prefill(ids).float(), dim=-1)

    async def run_async(self, fn: Callable[..., T], *args: object) -> T:
        """Run `fn(*args)` on the engine thread, after any generation queued before it."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def chat_ids(self, messages: Sequence[Message]) -> list[int]:
        return self.tokenizer.encode_chat(messages, add_generation_prompt=True)

    def complete(self, messages: Sequence[Message], params: SamplingParams = SamplingParams()) -> str:
        out = [ev.token_id for ev in self.generate(self.chat_ids(messages), params)]
        return self.tokenizer.decode(out)

    def stream(
        self,
        prompt: Sequence[Message] | Sequence[int],
        params: SamplingParams = SamplingParams(),
    ) -> TokenStream:
        """Start generating on the engine thread; iterate the result with `async for`."""
        ids = list(prompt) if prompt and isinstance(prompt[0], int) else self.chat_ids(prompt)  # type: ignore[arg-type]
        return TokenStream(self, ids, params)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


_END = object()


class TokenStream:
    """An async iterator of TokenEvents, produced on the engine thread; `cancel()` or `aclose()` stop it."""

    def __init__(self, engine: Engine, ids: list[int], params: SamplingParams):
        self.engine = engine
        self._cancel = threading.Event()
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self.stats: GenerationStats | None = None
        self._done = self._loop.run_in_executor(engine._executor, self._work, ids, params)

    def _work(self, ids: list[int], params: SamplingParams) -> None:
        put = self._loop.call_soon_threadsafe
        try:
            for event in self.engine.generate(ids, params, self._cancel):
                put(self._queue.put_nowait, event)
            self.stats = self.engine.last_stats
        except BaseException as exc:  # surfaced to the consumer, not lost in the thread
            put(self._queue.put_nowait, exc)
        finally:
            put(self._queue.put_nowait, _END)

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self

    async def __anext__(self) -> TokenEvent:
        item = await self._queue.get()
        if item is _END:
            await self._done
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    async def aclose(self) -> None:
        """Cancel and wait until the engine thread has really stopped (at most one token later)."""
        self.cancel()
        await self._done

    async def text(self) -> str:
        return "".join([ev.text async for ev in self])


def _packed_for_triton(blocks: dict[str, GGMLWeight]) -> dict:
    """GGUF blocks -> the Triton GEMV's packed weights (lossless; moved to the GPU by the decoder)."""
    pack = {Q4_0: pack_q4_0_blocks, Q4_1: pack_q4_1_blocks, Q8_0: pack_q8_0_blocks}
    # the embedding is looked up, not multiplied: only the (possibly tied) output head needs packing
    return {
        n: pack[w.type](w.data, (w.rows, w.cols))
        for n, w in blocks.items()
        if w.type in pack and n != "embed.weight"
    }


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], options: EngineOptions) -> Transformer:
    with torch.device("meta"):
        model = Transformer(cfg)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelFileError(f"weights do not match the model config: {str(exc).splitlines()[0]}") from None
    if cfg.tie_embeddings:
        model.output.weight = model.embed.weight
    model = model.to(device=options.device, dtype=options.torch_dtype())
    return model.eval()
