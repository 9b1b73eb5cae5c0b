"""The native CPU decode step (kernels/cpu_decode.c via engine/cpu_decoder.py) against torch.

Its matvecs are held against the torch twin (dequantise the same ggml blocks, then ``W @ x``), the
whole step against the eager model on tiny random models (GQA 1/3/8, Q/K/V bias, quantised and fp32
weights), and the real embedded model's greedy and seeded generations against the eager engine's.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from rejoinder.engine import Engine, EngineOptions, SamplingParams
from rejoinder.engine.config import ModelConfig
from rejoinder.engine.cpu_decoder import NativeDecoder
from rejoinder.engine.decoder import Decoder, EagerDecoder
from rejoinder.engine.model import Transformer
from rejoinder.engine.tokenizer import ChatTokenizer
from rejoinder.errors import ConfigError
from rejoinder.kernels import cpu_native as C
from rejoinder.kernels import ggml
from rejoinder.kernels.ggml import GGMLWeight


def random_blocks(kind: int, rows: int, cols: int, rng: np.random.Generator) -> GGMLWeight:
    """Random but well-formed ggml blocks (fp16 scales of a realistic size)."""
    nb = cols // 32
    raw = rng.integers(0, 256, (rows, nb, ggml.BLOCK_BYTES[kind]), dtype=np.uint8)
    d = (rng.random((rows, nb)) * 0.02 + 1e-3).astype(np.float16)
    raw[..., 0:2] = d.view(np.uint8).reshape(rows, nb, 2)
    if kind == ggml.Q4_1:
        m = (-rng.random((rows, nb)) * 0.1).astype(np.float16)
        raw[..., 2:4] = m.view(np.uint8).reshape(rows, nb, 2)
    return GGMLWeight(torch.from_numpy(raw.reshape(rows, -1).copy()), kind, rows, cols)


# ------------------------------------------------------------------------------------------ matvec


@pytest.mark.parametrize("kind", [ggml.Q4_0, ggml.Q4_1, ggml.Q8_0])
@pytest.mark.parametrize("rows,cols", [(1, 32), (7, 96), (130, 576), (33, 1536)])
def test_block_matvec_equals_dequantised_twin(kind, rows, cols):
    rng = np.random.default_rng(rows * cols + kind)
    w = random_blocks(kind, rows, cols, rng)
    x = torch.from_numpy(rng.standard_normal(cols).astype(np.float32))
    expected = C.ggml_weight_dequantize(w).double() @ x.double()
    got = C.matvec(x, w)
    torch.testing.assert_close(got.double(), expected, atol=2e-5 * cols**0.5, rtol=1e-5)


@pytest.mark.parametrize("rows,cols", [(5, 1), (17, 33), (64, 577)])
def test_dense_matvec_any_width(rows, cols):
    w = GGMLWeight.dense(torch.randn(rows, cols))
    x = torch.randn(cols)
    torch.testing.assert_close(C.matvec(x, w), w.data @ x, atol=1e-5, rtol=1e-5)


def test_bad_matvec_input_is_a_clear_error():
    w = GGMLWeight.dense(torch.randn(3, 8))
    with pytest.raises(ValueError, match="float32 CPU vector of 8"):
        C.matvec(torch.randn(9), w)


# ------------------------------------------------------------------------------- tiny models


def tiny_model(n_heads: int, n_kv: int, dim: int, bias: bool = False, max_seq: int = 64) -> Transformer:
    torch.manual_seed(n_heads * 10 + n_kv)
    cfg = ModelConfig(
        vocab_size=97, dim=dim, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv, ffn_dim=160,
        head_dim=16, attention_bias=bias, norm_eps=1e-5,
    )
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if "norm" not in name else 0.1) + ("norm" in name))
    model.setup_cache(max_seq)
    return model.eval()


def quantise_in_place(model: Transformer, kind: int) -> dict[str, GGMLWeight]:
    """Give every matrix random ggml blocks, and the eager model their exact dequantised values."""
    rng = np.random.default_rng(kind)
    blocks = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and not name.startswith("embed"):
                blocks[name] = random_blocks(kind, p.shape[0], p.shape[1], rng)
                p.copy_(C.ggml_weight_dequantize(blocks[name]))
    return blocks


def assert_steps_match_eager(model: Transformer, decoder: NativeDecoder, prompt_len: int, steps: int) -> None:
    ids = torch.randint(0, model.cfg.vocab_size, (1, prompt_len + steps), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        full = model(ids, 0)[0]  # eager logits at every position, no cache reuse involved
        model(ids[:, :prompt_len], 0)  # eager prefill fills the cache the native steps continue
        for pos in range(prompt_len, prompt_len + steps):
            got = decoder.step(int(ids[0, pos]), pos)
            torch.testing.assert_close(got, full[pos], atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("n_heads,n_kv,dim", [(6, 6, 96), (6, 2, 96), (8, 1, 128)])
def test_step_equals_eager_fp32_weights(n_heads, n_kv, dim):
    model = tiny_model(n_heads, n_kv, dim)
    assert_steps_match_eager(model, NativeDecoder(model, threads=2), prompt_len=5, steps=12)


@pytest.mark.parametrize("kind", [ggml.Q4_0, ggml.Q4_1, ggml.Q8_0])
def test_step_equals_eager_quantised_weights(kind):
    model = tiny_model(6, 2, 96)
    blocks = quantise_in_place(model, kind)
    assert_steps_match_eager(model, NativeDecoder(model, blocks, threads=1), prompt_len=1, steps=9)


def test_step_with_qkv_bias_and_from_position_zero():
    model = tiny_model(4, 2, 64, bias=True)
    assert_steps_match_eager(model, NativeDecoder(model, threads=2), prompt_len=1, steps=6)
    # position 0: nothing prefilled at all
    decoder = NativeDecoder(model, threads=1)
    with torch.inference_mode():
        torch.testing.assert_close(decoder.step(3, 0), model(torch.tensor([[3]]), 0)[0, 0], atol=2e-4, rtol=2e-4)


def test_one_thread_and_two_threads_agree_exactly():
    model = tiny_model(6, 2, 96)
    blocks = quantise_in_place(model, ggml.Q4_1)
    one, two = NativeDecoder(model, blocks, threads=1), NativeDecoder(model, blocks, threads=2)
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]), 0)
        a = one.step(5, 3).clone()
        b = two.step(5, 3).clone()  # rewrites the same cache row with the same values
    assert torch.equal(a, b)  # each row's dot is computed whole by one thread: same order, same bits


def test_out_of_range_token_or_position_is_an_error_and_step_still_works():
    model = tiny_model(4, 2, 64, max_seq=16)
    decoder = NativeDecoder(model, threads=1)
    with pytest.raises(ValueError, match="out of range"):
        decoder.step(97, 0)
    with pytest.raises(ValueError, match="out of range"):
        decoder.step(1, 16)
    assert torch.isfinite(decoder.step(1, 0)).all()


def test_refuses_models_it_cannot_run():
    model = tiny_model(4, 2, 64).to(torch.float64)
    with pytest.raises(ValueError, match="float32 CPU"):
        NativeDecoder(model)
    bare = Transformer(tiny_model(4, 2, 64).cfg)
    with pytest.raises(ValueError, match="setup_cache"):
        NativeDecoder(bare)


# ------------------------------------------------------------------------ one Decoder protocol


def test_eager_decoder_equals_the_models_forward():
    model = tiny_model(6, 2, 96)
    decoder = EagerDecoder(model)
    assert isinstance(decoder, Decoder) and (decoder.name, decoder.prefill_max) == ("eager", 0)
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        full = model(ids, 0)[0]  # every position at once, for the steps below
        want = model(ids[:, :9], 0, last_only=True)[0, -1]
        assert torch.equal(decoder.prefill(ids[0, :9].tolist(), 0), want)  # the model's own forward, bit for bit
        for pos in range(9, 12):  # steps continue from the cache the prefill wrote
            got = decoder.step(int(ids[0, pos]), pos)
            assert torch.equal(got, model(ids[:, pos : pos + 1], pos, last_only=True)[0, -1])
            torch.testing.assert_close(got, full[pos], atol=2e-4, rtol=2e-4)


def test_native_decoder_is_a_decoder():
    decoder = NativeDecoder(tiny_model(4, 2, 64), threads=1)
    assert isinstance(decoder, Decoder)
    assert (decoder.name, decoder.prefill_max) == ("native", 32)


def _tiny_engine(backend: str, dtype: torch.dtype = torch.float32) -> Engine:
    from tokenizers import Tokenizer, models

    model = tiny_model(4, 2, 64).to(dtype)  # the engine sizes the cache itself
    return Engine(model, ChatTokenizer(Tokenizer(models.BPE()), None), EngineOptions(max_seq_len=32, backend=backend))


@pytest.mark.parametrize("backend,kind", [("auto", NativeDecoder), ("native", NativeDecoder), ("eager", EagerDecoder)])
def test_engine_picks_the_decoder_of_its_backend_option(backend, kind):
    engine = _tiny_engine(backend)
    try:
        assert type(engine.decoder) is kind and isinstance(engine.decoder, Decoder)
        assert engine.backend == engine.decoder.name == ("eager" if kind is EagerDecoder else "native")
        ids = torch.randint(0, 97, (24,), generator=torch.Generator().manual_seed(5)).tolist()
        with torch.inference_mode():
            want = engine.model(torch.tensor([ids]), 0)[0]  # every position, no cache involved
        # a long prompt (the eager model), a short one after the reused prefix (the decoder), two steps
        for n in (18, 22, 23, 24):
            torch.testing.assert_close(engine.prefill(ids[:n]), want[n - 1], atol=2e-4, rtol=2e-4)
    finally:
        engine.close()


def test_engine_refuses_backends_that_cannot_run_here():
    with pytest.raises(ConfigError, match="unknown engine backend 'fast'"):
        _tiny_engine("fast")
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        _tiny_engine("triton")
    with pytest.raises(ConfigError, match="float32 CPU path"):
        _tiny_engine("native", torch.float64)
    engine = _tiny_engine("auto", torch.float64)  # auto: what fits, here the eager model
    assert isinstance(engine.decoder, EagerDecoder)
    engine.close()


def test_one_end_of_turn_scorer_per_engine_living_as_long_as_it():
    import gc
    import weakref

    from rejoinder.engine.end_of_turn import EndOfTurnScorer

    engine = _tiny_engine("eager")
    scorer = EndOfTurnScorer.shared(engine)
    assert EndOfTurnScorer.shared(engine) is scorer and scorer.engine is engine
    assert EndOfTurnScorer.shared(_tiny_engine("eager")) is not scorer
    alive = weakref.ref(engine)
    engine.close()
    del engine, scorer
    gc.collect()
    assert alive() is None  # nothing outside the engine holds it (or its model) through the scorer


# ------------------------------------------------------------------------ native prefill

def caches(model: Transformer) -> list[torch.Tensor]:
    return [t.clone() for layer in model.layers for t in (layer.attn.cache.k, layer.attn.cache.v)]


def clear_caches(model: Transformer) -> None:
    for layer in model.layers:
        layer.attn.cache.k.zero_()
        layer.attn.cache.v.zero_()


def assert_prefill_matches_eager(model: Transformer, decoder: NativeDecoder, start: int, n: int) -> None:
    ids = torch.randint(0, model.cfg.vocab_size, (1, start + n), generator=torch.Generator().manual_seed(start + n))
    with torch.inference_mode():
        clear_caches(model)
        want = model(ids, 0)[0, -1].clone()  # eager, whole prompt at once
        want_cache = caches(model)
        clear_caches(model)
        if start:
            model(ids[:, :start], 0)  # an eager prefix, as prefix reuse leaves it
        got = decoder.prefill(ids[0, start:].tolist(), start)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
    for a, b in zip(caches(model), want_cache):  # every K/V row the eager model writes, and nothing else
        # fp32 sums in another order, through random layers with activations in the tens
        torch.testing.assert_close(a, b, atol=2e-5 * float(b.abs().max()), rtol=2e-4)


@pytest.mark.parametrize("n_heads,n_kv,dim", [(6, 6, 96), (6, 2, 96), (8, 1, 128)])
@pytest.mark.parametrize("start,n", [(0, 1), (0, 9), (3, 8), (5, 17)])
def test_prefill_equals_eager_fp32_weights(n_heads, n_kv, dim, start, n):
    model = tiny_model(n_heads, n_kv, dim)
    assert_prefill_matches_eager(model, NativeDecoder(model, threads=2), start, n)


@pytest.mark.parametrize("kind", [ggml.Q4_0, ggml.Q4_1, ggml.Q8_0])
def test_prefill_equals_eager_quantised_weights_across_chunks(kind):
    # 70 new tokens: two calls into C (chunks of 64), the second with a partial tile of 6.
    model = tiny_model(6, 2, 96, bias=True, max_seq=96)
    blocks = quantise_in_place(model, kind)
    assert_prefill_matches_eager(model, NativeDecoder(model, blocks, threads=2), start=4, n=70)


def test_prefill_then_steps_continue_like_eager():
    model = tiny_model(6, 2, 96)
    blocks = quantise_in_place(model, ggml.Q4_1)
    decoder = NativeDecoder(model, blocks, threads=2)
    ids = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = model(ids, 0)[0]
        clear_caches(model)
        torch.testing.assert_close(decoder.prefill(ids[0, :20].tolist(), 0), full[19], atol=2e-4, rtol=2e-4)
        for pos in range(20, 30):
            torch.testing.assert_close(decoder.step(int(ids[0, pos]), pos), full[pos], atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("kind", [ggml.Q4_0, ggml.Q4_1, ggml.Q8_0])
def test_prefill_gives_each_token_the_logits_and_cache_of_a_step(kind):
    # The prefill runs the step's own kernels over a tile of tokens: token by token it must be the
    # step, bit for bit (13 tokens: a full tile of 8 and a partial one of 5 on AVX-512).
    model = tiny_model(6, 2, 96, bias=True, max_seq=48)
    blocks = quantise_in_place(model, kind)
    decoder = NativeDecoder(model, blocks, threads=2)
    ids = torch.randint(0, 97, (20,), generator=torch.Generator().manual_seed(7)).tolist()
    with torch.inference_mode():
        clear_caches(model)
        decoder.prefill(ids[:7], 0)
        got = decoder.prefill(ids[7:], 7).clone()
        got_cache = caches(model)
        clear_caches(model)
        decoder.prefill(ids[:7], 0)
        for pos in range(7, 20):
            want = decoder.step(ids[pos], pos).clone()
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(got_cache, caches(model)))


def test_prefill_one_thread_and_two_threads_agree_exactly():
    model = tiny_model(6, 2, 96)
    blocks = quantise_in_place(model, ggml.Q8_0)
    one, two = NativeDecoder(model, blocks, threads=1), NativeDecoder(model, blocks, threads=2)
    a = one.prefill([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], 0).clone()
    b = two.prefill([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], 0).clone()
    assert torch.equal(a, b)


def test_prefill_out_of_range_is_an_error_and_writes_nothing():
    model = tiny_model(4, 2, 64, max_seq=16)
    decoder = NativeDecoder(model, threads=1)
    clear_caches(model)
    before = caches(model)
    with pytest.raises(ValueError, match="out of range"):
        decoder.prefill([1, 2, 97], 0)
    with pytest.raises(ValueError, match="past the cache"):
        decoder.prefill([1] * 10, 8)
    assert all(torch.equal(a, b) for a, b in zip(caches(model), before))
    assert torch.isfinite(decoder.prefill([1, 2, 3], 0)).all()


def test_engine_prefills_short_prompts_natively(native_engine):
    ids = native_engine.chat_ids([{"role": "user", "content": "Name three colours, then three animals."}])
    follow = native_engine.tokenizer.encode(" And birds?")
    assert len(ids) > native_engine.decoder.prefill_max >= len(follow)
    calls = []
    real = native_engine.decoder.prefill
    native_engine.decoder.prefill = lambda tokens, pos, slot: (calls.append((len(tokens), pos)),
                                                               real(tokens, pos, slot))[1]
    try:
        native_engine.reset()
        native_engine.prefill(ids)  # a whole prompt: the eager GEMM
        native_engine.prefill(ids + follow)  # a few new tokens after the reused prefix: native
        native_engine.prefill(ids + follow + ids)  # many new tokens: eager again
    finally:
        del native_engine.decoder.prefill
    assert calls == [(len(follow), len(ids))]


# ------------------------------------------------------------------------ the embedded model


@pytest.fixture(scope="module")
def eager_engine(llm_path):
    eng = Engine.load(llm_path, EngineOptions(max_seq_len=1024, backend="eager"))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def native_engine(llm_path):
    eng = Engine.load(llm_path, EngineOptions(max_seq_len=1024, backend="native", threads=2))
    yield eng
    eng.close()


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse phone agent."},
     {"role": "user", "content": "My internet is down again."}],
    [{"role": "user", "content": "Count from one to twenty in words."}],
]


def test_embedded_engines_hold_their_decoders(native_engine, eager_engine):
    assert isinstance(native_engine.decoder, NativeDecoder) and isinstance(native_engine.decoder, Decoder)
    assert isinstance(eager_engine.decoder, EagerDecoder) and isinstance(eager_engine.decoder, Decoder)
    assert (native_engine.backend, eager_engine.backend) == ("native", "eager")


def test_native_engine_uses_quantised_blocks(native_engine):
    assert native_engine.backend == "native"
    # every matrix of the Q4_1 file (plus the Q8_0 embedding) stays in its blocks: ~4.5 bits/weight
    assert 60e6 < native_engine.decoder.quantized_bytes < 120e6


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_greedy_generation_identical_to_eager(native_engine, eager_engine, messages):
    params = SamplingParams(temperature=0.0, max_new_tokens=48)
    ids = native_engine.chat_ids(messages)
    ours = [e.token_id for e in native_engine.generate(ids, params)]
    ref = [e.token_id for e in eager_engine.generate(ids, params)]
    assert len(ours) > 5
    assert ours == ref


def test_seeded_sampling_identical_to_eager(native_engine, eager_engine):
    params = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, max_new_tokens=40, seed=11)
    ids = native_engine.chat_ids(CONVERSATIONS[1])
    ours = [e.token_id for e in native_engine.generate(ids, params)]
    ref = [e.token_id for e in eager_engine.generate(ids, params)]
    assert ours == ref


def test_multi_turn_prefix_reuse_with_native_steps(native_engine, eager_engine):
    """Native decode steps write the KV cache the next turn's eager prefill reuses."""
    params = SamplingParams(temperature=0.0, max_new_tokens=24)
    history = [{"role": "user", "content": "Give me one tip for sleeping better."}]
    for eng in (native_engine, eager_engine):
        eng.reset()
    for follow_up in ("Another one, please.", "Thanks. And one for waking up?"):
        ids = native_engine.chat_ids(history)
        ours = [e.token_id for e in native_engine.generate(ids, params)]
        reused = native_engine.last_stats.reused_tokens
        ref = [e.token_id for e in eager_engine.generate(ids, params)]
        assert ours == ref
        history += [{"role": "assistant", "content": native_engine.tokenizer.decode(ours)},
                    {"role": "user", "content": follow_up}]
    assert reused > 20  # the second turn really reused the cache the native steps had extended


def test_without_a_compiler_auto_falls_back_to_eager_with_a_warning(tmp_path, llm_path):
    code = (
        "import warnings, sys\n"
        "from rejoinder.engine import Engine, EngineOptions\n"
        "from rejoinder.kernels.cpu_native import NativeKernelsUnavailable\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        f"    eng = Engine.load({str(llm_path)!r}, EngineOptions(max_seq_len=64))\n"
        "assert eng.backend == 'eager', eng.backend\n"
        "assert any('no C compiler' in str(x.message) for x in w), [str(x.message) for x in w]\n"
        "print(eng.complete([{'role': 'user', 'content': 'Hi'}])[:0] + 'ok')\n"
        "try:\n"
        f"    Engine.load({str(llm_path)!r}, EngineOptions(max_seq_len=64, backend='native'))\n"
        "except NativeKernelsUnavailable as e:\n"
        "    from rejoinder.errors import EngineError\n"
        "    assert isinstance(e, EngineError) and isinstance(e, RuntimeError)\n"
        "    print('refused:', e)\n"
    )
    env = dict(os.environ, PATH=str(tmp_path), CC="", REJOINDER_KERNEL_CACHE=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ok" in out.stdout and "refused: no C compiler" in out.stdout
