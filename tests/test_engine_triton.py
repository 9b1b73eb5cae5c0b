"""TritonDecoder (fused-kernel decode step) vs the eager Transformer, on tiny random Llamas.

Without CUDA the kernels run on Triton's CPU interpreter (``TRITON_INTERPRET=1``, set below before
anything imports triton), and also as their torch twins; with CUDA the same tests run compiled,
plus the CUDA-graph path. The reference is a deep copy of the model with its own KV cache, so a
decoder that wrote the wrong cache slot could not hide behind the eager model's writes.
"""
from __future__ import annotations

import copy
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must precede the first ``import triton`` anywhere in this process.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from rejoinder import kernels as K  # noqa: E402
from rejoinder.engine.config import ModelConfig  # noqa: E402
from rejoinder.engine.decoder import Decoder  # noqa: E402
from rejoinder.engine.model import Transformer  # noqa: E402
from rejoinder.engine.sampling import SamplingParams  # noqa: E402
from rejoinder.engine.triton_decoder import TritonDecoder, sample_on_device  # noqa: E402
from rejoinder.kernels import _backend  # noqa: E402

DEV = "cuda" if HAS_CUDA else "cpu"
CAN_RUN_TRITON = _backend.triton_available() and (HAS_CUDA or _backend.interpreter_enabled())
BACKENDS = (["triton"] if CAN_RUN_TRITON else []) + ["torch"]
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

MAX_SEQ = 64
VOCAB = 97
# (n_heads, n_kv_heads, attention_bias): GQA ratios 2, 1 and 3 (the last with Qwen2-style biases).
SHAPES = [(4, 2, False), (4, 4, False), (6, 2, True)]
# Left dense in the quantised runs, so projections mixing packed and dense parts are covered too.
KEEP_DENSE = ("layers.1.attn.wv.weight", "layers.0.ffn.w_up.weight")


def tiny_model(n_heads: int = 4, n_kv: int = 2, bias: bool = False, dtype: torch.dtype = torch.float32,
               slots: int = 1) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=VOCAB, dim=64, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv, ffn_dim=96, head_dim=16,
        attention_bias=bias
    )
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # not all ones, so a norm applied with the wrong weight shows
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
    model = model.to(device=DEV, dtype=dtype).eval()
    model.setup_cache(MAX_SEQ, slots)
    return model


def quantize(model: Transformer) -> dict[str, K.QuantizedWeight]:
    """Int4-quantise every linear weight and load the dequantised values back into the model, so
    the eager model and the packed GEMVs compute with identical weights."""
    packed = {}
    with torch.no_grad():
        for name, mod in model.named_modules():
            key = f"{name}.weight"
            if isinstance(mod, torch.nn.Linear) and key not in KEEP_DENSE:
                qw = K.quantize_int4(mod.weight.float())
                mod.weight.copy_(qw.dequantize(mod.weight.dtype))
                packed[key] = qw
    return packed


def build(shape: tuple[int, int, bool], quant: bool, backend: str) -> tuple[Transformer, Transformer, TritonDecoder]:
    """(model the decoder shares its cache with, independent reference copy, decoder) -- the
    decoder is built after the prompt is prefilled, as the engine would."""
    model = tiny_model(*shape)
    packed = quantize(model) if quant else None
    ref = copy.deepcopy(model)
    prompt = torch.randint(0, VOCAB, (1, 7), device=DEV)
    with torch.inference_mode():
        torch.testing.assert_close(model(prompt, 0, last_only=True), ref(prompt, 0, last_only=True))
    return model, ref, TritonDecoder(model, packed, backend=backend)


def eager_logits(model: Transformer, tokens: list[int], start: int, slot: int = 0) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([tokens], device=DEV), start, last_only=True, slot=slot)[0, -1]


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-4) -> None:
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("quant", [False, True], ids=["dense", "int4"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"hq{s[0]}-hkv{s[1]}{'-bias' if s[2] else ''}")
def test_step_matches_eager_and_interleaves(shape, quant: bool, backend: str) -> None:
    model, ref, dec = build(shape, quant, backend)
    pos = 7
    for tok in (5, 17, 96):
        got = dec.step(torch.tensor([tok], device=DEV), torch.tensor([pos], device=DEV)).clone()
        close(got, eager_logits(ref, [tok], pos))
        pos += 1
    # Eager prefill continues from the decoder's cache entries, then the decoder from the eager ones.
    close(eager_logits(model, [1, 2, 3], pos), eager_logits(ref, [1, 2, 3], pos))
    pos += 3
    close(dec.step(40, pos), eager_logits(ref, [40], pos))


@pytest.mark.parametrize("quant", [False, True], ids=["dense", "int4"])
def test_greedy_decoding_matches_eager(quant: bool) -> None:
    _, ref, dec = build(SHAPES[0], quant, BACKENDS[0])
    expected, tok = [], 11
    for pos in range(7, 15):
        tok = int(eager_logits(ref, [tok], pos).argmax())
        expected.append(tok)
    got, tok_dev = [], torch.tensor([11], device=DEV)
    for pos in range(7, 15):
        tok_dev = dec.step(tok_dev, pos).argmax().view(1)  # the token never leaves the device
        got.append(int(tok_dev))
    assert got == expected


@pytest.mark.parametrize("quant", [False, True], ids=["dense", "int4"])
def test_is_a_decoder_and_prefills_token_by_token(quant: bool) -> None:
    _, ref, dec = build(SHAPES[2], quant, BACKENDS[0])
    assert isinstance(dec, Decoder)
    assert (dec.name, dec.prefill_max) == ("triton", 0)  # the engine prefills prompts with the eager model
    close(dec.prefill([5, 17, 96], 7), eager_logits(ref, [5, 17, 96], 7))
    close(dec.step(40, 10), eager_logits(ref, [40], 10))  # the prefill's cache rows are the eager ones


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("quant", [False, True], ids=["dense", "int4"])
def test_batch_steps_over_session_slots_match_eager(quant: bool, backend: str) -> None:
    """B sessions at B positions in B cache slots step together; each gets its own eager logits."""
    model = tiny_model(*SHAPES[2], slots=4)  # GQA 3 with biases, like the embedded SmolLM2's 9/3
    packed = quantize(model) if quant else None
    ref = copy.deepcopy(model)  # its own cache, stepped one session at a time
    lengths = [7, 2, 11, 4]
    g = torch.Generator().manual_seed(4)
    for slot, n in enumerate(lengths):  # each session's prompt, prefilled eagerly into its slot
        prompt = torch.randint(0, VOCAB, (n,), generator=g).tolist()
        close(eager_logits(model, prompt, 0, slot), eager_logits(ref, prompt, 0, slot))
    dec = TritonDecoder(model, packed, backend=backend)
    assert dec.max_batch == 4 and isinstance(dec, Decoder)
    pos = list(lengths)
    for rows in ([0, 1, 2, 3], [3, 0], [2], [1, 3, 0]):  # sessions leave and join, in any order
        tokens = torch.randint(0, VOCAB, (len(rows),), generator=g).tolist()
        got = dec.step_batch(tokens, [pos[r] for r in rows], rows).clone()
        assert got.shape == (len(rows), VOCAB)
        for i, r in enumerate(rows):
            close(got[i], eager_logits(ref, [tokens[i]], pos[r], r))
            pos[r] += 1
    alone = dec.step(5, pos[2], 2).clone()  # a batch of one is the single step
    close(alone, eager_logits(ref, [5], pos[2], 2))
    with pytest.raises(ValueError, match="must be distinct"):
        dec.step_batch([1, 2], [20, 20], [1, 1])


def test_sample_on_device() -> None:
    logits = torch.randn(VOCAB, device=DEV)
    greedy = sample_on_device(logits, SamplingParams(), backend=BACKENDS[0])
    assert greedy.shape == (1,) and int(greedy) == int(logits.argmax())
    gen = torch.Generator(device=DEV).manual_seed(3)
    drawn = sample_on_device(logits, SamplingParams(temperature=0.8, top_k=5), gen, backend=BACKENDS[0])
    assert int(drawn) in logits.topk(5).indices.tolist()


def test_requires_cache_and_checks_host_positions() -> None:
    with pytest.raises(ValueError, match="setup_cache"):
        TritonDecoder(Transformer(ModelConfig(vocab_size=VOCAB, dim=64, n_layers=1, n_heads=4, n_kv_heads=2,
                                              ffn_dim=96)))
    with pytest.raises(ValueError, match="outside the KV cache"):
        TritonDecoder(tiny_model()).step(1, MAX_SEQ)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("quant", [False, True], ids=["dense", "int4"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"hq{s[0]}-hkv{s[1]}{'-bias' if s[2] else ''}")
def test_cuda_graph_matches_eager(shape, quant: bool) -> None:
    model, ref, dec = build(shape, quant, "triton")
    cache_before = [layer.attn.cache.k.clone() for layer in model.layers]
    dec.capture()
    assert dec.graph is not None
    for layer, before in zip(model.layers, cache_before):  # warm-up left the cache alone (bit for bit;
        torch.testing.assert_close(layer.attn.cache.k, before, rtol=0, atol=0, equal_nan=True)  # unwritten: any)
    tok, pos = torch.tensor([9], device=DEV), 7
    for _ in range(6):
        got = dec.step(tok, torch.tensor([pos], device=DEV)).clone()
        want = eager_logits(ref, [int(tok)], pos)
        close(got, want)
        tok, pos = want.argmax().view(1), pos + 1
    close(eager_logits(model, [1, 2], pos), eager_logits(ref, [1, 2], pos))
    close(dec.step(3, pos + 2), eager_logits(ref, [3], pos + 2))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("quant", [False, True], ids=["dense", "int4"])
def test_cuda_graphs_per_batch_size_match_eager(quant: bool) -> None:
    model = tiny_model(*SHAPES[2], slots=3)
    packed = quantize(model) if quant else None
    ref = copy.deepcopy(model)
    for slot, n in enumerate((5, 9, 2)):
        prompt = list(range(1, n + 1))
        eager_logits(model, prompt, 0, slot)
        eager_logits(ref, prompt, 0, slot)
    dec = TritonDecoder(model, packed)
    dec.capture()
    assert sorted(dec.graphs) == [1, 2, 3] and dec.graph is dec.graphs[1]
    pos = [5, 9, 2]
    for rows in ([0, 1, 2], [2, 0], [1], [0, 1, 2]):
        tokens = [(7 * r + p) % VOCAB for r, p in zip(rows, pos)]
        got = dec.step_batch(tokens, [pos[r] for r in rows], rows).clone()
        for i, r in enumerate(rows):
            close(got[i], eager_logits(ref, [tokens[i]], pos[r], r))
            pos[r] += 1


@gpu
@pytest.mark.gpu
def test_cuda_graph_bf16() -> None:
    model = tiny_model(dtype=torch.bfloat16)
    ref = copy.deepcopy(model)
    prompt = torch.randint(0, VOCAB, (1, 5), device=DEV)
    for m in (model, ref):
        eager_logits(m, prompt[0].tolist(), 0)
    dec = TritonDecoder(model)
    dec.capture()
    for pos, tok in zip(range(5, 9), (4, 8, 15, 16)):
        # bf16 roundings differ between fused and unfused code; the logits are O(1).
        close(dec.step(tok, pos).clone(), eager_logits(ref, [tok], pos), tol=5e-2)


@gpu
@pytest.mark.gpu
def test_engine_on_cuda_steps_with_the_captured_triton_decoder() -> None:
    from tokenizers import Tokenizer, models

    from rejoinder.engine import Engine, EngineOptions
    from rejoinder.engine.decoder import EagerDecoder
    from rejoinder.engine.tokenizer import ChatTokenizer
    from rejoinder.errors import ConfigError

    tok = ChatTokenizer(Tokenizer(models.BPE()), None)
    model = tiny_model()
    ref = copy.deepcopy(model)
    engine = Engine(model, tok, EngineOptions(max_seq_len=MAX_SEQ, device="cuda"))
    assert isinstance(engine.decoder, TritonDecoder) and engine.decoder.graph is not None
    assert engine.backend == "triton"
    ids = torch.randint(0, VOCAB, (14,), generator=torch.Generator().manual_seed(2)).tolist()
    for n in (10, 11, 12, 14):  # a prompt (eager model), two graph steps, a 2-token prefill (eager again)
        close(engine.prefill(ids[:n]), eager_logits(ref, ids[:n], 0))
    engine.close()
    eager = Engine(copy.deepcopy(ref), tok, EngineOptions(max_seq_len=MAX_SEQ, device="cuda", backend="eager"))
    assert isinstance(eager.decoder, EagerDecoder) and eager.backend == "eager"
    eager.close()
    with pytest.raises(ConfigError, match="float32 CPU path"):
        Engine(copy.deepcopy(ref), tok, EngineOptions(max_seq_len=MAX_SEQ, device="cuda", backend="native"))
