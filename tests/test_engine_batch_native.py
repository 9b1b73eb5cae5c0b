"""The native batched decode step (`rj_decode_batch`) against one-sequence steps, bit for bit.

B sequences at B positions in B cache slots step together, each weight block unpacked once for all
of them; every sequence must get exactly the logits (and write exactly the K/V rows) it would get
alone, for B = 1..4 (and past the 4- or 8-vector tile), GQA 1/3/8, Q/K/V bias, fp32 and quantised
weights -- on the build this CPU gets and on the portable C build.
"""
from __future__ import annotations

import copy

import pytest
import torch
from test_engine_native import quantise_in_place, random_blocks, tiny_model

from rejoinder.engine.cpu_decoder import NativeDecoder
from rejoinder.engine.model import Transformer
from rejoinder.kernels import cpu_native as C
from rejoinder.kernels import ggml
from rejoinder.kernels.ggml import GGMLWeight

PORTABLE = ("-mno-avx512f", "-mno-avx2", "-mno-fma")  # the plain C path of cpu_decode.c


@pytest.fixture(scope="module")
def portable_lib():
    return C.load_variant(PORTABLE)


# ------------------------------------------------------------------------------------------ matvec


@pytest.mark.parametrize("kind", [ggml.Q4_0, ggml.Q4_1, ggml.Q8_0, ggml.F32])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("variant", ["native", "portable"])
def test_batched_matvec_equals_one_vector_at_a_time(kind, n, variant, portable_lib):
    import numpy as np

    rng = np.random.default_rng(n * 10 + kind)
    rows, cols = 37, 320
    w = random_blocks(kind, rows, cols, rng) if kind != ggml.F32 else GGMLWeight.dense(torch.randn(rows, cols))
    lib = portable_lib if variant == "portable" else None
    x = torch.randn(n, cols)
    batched = C.matvec(x, w, lib)
    assert batched.shape == (n, rows)
    for i in range(n):  # the same arithmetic whatever else shares the pass over the weights
        assert torch.equal(batched[i], C.matvec(x[i], w, lib))
    want = x.double() @ C.ggml_weight_dequantize(w).double().T
    torch.testing.assert_close(batched.double(), want, atol=2e-5 * cols**0.5, rtol=1e-5)


def test_portable_build_agrees_with_the_native_one(portable_lib):
    import numpy as np

    w = random_blocks(ggml.Q4_1, 64, 576, np.random.default_rng(0))
    x = torch.randn(3, 576)
    torch.testing.assert_close(C.matvec(x, w, portable_lib), C.matvec(x, w), atol=1e-4, rtol=1e-5)


# ------------------------------------------------------------------------------------------ steps


def slotted_model(n_heads: int, n_kv: int, dim: int, bias: bool = False, slots: int = 4) -> Transformer:
    model = tiny_model(n_heads, n_kv, dim, bias=bias)
    model.setup_cache(64, slots)
    return model


def prompts(model: Transformer, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, model.cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]


def prefill_slots(model: Transformer, ids: list[list[int]]) -> None:
    with torch.inference_mode():
        for slot, seq in enumerate(ids):
            model(torch.tensor([seq]), 0, slot=slot)  # eager prefill, as the engine leaves a prompt


def used_cache(model: Transformer, slot: int, n: int) -> list[torch.Tensor]:
    return [t[slot, :, :n].clone() for layer in model.layers for t in (layer.attn.cache.k, layer.attn.cache.v)]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Bit for bit, positions never written included (the cache is allocated uninitialised)."""
    return all(x.view(torch.int32).equal(y.view(torch.int32)) for x, y in zip(a, b))


CASES = [  # (n_heads, n_kv, dim, bias, weights)
    (6, 2, 96, False, ggml.Q4_1),
    (6, 2, 96, True, ggml.Q4_0),
    (8, 1, 128, False, ggml.Q8_0),
    (6, 6, 96, True, None),  # fp32 weights
]


@pytest.mark.parametrize("variant", ["native", "portable"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"hq{c[0]}-kv{c[1]}{'-bias' if c[3] else ''}-{c[4]}")
def test_batch_steps_equal_single_steps_bit_for_bit(case, variant, portable_lib):
    n_heads, n_kv, dim, bias, kind = case
    lib = portable_lib if variant == "portable" else None
    batched = slotted_model(n_heads, n_kv, dim, bias)
    blocks = quantise_in_place(batched, kind) if kind is not None else None
    alone = copy.deepcopy(batched)  # its own cache: the single steps write nothing the batch reads
    lengths = [3, 9, 1, 14]  # different positions in every slot
    ids = prompts(batched, lengths)
    prefill_slots(batched, ids)
    prefill_slots(alone, ids)
    dec_b = NativeDecoder(batched, blocks, threads=2, lib=lib)
    dec_a = NativeDecoder(alone, blocks, threads=1, lib=lib)
    pos = list(lengths)
    # B = 4, 3, 2, 1 in turn (sequences leaving), then all four again (joining), slots in any order
    for rows in ([0, 1, 2, 3], [3, 1, 0], [2, 0], [1], [1, 3, 0, 2]):
        tokens = [int(t) for t in torch.randint(0, batched.cfg.vocab_size, (len(rows),))]
        got = dec_b.step_batch(tokens, [pos[r] for r in rows], rows).clone()
        assert got.shape == (len(rows), batched.cfg.vocab_size)
        for i, r in enumerate(rows):
            assert torch.equal(got[i], dec_a.step(tokens[i], pos[r], r))
            pos[r] += 1
    for slot in range(4):  # every K/V row written exactly as the single steps wrote it
        for a, b in zip(used_cache(batched, slot, pos[slot]), used_cache(alone, slot, pos[slot])):
            assert torch.equal(a, b)


def test_batch_step_equals_the_eager_model_per_slot():
    model = slotted_model(6, 2, 96)
    blocks = quantise_in_place(model, ggml.Q4_1)
    ids = prompts(model, [5, 11, 2], seed=3)
    nxt = [7, 8, 9]
    with torch.inference_mode():
        want = [model(torch.tensor([seq + [t]]), 0)[0, -1] for seq, t in zip(ids, nxt)]  # no cache reuse
        prefill_slots(model, ids)
        got = NativeDecoder(model, blocks, threads=2).step_batch(nxt, [len(s) for s in ids], [0, 1, 2])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-4, rtol=2e-4)


def test_batch_step_leaves_other_slots_alone():
    model = slotted_model(4, 2, 64)
    ids = prompts(model, [4, 6, 5, 3], seed=5)
    prefill_slots(model, ids)
    before = [used_cache(model, s, 64) for s in range(4)]
    NativeDecoder(model, threads=2).step_batch([1, 2], [6, 3], [1, 3])
    for s in (0, 2):
        assert same(used_cache(model, s, 64), before[s])
    for s, p in ((1, 6), (3, 3)):  # the prefixes below the new position are untouched too
        assert same(used_cache(model, s, p), [b[:, :p] for b in before[s]])


def test_bad_batches_are_errors_and_write_nothing():
    model = slotted_model(4, 2, 64, slots=2)
    dec = NativeDecoder(model, threads=1)
    prefill_slots(model, prompts(model, [3, 3]))
    before = [used_cache(model, s, 64) for s in range(2)]
    for tokens, positions, slots in (([1, 2], [3, 3], [0, 0]),  # one slot twice
                                     ([1], [3], [2]),  # no slot 2
                                     ([1, 97], [3, 3], [0, 1]),  # token out of range
                                     ([1, 2], [3, 64], [0, 1])):  # position past the cache
        with pytest.raises(ValueError, match="out of range|slot given twice"):
            dec.step_batch(tokens, positions, slots)
    with pytest.raises(ValueError, match="a batch is 1..2 tokens"):
        dec.step_batch([1, 2, 3], [3, 3, 3], [0, 1, 2])
    assert all(same(used_cache(model, s, 64), before[s]) for s in range(2))
    assert torch.isfinite(dec.step_batch([1, 2], [3, 3], [1, 0])).all()


def test_prefill_writes_only_its_slot():
    model = slotted_model(6, 2, 96, slots=3)
    ids = prompts(model, [6, 6, 6], seed=9)
    prefill_slots(model, ids)
    before = [used_cache(model, s, 64) for s in range(3)]
    dec = NativeDecoder(model, threads=2)
    new = [3, 1, 4, 1, 5]
    got = dec.prefill(new, 6, slot=1).clone()
    with torch.inference_mode():
        want = copy.deepcopy(model)(torch.tensor([ids[1] + new]), 0)[0, -1]  # no prefix reuse
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
    for s in (0, 2):
        assert same(used_cache(model, s, 64), before[s])
    with pytest.raises(ValueError, match="slot 3 not one of 3"):
        dec.prefill(new, 6, slot=3)
