"""The generation engine: load a model, keep each session's KV cache across turns, stream tokens, cancel any time.

One Engine owns one model and a KV cache of `kv_slots` slots, one per session (kv_slots.py). All
model work runs on one engine thread (scheduler.py) that batches the decode steps of every
generation in flight into one pass over the weights; the asyncio side (`stream`) never blocks the
event loop. Each slot remembers which token ids it holds; a new prompt for the same session that
starts with them (the conversation so far) only prefills what is new. Decode steps and short
prompts run on the engine's `Decoder` (decoder.py: native C on CPU, Triton on CUDA, or the eager
model itself); longer prompts on the eager model.

Sessions name their slot with `slot=` (a session id) on `stream`, `generate`, `prefill`,
`next_token_probs` and `run_async`, and free it with `release_slot` when they end; callers that
name none share the default slot (`None`) and are served one at a time, as before slots existed.
"""
from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import torch

from rejoinder.errors import BadInputError, ConfigError, EngineError

from ..kernels import pack_q4_0_blocks, pack_q4_1_blocks, pack_q8_0_blocks
from ..kernels.cpu_native import NativeKernelsUnavailable
from ..kernels.ggml import Q4_0, Q4_1, Q8_0, GGMLWeight
from .config import ModelConfig
from .decoder import Decoder, EagerDecoder
from .errors import ContextOverflow, ModelFileError
from .generation import Generation, GenerationSink, GenerationStats, TokenEvent
from .kv_slots import Slot, SlotKey, common_prefix
from .model import Transformer
from .sampling import SamplingParams
from .scheduler import ANY_TIME, Scheduler
from .stream import TokenStream
from .tokenizer import ChatTokenizer, Message, tokenizer_from_folder, tokenizer_from_gguf

T = TypeVar("T")
__all__ = ["Engine", "EngineOptions", "GenerationStats", "TokenEvent", "TokenStream", "build_model"]


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
    # KV-cache slots: how many sessions keep their prefix cached at once, and the most generations
    # decoded together in one batch. Each costs `Engine.kv_slot_bytes` (kv_slots.py: 90 MiB for
    # SmolLM2-135M at 2048 positions in fp32, resident only as far as it is used).
    kv_slots: int = 4

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
        if self.dtype not in dtypes:
            raise ConfigError(f"unknown engine dtype {self.dtype!r}; one of auto, {', '.join(dtypes)}")
        return dtypes[self.dtype]


PREFIX_COPY_MIN = 4  # tokens another slot must hold beyond ours before its K/V are copied over


BACKENDS = ("auto", "native", "triton", "eager")


class Engine:
    def __init__(
        self,
        model: Transformer,
        tokenizer: ChatTokenizer,
        options: EngineOptions = EngineOptions(),
        blocks: dict[str, GGMLWeight] | None = None,
    ):
        if options.kv_slots < 1:
            raise ConfigError(f"kv_slots must be at least 1, got {options.kv_slots}")
        self.model = model
        self.tokenizer = tokenizer
        self.options = options
        self.device = next(model.parameters()).device
        self.max_seq_len = min(options.max_seq_len, model.cfg.max_position)
        model.setup_cache(self.max_seq_len, options.kv_slots)
        self._eager = EagerDecoder(model)  # prefills long prompts whatever runs the steps
        self.decoder: Decoder = self._decoder(options, blocks)
        self._scheduler = Scheduler(self, options.kv_slots)
        # EndOfTurnScorer.shared keeps this engine's one scorer here (building it walks the vocabulary)
        self._end_of_turn_scorer: object | None = None
        self.last_stats = GenerationStats()  # of the latest request; concurrent callers read their stream's

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

    @property
    def kv_slot_bytes(self) -> int:
        """Bytes of K and V one session's cache slot takes (for all `max_seq_len` positions)."""
        cfg, k = self.model.cfg, self.model.layers[0].attn.cache.k
        return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * self.max_seq_len * k.element_size()

    @property
    def generating(self) -> int:
        """How many generations are decoding right now (a snapshot)."""
        return len(self._scheduler.running)

    def batch_histogram(self) -> dict[int, int]:
        """Decode steps run so far, by how many generations shared each (a snapshot)."""
        return dict(self._scheduler.batch_sizes)

    def slot_keys(self) -> list[SlotKey]:
        """The sessions whose prefix is cached now, least recently used first (a snapshot)."""
        return self._scheduler.slots.keys()

    def reset(self) -> None:
        """Forget every cached prefix (next prompts prefill from scratch); slots decoding are left alone."""
        self._call(self._scheduler.slots.clear, key=ANY_TIME, needs_slot=False)

    def release_slot(self, slot: SlotKey) -> None:
        """Free a session's cache slot (call when the session ends). Returns at once; the slot is freed
        after the session's queued work, so another session can have it without evicting anyone."""
        if slot is not None:
            self._scheduler.call(partial(self._scheduler.slots.forget, slot), slot, needs_slot=False)

    # --- core decoding (runs on the engine thread) -----------------------------------------------

    @torch.inference_mode()
    def _forward(self, ids: Sequence[int], start: int, slot: int) -> torch.Tensor:
        """Logits [V] after `ids` at positions start.. of cache slot `slot`: the one speed seam for
        prompts. Decode steps and short prompts go to the decoder, longer prompts to the eager GEMMs."""
        if len(ids) == 1:
            return self.decoder.step(ids[0], start, slot).clone()  # decoders reuse their buffer
        if len(ids) <= self.decoder.prefill_max:
            return self.decoder.prefill(ids, start, slot).clone()
        return self._eager.prefill(ids, start, slot)

    @torch.inference_mode()
    def step_batch(self, tokens: list[int], positions: list[int], slots: list[int]) -> torch.Tensor:
        """One decode step for B sequences (token b at position b of slot b) -> logits [B, V], in a
        buffer the next step may reuse. The scheduler's speed seam: one pass over the weights."""
        if len(tokens) == 1:
            return self.decoder.step(tokens[0], positions[0], slots[0])[None]
        return self.decoder.step_batch(tokens, positions, slots)

    def prefill_slot(self, slot: Slot, ids: list[int], stats: GenerationStats) -> torch.Tensor:
        """Make `slot` hold exactly `ids`, running only what it does not hold yet; the next-token
        logits [V] (float32). Fills `stats` (reused / prefilled tokens)."""
        if not ids:
            raise BadInputError("empty prompt")
        if len(ids) >= self.max_seq_len:
            raise ContextOverflow(f"prompt of {len(ids)} tokens does not fit a context of {self.max_seq_len}")
        common = common_prefix(slot.ids, ids)
        donor, shared = self._scheduler.slots.longest_prefix(ids, exclude=slot)
        if donor is not None and shared > common + PREFIX_COPY_MIN:
            self.model.copy_cache_prefix(donor.index, slot.index, shared)  # a memcpy, not a prefill
            slot.ids[:] = donor.ids[:shared]
            common = shared
        if common == len(ids):
            common -= 1  # we need logits, so at least the last token is run again
        del slot.ids[common:]  # anything past the divergence is stale
        logits = self._forward(ids[common:], common, slot.index)
        slot.ids[:] = ids
        stats.reused_tokens = common
        stats.prefill_tokens = len(ids) - common
        stats.prefill_s = time.monotonic() - stats.started_at
        return logits

    def _prefill_now(self, ids: list[int], key: SlotKey) -> torch.Tensor:
        stats = GenerationStats(prompt_tokens=len(ids), started_at=time.monotonic())
        self.last_stats = stats
        return self.prefill_slot(self._scheduler.slot_for(key), ids, stats)

    def _call(self, fn: Callable[..., T], *args: object, key: object, needs_slot: bool = True) -> T:
        """fn(*args) on the engine thread (directly when already there), waiting for the result."""
        if self._scheduler.on_engine_thread():
            return fn(*args)
        return self._scheduler.call(partial(fn, *args), key, needs_slot).result()

    # --- the public API --------------------------------------------------------------------------

    def prefill(self, ids: Sequence[int], *, slot: SlotKey = None) -> torch.Tensor:
        """Make the slot hold exactly `ids` and return the next-token logits [V] (float32)."""
        return self._call(self._prefill_now, list(ids), slot, key=slot)

    def next_token_probs(self, ids: Sequence[int], *, slot: SlotKey = None) -> torch.Tensor:
        """Probabilities [V] of the token after `ids` (prefix reuse applies; the slot then holds `ids`)."""
        return torch.softmax(self.prefill(ids, slot=slot).float(), dim=-1)

    def generate(
        self,
        ids: Sequence[int],
        params: SamplingParams = SamplingParams(),
        cancel: threading.Event | None = None,
        *,
        slot: SlotKey = None,
    ) -> Iterator[TokenEvent]:
        """Synchronous token generator (on the engine thread, batched with whatever else decodes).
        Once `cancel` is set no further token is yielded and decoding stops before its next step;
        leaving the loop early stops it too."""
        if self._scheduler.on_engine_thread():
            raise EngineError("generate() on the engine thread would wait for itself; use stream() or a thread")
        sink = _QueueSink()
        gen = self._submit(ids, params, slot, sink, cancel)
        try:
            while (item := sink.items.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                if cancel is None or not cancel.is_set():
                    yield item
        finally:
            if not gen.done.is_set():
                gen.abort()

    def _submit(self, ids: Sequence[int], params: SamplingParams, slot: SlotKey, sink: GenerationSink,
                cancel: threading.Event | None) -> Generation:
        gen = Generation(ids, params, slot, sink, self.tokenizer, self.max_seq_len, self.device, cancel)
        self.last_stats = gen.stats
        self._scheduler.submit(gen)
        return gen

    # --- conveniences ----------------------------------------------------------------------------

    async def run_async(self, fn: Callable[..., T], *args: object, slot: SlotKey = None) -> T:
        """Run `fn(*args)` on the engine thread between two decode steps, after every request queued
        before it for the same `slot` (fn may use that slot: `prefill(..., slot=slot)`)."""
        return await asyncio.wrap_future(self._scheduler.call(partial(fn, *args), slot))

    def chat_ids(self, messages: Sequence[Message]) -> list[int]:
        return self.tokenizer.encode_chat(messages, add_generation_prompt=True)

    def complete(self, messages: Sequence[Message], params: SamplingParams = SamplingParams(), *,
                 slot: SlotKey = None) -> str:
        out = [ev.token_id for ev in self.generate(self.chat_ids(messages), params, slot=slot)]
        return self.tokenizer.decode(out)

    def stream(
        self,
        prompt: Sequence[Message] | Sequence[int],
        params: SamplingParams = SamplingParams(),
        *,
        slot: SlotKey = None,
    ) -> TokenStream:
        """Start generating on the engine thread; iterate the result with `async for`. `slot`: the
        session whose cache slot it uses (see the module docstring)."""
        ids = list(prompt) if prompt and isinstance(prompt[0], int) else self.chat_ids(prompt)  # type: ignore[arg-type]
        stream = TokenStream(self)
        stream._generation = self._submit(ids, params, slot, stream, stream._cancel)
        return stream

    def close(self) -> None:
        """Cancel queued and running generations and stop the engine thread."""
        self._scheduler.close()


_END = object()


class _QueueSink:
    """`generate`'s end of a generation: tokens, then an error or the end, through a thread-safe queue."""

    def __init__(self) -> None:
        self.items: queue.SimpleQueue = queue.SimpleQueue()

    def token(self, event: TokenEvent) -> None:
        self.items.put(event)

    def finished(self, error: BaseException | None) -> None:
        self.items.put(_END if error is None else error)


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
