"""The decode kernels on batches of sessions: per-slot caches (`cache_rows`) and many-row GEMVs.

Batch row b of rope_kv_write / decode_attention reads and writes cache row ``cache_rows[b]`` of a
cache with one row per session slot; the quantised GEMV serves several rows from each weight tile
it dequantises. Each is held against its torch twin and against running the rows one at a time.
Without CUDA the kernels run on Triton's interpreter (``TRITON_INTERPRET=1``, set before triton
is imported), as in test_kernels.py.
"""
from __future__ import annotations

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from rejoinder import kernels as K  # noqa: E402
from rejoinder.kernels import _backend  # noqa: E402

DEV = "cuda" if HAS_CUDA else "cpu"
CAN_RUN_TRITON = _backend.triton_available() and (HAS_CUDA or _backend.interpreter_enabled())
needs_triton = pytest.mark.skipif(not CAN_RUN_TRITON, reason="needs triton (CUDA or TRITON_INTERPRET=1)")
BACKENDS = (["triton"] if CAN_RUN_TRITON else []) + ["torch"]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(99)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hq,hkv", [(4, 2), (9, 3)], ids=["gqa2", "gqa3"])
def test_rope_kv_write_into_session_slots(backend: str, hq: int, hkv: int) -> None:
    b, d, slots, s = 3, 16, 5, 20
    q, k, v = (torch.randn(b, 1, h, d, device=DEV) for h in (hq, hkv, hkv))
    cos, sin = K.rope_tables(s, d, device=DEV)
    pos = torch.tensor([4, 0, 13], device=DEV)
    rows = torch.tensor([4, 0, 2], device=DEV)
    kc, vc = torch.randn(slots, hkv, s, d, device=DEV), torch.randn(slots, hkv, s, d, device=DEV)
    kc0, vc0 = kc.clone(), vc.clone()
    q_rot = K.rope_kv_write(q, k, v, cos, sin, pos, kc, vc, rows, backend=backend)
    for i in range(b):  # the same as writing each row alone into a one-row cache
        kc1, vc1 = kc0[rows[i] : rows[i] + 1].clone(), vc0[rows[i] : rows[i] + 1].clone()
        q1 = K.rope_kv_write_ref(q[i : i + 1], k[i : i + 1], v[i : i + 1], cos, sin, pos[i : i + 1], kc1, vc1)
        close(q_rot[i], q1[0])
        close(kc[rows[i]], kc1[0])
        assert torch.equal(vc[rows[i]], vc1[0])
    for untouched in (1, 3):
        assert torch.equal(kc[untouched], kc0[untouched]) and torch.equal(vc[untouched], vc0[untouched])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hq,hkv", [(4, 2), (9, 3), (8, 1)], ids=["gqa2", "gqa3", "gqa8"])
def test_decode_attention_over_session_slots(backend: str, hq: int, hkv: int) -> None:
    b, d, slots, s = 4, 32, 6, 40
    q = torch.randn(b, hq, d, device=DEV)
    kc, vc = torch.randn(slots, hkv, s, d, device=DEV), torch.randn(slots, hkv, s, d, device=DEV)
    rows = torch.tensor([5, 1, 3, 0], device=DEV)
    lens = torch.tensor([40, 1, 17, 9], device=DEV)
    kc[3, :, 17:] = float("nan")  # past a session's length: never read
    vc[3, :, 17:] = float("nan")
    out = K.decode_attention(q, kc, vc, lens, cache_rows=rows, backend=backend)
    assert torch.isfinite(out).all()
    want = K.decode_attention_ref(q, kc[rows], vc[rows], lens)  # gathered caches, one row per query
    close(out, want)
    for i in range(b):  # and each session alone
        one = K.decode_attention(q[i : i + 1], kc[rows[i] : rows[i] + 1], vc[rows[i] : rows[i] + 1], lens[i : i + 1],
                                 backend=backend)
        close(out[i], one[0])


def test_slot_arguments_are_checked() -> None:
    q, k, v = (torch.randn(2, 1, 2, 8) for _ in range(3))
    cos, sin = K.rope_tables(8, 8)
    kc = torch.zeros(3, 2, 8, 8)
    if CAN_RUN_TRITON:
        with pytest.raises(ValueError, match="one entry per batch row"):
            K.rope_kv_write_triton(q, k, v, cos, sin, torch.tensor([0, 1]), kc, kc.clone(), torch.tensor([0]))
        with pytest.raises(ValueError, match="with cache_rows"):
            K.rope_kv_write_triton(q, k, v, cos, sin, torch.tensor([0, 1]), kc, kc.clone())  # 3 rows, batch of 2
        with pytest.raises(ValueError, match="one entry per query row"):
            K.decode_attention_triton(torch.randn(2, 2, 8), kc, kc, torch.tensor([1, 1]), cache_rows=torch.tensor([0]))


@needs_triton
@pytest.mark.parametrize("bits,group", [(4, 32), (8, 32), (8, None)])
@pytest.mark.parametrize("m", [2, 5, 8])
def test_gemv_rows_equal_one_row_at_a_time(bits: int, group: int | None, m: int) -> None:
    n, k = 45, 192
    w = torch.randn(n, k) * 0.1
    qw = (K.quantize_int4(w, group or 32) if bits == 4 else K.quantize_int8(w, group)).to(DEV)
    x = torch.randn(m, k, device=DEV)
    bias = torch.randn(n, device=DEV)
    out = K.quant_linear_triton(x, qw, bias)
    assert out.shape == (m, n)
    close(out, K.quant_linear_ref(x, qw, bias), 2e-5)
    for i in range(m):
        close(out[i], K.quant_linear_triton(x[i : i + 1], qw, bias)[0], 1e-6)


@needs_triton
@pytest.mark.parametrize("block_m", [1, 2, 4])
def test_gemv_row_tile_sizes_agree(block_m: int) -> None:
    qw = K.quantize_int4(torch.randn(33, 128) * 0.1).to(DEV)
    x = torch.randn(5, 128, device=DEV)  # 5 rows: a partial last tile for every tile size
    close(K.quant_linear_triton(x, qw, block_m=block_m), K.quant_linear_ref(x, qw), 2e-5)
