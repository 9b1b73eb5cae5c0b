"""Triton kernels vs their torch twins.

Without CUDA the kernels run on Triton's CPU interpreter (``TRITON_INTERPRET=1``, set below before
anything imports triton); with CUDA the same tests run compiled on the GPU. The interpreter runs
programs one at a time on numpy, so shapes stay small, and it has no bf16 arithmetic: interpreter
runs use fp32/fp16, and bf16 is covered by the GPU-only tests (each has an fp16 twin here).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must precede the first ``import triton`` anywhere in this process.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from rejoinder import kernels as K  # noqa: E402
from rejoinder.errors import ConfigError  # noqa: E402
from rejoinder.kernels import _backend, ggml  # noqa: E402

DEV = "cuda" if HAS_CUDA else "cpu"
CAN_RUN_TRITON = _backend.triton_available() and (HAS_CUDA or _backend.interpreter_enabled())
needs_triton = pytest.mark.skipif(not CAN_RUN_TRITON, reason="needs triton (CUDA or TRITON_INTERPRET=1)")
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

# bf16 only where it can be computed: the interpreter has no bf16 arithmetic.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
# Kernel and twin both compute in fp32 and round once; differences come from summation order
# (plus, in attention, probabilities rounded to the cache dtype for the P @ V product).
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol * scale, rtol=rtol * scale)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)


# --------------------------------------------------------------------------- backend / import


def test_import_without_triton_uses_twins() -> None:
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from rejoinder import kernels as K\n"
        "assert not K.triton_available()\n"
        "x = torch.randn(2, 8); w = torch.ones(8)\n"
        "assert torch.equal(K.rms_norm(x, w), K.rms_norm_ref(x, w))\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_backend_selection() -> None:
    cpu = torch.zeros(1)
    assert not K.use_triton(cpu)  # auto never sends CPU tensors to the (slow) interpreter
    assert not K.use_triton(cpu, backend="torch")
    with pytest.raises(ValueError) as err:
        K.use_triton(cpu, backend="fast")  # type: ignore[arg-type]
    assert isinstance(err.value, ConfigError)  # a setting (REJOINDER_KERNEL_BACKEND) a user can get wrong
    if HAS_CUDA and K.triton_available():
        assert K.use_triton(torch.zeros(1, device="cuda"))


# --------------------------------------------------------------------------- RMSNorm


def test_rms_norm_ref_matches_formula() -> None:
    x, w = torch.randn(4, 10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(K.rms_norm_ref(x, w, 1e-5), expected)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [1, 77, 576])
@pytest.mark.parametrize("fused", [False, True])
def test_rms_norm(dtype: torch.dtype, hidden: int, fused: bool) -> None:
    x = torch.randn(3, 2, hidden, device=DEV).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, device=DEV)).to(dtype)
    if fused:
        r = torch.randn(3, 2, hidden, device=DEV).to(dtype)
        out, h = K.add_rms_norm(x, r, w, 1e-6, backend="triton")
        ref_out, ref_h = K.add_rms_norm_ref(x, r, w, 1e-6)
        assert h.dtype == dtype and torch.equal(h, ref_h)  # the residual sum is exact
    else:
        out, ref_out = K.rms_norm(x, w, backend="triton"), K.rms_norm_ref(x, w)
    assert out.shape == x.shape and out.dtype == dtype
    close(out, ref_out, dtype)


@needs_triton
def test_rms_norm_strided_rows() -> None:
    big = torch.randn(5, 96, device=DEV)
    x = big[:, 10:74]  # row stride 96, unit column stride
    w = torch.randn(64, device=DEV)
    close(K.rms_norm_triton(x, w), K.rms_norm_ref(x, w), torch.float32)


# --------------------------------------------------------------------------- RoPE + KV write


def _qkv(b: int, t: int, hq: int, hkv: int, d: int, dtype: torch.dtype):
    # Views of one fused projection, as the engine will produce them (non-contiguous heads).
    fused = torch.randn(b, t, (hq + 2 * hkv) * d, device=DEV).to(dtype)
    q, k, v = fused.split([hq * d, hkv * d, hkv * d], dim=-1)
    return q.view(b, t, hq, d), k.view(b, t, hkv, d), v.view(b, t, hkv, d)


def test_rope_ref_matches_hf_rotate_half() -> None:
    b, t, h, d, s = 2, 3, 2, 8, 16
    cos, sin = K.rope_tables(s, d, theta=500000.0)
    x = torch.randn(b, t, h, d)
    pos = torch.tensor([[0, 1, 2], [7, 8, 9]])
    cos_f, sin_f = torch.cat([cos, cos], -1)[pos][:, :, None], torch.cat([sin, sin], -1)[pos][:, :, None]
    rot_half = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], dim=-1)
    torch.testing.assert_close(K.apply_rope_ref(x, cos, sin, pos), x * cos_f + rot_half * sin_f)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "b,t,hq,hkv,d",
    [(1, 1, 4, 4, 64), (2, 3, 9, 3, 64), (1, 2, 8, 1, 32), (2, 1, 6, 2, 10)],
    ids=["gqa1-decode", "gqa3-prefill", "gqa8", "odd-half-dim"],
)
@pytest.mark.parametrize("per_row_pos", [True, False])
def test_rope_kv_write(dtype: torch.dtype, b: int, t: int, hq: int, hkv: int, d: int, per_row_pos: bool) -> None:
    s = 24
    q, k, v = _qkv(b, t, hq, hkv, d, dtype)
    cos, sin = K.rope_tables(s, d, device=DEV)
    pos = torch.tensor([5, 17][:b] if per_row_pos else [11], device=DEV, dtype=torch.int32)
    kc = torch.randn(b, hkv, s, d, device=DEV).to(dtype)
    vc = torch.randn(b, hkv, s, d, device=DEV).to(dtype)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    q_rot = K.rope_kv_write(q, k, v, cos, sin, pos, kc, vc, backend="triton")
    q_ref = K.rope_kv_write_ref(q, k, v, cos, sin, pos, kc_ref, vc_ref)
    assert q_rot.shape == q.shape and q_rot.is_contiguous()
    close(q_rot, q_ref, dtype)
    close(kc, kc_ref, dtype)
    assert torch.equal(vc, vc_ref)  # v is copied, untouched slots stay as they were


@needs_triton
def test_rope_duplicated_tables_and_untouched_slots() -> None:
    b, t, hq, hkv, d, s = 1, 2, 2, 1, 16, 8
    q, k, v = _qkv(b, t, hq, hkv, d, torch.float32)
    cos, sin = K.rope_tables(s, d, device=DEV)
    cos2, sin2 = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)  # HF [S, D] layout
    kc = torch.zeros(b, hkv, s, d, device=DEV)
    vc = torch.zeros(b, hkv, s, d, device=DEV)
    pos = torch.tensor([3], device=DEV)
    q_rot = K.rope_kv_write_triton(q, k, v, cos2, sin2, pos, kc, vc)
    close(q_rot, K.apply_rope_ref(q, cos, sin, torch.tensor([[3, 4]], device=DEV)), torch.float32)
    written = torch.zeros(s, dtype=torch.bool)
    written[3:5] = True
    assert kc[0, 0, ~written].abs().sum() == 0 and vc[0, 0, ~written].abs().sum() == 0
    assert torch.equal(vc[0, 0, 3:5], v[0, :, 0])


# --------------------------------------------------------------------------- decode attention


def test_decode_attention_ref_matches_sdpa() -> None:
    b, hq, hkv, d, s = 2, 6, 2, 16, 12
    q, kc, vc = torch.randn(b, hq, d), torch.randn(b, hkv, s, d), torch.randn(b, hkv, s, d)
    lens = torch.tensor([5, 12])
    out = K.decode_attention_ref(q, kc, vc, lens)
    for i, n in enumerate(lens.tolist()):
        kk = kc[i, :, :n].repeat_interleave(hq // hkv, 0)
        vv = vc[i, :, :n].repeat_interleave(hq // hkv, 0)
        ref = torch.nn.functional.scaled_dot_product_attention(q[i, :, None], kk, vv)[:, 0]
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv", [(2, 2), (6, 2), (8, 1)], ids=["gqa1", "gqa3", "gqa8"])
@pytest.mark.parametrize("lens", [(1,), (17, 5), (4097,)], ids=["len1", "len17", "len4097"])
def test_decode_attention(dtype: torch.dtype, hq: int, hkv: int, lens: tuple[int, ...]) -> None:
    b, d = len(lens), 64
    if max(lens) > 1000 and hkv > 1 and not HAS_CUDA:
        pytest.skip("long context on the interpreter is covered by the single-KV-head case")
    s = max(lens) + 3  # capacity not a multiple of any block
    q = torch.randn(b, hq, d, device=DEV).to(dtype)
    kc = torch.randn(b, hkv, s, d, device=DEV).to(dtype)
    vc = torch.randn(b, hkv, s, d, device=DEV).to(dtype)
    seq = torch.tensor(lens, device=DEV, dtype=torch.int32)
    out = K.decode_attention(q, kc, vc, seq, backend="triton")
    assert out.shape == q.shape and out.dtype == dtype
    close(out, K.decode_attention_ref(q, kc, vc, seq), dtype)


@needs_triton
@pytest.mark.parametrize("num_splits", [1, 3, 64])
def test_decode_attention_splits_and_garbage_tail(num_splits: int) -> None:
    b, hq, hkv, d, s = 2, 4, 2, 32, 70
    q = torch.randn(b, hq, d, device=DEV)
    kc = torch.randn(b, hkv, s, d, device=DEV)
    vc = torch.randn(b, hkv, s, d, device=DEV)
    seq = torch.tensor([33, 70], device=DEV)
    kc[0, :, 33:] = float("nan")  # uninitialised cache slots must never be read
    vc[0, :, 33:] = float("nan")
    out = K.decode_attention_triton(q, kc, vc, seq, scale=0.3, num_splits=num_splits)
    assert torch.isfinite(out).all()
    close(out, K.decode_attention_ref(q, kc, vc, seq, scale=0.3), torch.float32)


@needs_triton
def test_decode_attention_odd_head_dim() -> None:
    b, hq, hkv, d, s = 1, 3, 1, 24, 40
    q, kc, vc = (torch.randn(b, hq, d, device=DEV), torch.randn(b, hkv, s, d, device=DEV),
                 torch.randn(b, hkv, s, d, device=DEV))
    seq = torch.tensor([29], device=DEV)
    close(K.decode_attention_triton(q, kc, vc, seq), K.decode_attention_ref(q, kc, vc, seq), torch.float32)


# --------------------------------------------------------------------------- SwiGLU


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [1, 301, 1536])
def test_swiglu(dtype: torch.dtype, width: int) -> None:
    gate = (torch.randn(2, 3, width, device=DEV) * 4).to(dtype)
    up = torch.randn(2, 3, width, device=DEV).to(dtype)
    out = K.swiglu(gate, up, backend="triton")
    assert out.shape == gate.shape and out.dtype == dtype
    close(out, K.swiglu_ref(gate, up), dtype)
    torch.testing.assert_close(
        K.swiglu_ref(gate.double(), up.double()),
        torch.nn.functional.silu(gate.double()) * up.double(),
        atol=1e-5,
        rtol=1e-6,  # the twin computes in fp32
    )


@needs_triton
def test_swiglu_fused_and_saturation() -> None:
    gu = torch.randn(4, 2 * 130, device=DEV) * 50  # large |gate|: exp overflows, result must not
    gu[0, 0] = -1e4
    gu[0, 1] = 1e4
    out = K.swiglu_fused(gu, backend="triton")
    assert torch.isfinite(out).all()
    close(out, K.swiglu_ref(gu[:, :130], gu[:, 130:]), torch.float32)


# --------------------------------------------------------------------------- quantised weights

def _random_gguf_blocks(qtype_name: str, n: int, k: int):
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    qtype = GGMLQuantizationType[qtype_name]
    block, nbytes = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 256, size=(n, k // block, nbytes), dtype=np.uint8)
    n_f16 = 2 if qtype_name == "Q4_1" else 1
    halves = (rng.standard_normal((n, k // block, n_f16)) * 0.02).astype(np.float16)
    halves[0, 0, 0] = -halves[0, 0, 0]  # make sure a negative scale shows up
    raw[..., : 2 * n_f16] = halves.view(np.uint8).reshape(n, k // block, 2 * n_f16)
    return raw.reshape(n, -1), qtype


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_lossless(name: str) -> None:
    pytest.importorskip("gguf")
    from gguf.quants import dequantize

    n, k = 6, 96
    raw, qtype = _random_gguf_blocks(name, n, k)
    pack = {"Q4_0": K.pack_q4_0_blocks, "Q4_1": K.pack_q4_1_blocks, "Q8_0": K.pack_q8_0_blocks}[name]
    qw = pack(torch.from_numpy(raw), (n, k))
    expected = torch.from_numpy(dequantize(raw, qtype)).float()
    assert qw.shape == (n, k)
    assert torch.equal(qw.dequantize(), expected)  # bit-exact, not merely close
    assert torch.equal(pack(raw, (n, k)).qweight, qw.qweight)  # numpy input too


def test_ggml_block_types_agree_with_the_gguf_package() -> None:
    pytest.importorskip("gguf")
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    for name in ("F32", "Q4_0", "Q4_1", "Q8_0"):
        assert getattr(ggml, name) == int(GGMLQuantizationType[name])
    for kind, nbytes in ggml.BLOCK_BYTES.items():
        assert GGML_QUANT_SIZES[GGMLQuantizationType(kind)] == (ggml.QK, nbytes)


def test_ggml_weight_validation() -> None:
    blocks = torch.zeros(4, 2 * ggml.BLOCK_BYTES[ggml.Q4_1], dtype=torch.uint8)
    w = ggml.GGMLWeight(blocks, ggml.Q4_1, 4, 64)  # 2 blocks of 32 per row
    assert w.nbytes() == blocks.numel()
    with pytest.raises(ValueError, match="does not hold"):  # row bytes of another type
        ggml.GGMLWeight(blocks, ggml.Q8_0, 4, 64)
    with pytest.raises(ValueError, match="does not hold"):  # not whole blocks
        ggml.GGMLWeight(torch.zeros(4, 17, dtype=torch.uint8), ggml.Q4_1, 4, 64)
    with pytest.raises(ValueError, match="does not hold"):  # cols not a multiple of QK
        ggml.GGMLWeight(torch.zeros(4, 40, dtype=torch.uint8), ggml.Q4_1, 4, 48)
    with pytest.raises(ValueError, match="does not hold"):  # blocks are bytes
        ggml.GGMLWeight(blocks.float(), ggml.Q4_1, 4, 64)
    with pytest.raises(ValueError, match="does not hold"):  # F32 is [rows, cols] float32
        ggml.GGMLWeight(torch.zeros(4, 8, dtype=torch.float64), ggml.F32, 4, 8)
    with pytest.raises(ValueError, match="unsupported ggml type 12"):
        ggml.GGMLWeight(torch.zeros(4, 64, dtype=torch.uint8), 12, 4, 64)
    with pytest.raises(ValueError, match="contiguous CPU"):
        ggml.GGMLWeight(torch.zeros(8, 4).t(), ggml.F32, 4, 8)


def test_ggml_dense_weight() -> None:
    w64 = torch.randn(3, 5, dtype=torch.float64)
    w = ggml.GGMLWeight.dense(w64.t())  # any float matrix: a contiguous float32 copy
    assert (w.type, w.rows, w.cols, w.data.dtype) == (ggml.F32, 5, 3, torch.float32)
    assert w.data.is_contiguous() and torch.equal(w.data, w64.t().float())
    assert w.nbytes() == 5 * 3 * 4


def test_gguf_quantised_float_weight_roundtrip() -> None:
    pytest.importorskip("gguf")
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    w = np.random.default_rng(3).standard_normal((5, 64)).astype(np.float32)
    for qtype, pack in [(GGMLQuantizationType.Q4_1, K.pack_q4_1_blocks),
                        (GGMLQuantizationType.Q8_0, K.pack_q8_0_blocks)]:
        raw = quantize(w, qtype)
        qw = pack(raw, (5, 64))
        assert torch.equal(qw.dequantize(), torch.from_numpy(dequantize(raw, qtype)))


def test_gguf_q4_0_scale_overflow_promotes_to_fp32() -> None:
    raw = torch.zeros(1, 18, dtype=torch.uint8)
    raw[0, :2] = torch.tensor([30000.0], dtype=torch.float16).view(torch.uint8)  # -8 d overflows fp16
    raw[0, 2:] = 0x0F  # codes 15 (low) and 0 (high)
    w = K.pack_q4_0_blocks(raw, (1, 32)).dequantize()
    assert w[0, 0].item() == 30000.0 * 7 and w[0, 16].item() == 30000.0 * -8


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 16), (8, None), (8, 32)])
def test_quantize_error_bound(bits: int, group: int | None) -> None:
    w = torch.randn(9, 100)
    qw = K.quantize_int4(w, group) if bits == 4 else K.quantize_int8(w, group)
    err = (qw.dequantize() - w).abs()
    g = qw.group_size
    step = qw.scales.float().repeat_interleave(g, dim=1)[:, :100]
    # Round-to-nearest: half a step, plus fp16 rounding of the stored min (int4).
    assert (err <= 0.5 * step + 2e-3 * w.abs().amax()).all()
    assert qw.codes().min() >= (0 if bits == 4 else -127) and qw.codes().max() <= (15 if bits == 4 else 127)


def _weights(bits: int, n: int, k: int, group: int | None) -> K.QuantizedWeight:
    w = torch.randn(n, k) * 0.1
    qw = K.quantize_int4(w, group or 32) if bits == 4 else K.quantize_int8(w, group)
    return qw.to(DEV)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (8, None), (8, 32)])
@pytest.mark.parametrize("m", [1, 3])
def test_quant_linear(dtype: torch.dtype, bits: int, group: int | None, m: int) -> None:
    n, k = 37, 200  # odd N, K not a multiple of the group: padded codes meet masked x
    qw = _weights(bits, n, k, group)
    x = torch.randn(m, k, device=DEV).to(dtype)
    bias = torch.randn(n, device=DEV).to(dtype)
    out = K.quant_linear(x, qw, bias, backend="triton")
    assert out.shape == (m, n) and out.dtype == dtype
    close(out, K.quant_linear_ref(x, qw, bias), dtype, scale=2.0)


@needs_triton
@pytest.mark.parametrize("split_k", [1, 2, 5])
@pytest.mark.parametrize("bits", [4, 8])
def test_quant_linear_split_k(split_k: int, bits: int) -> None:
    qw = _weights(bits, 24, 320, 32)
    x = torch.randn(2, 1, 320, device=DEV)  # leading dims are flattened and restored
    out = K.quant_linear_triton(x, qw, split_k=split_k)
    assert out.shape == (2, 1, 24)
    close(out, K.quant_linear_ref(x, qw), torch.float32)


@needs_triton
def test_quant_linear_from_gguf_blocks() -> None:
    pytest.importorskip("gguf")
    n, k = 20, 128
    for name, pack in [("Q4_1", K.pack_q4_1_blocks), ("Q4_0", K.pack_q4_0_blocks), ("Q8_0", K.pack_q8_0_blocks)]:
        raw, _ = _random_gguf_blocks(name, n, k)
        qw = pack(torch.from_numpy(raw), (n, k)).to(DEV)
        x = torch.randn(1, k, device=DEV)
        out = K.quant_linear_triton(x, qw)
        ref = x @ qw.dequantize().t()
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_quant_linear_many_rows_falls_back() -> None:
    qw = _weights(4, 16, 64, 32)
    x = torch.randn(K.GEMV_MAX_ROWS + 5, 64, device=DEV)
    out = K.quant_linear_triton(x, qw) if CAN_RUN_TRITON else K.quant_linear(x, qw)
    close(out, K.quant_linear_ref(x, qw), torch.float32, scale=5.0)


# --------------------------------------------------------------------------- sampling


def test_logit_keys_preserve_order() -> None:
    vals = torch.tensor([float("-inf"), -3e38, -2.5, -1e-30, -0.0, 0.0, 1e-30, 1.0, 3e38, float("inf")])
    keys = K.logit_keys(vals)
    assert (keys[1:] > keys[:-1]).all()


@needs_triton
def test_sample_matches_twin_exactly() -> None:
    b, v = 8, 257
    logits = torch.randn(b, v, device=DEV) * 3
    logits[5, 10:20] = logits[5].max()  # ties at the top
    logits[6, :5] = 9.0  # five tied maxima with top_k = 3: all five are kept
    logits[3] = torch.round(logits[3] * 2) / 2  # coarse values (as bf16 logits): ties everywhere
    temp = torch.tensor([0.0, 1.0, 0.7, 1.3, 1.0, 0.5, 2.0, 1.0], device=DEV)
    top_k = torch.tensor([0, 0, 5, 40, 1, v, 3, 0], device=DEV, dtype=torch.int32)
    top_p = torch.tensor([1.0, 0.9, 1.0, 0.8, 0.5, 0.3, 0.95, 0.0], device=DEV)
    for _ in range(4):
        u = torch.rand(b, device=DEV)
        got = K.sample(logits, temp, top_k, top_p, u, backend="triton")
        assert got.dtype == torch.int64
        assert torch.equal(got, K.sample_ref(logits, temp, top_k, top_p, u))
        assert got[6] < 5
    assert got[0] == logits[0].argmax()
    assert got[4] == logits[4].argmax()  # top_k = 1


@needs_triton
def test_sample_greedy_ties_and_scalar_params() -> None:
    logits = torch.zeros(2, 50, device=DEV)
    logits[0, [7, 30]] = 5.0
    logits[1, 49] = 1.0
    u = torch.rand(2, device=DEV)
    got = K.sample_triton(logits, 0.0, 0, 1.0, u)
    assert got.tolist() == [7, 49]  # first maximal index on ties
    # fp16 logits and scalar parameters; top-k ties at the threshold are all kept.
    lg = torch.tensor([[3.0, 1.0, 3.0, 2.0, 3.0, -1.0]], device=DEV, dtype=torch.float16)
    for uu in [0.0, 0.2, 0.4, 0.6, 0.99]:
        uvec = torch.tensor([uu], device=DEV)
        tok = K.sample_triton(lg, 1.0, 2, 1.0, uvec)
        assert tok.item() in (0, 2, 4)
        assert torch.equal(tok, K.sample_ref(lg, 1.0, 2, 1.0, uvec))


def _expected_probs(logits: torch.Tensor, temp: float, top_k: int, top_p: float) -> torch.Tensor:
    """Independent (sort-based, HF-warper-style) statement of the sampling distribution."""
    p = torch.softmax(logits.double() / temp, dim=-1)
    order = torch.argsort(logits, descending=True)
    keep = torch.zeros_like(p, dtype=torch.bool)
    keep[order[:top_k]] = True
    q = torch.where(keep, p, 0.0)
    q = q / q.sum()
    sorted_q = q[order]
    mass_before = torch.cumsum(sorted_q, 0) - sorted_q  # mass strictly above each token
    nucleus = torch.zeros_like(keep)
    nucleus[order[mass_before < top_p]] = True
    q = torch.where(keep & nucleus, q, 0.0)
    return q / q.sum()


def _chi2_ok(tokens: torch.Tensor, probs: torch.Tensor) -> tuple[bool, str]:
    allowed = probs > 0
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    exp = probs * tokens.numel()
    chi2 = float((((counts - exp) ** 2) / exp.clamp_min(1e-12))[allowed].sum())
    df = int(allowed.sum()) - 1
    return chi2 < df + 8 * math.sqrt(2 * df), f"chi2 {chi2:.1f} for {df} dof"


_DIST_LOGITS = [2.0, 1.6, 1.2, 0.9, 0.5, 0.4, 0.0, -0.3, -1.0, 3.0, 2.5, 1.4]
_DIST_PARAMS = (0.9, 7, 0.85)  # temperature, top_k, top_p: both filters bite


@needs_triton
def test_sample_distribution_respects_top_k_top_p() -> None:
    base = torch.tensor(_DIST_LOGITS)
    v = base.numel()
    temp, top_k, top_p = _DIST_PARAMS
    probs = _expected_probs(base, temp, top_k, top_p)
    allowed = probs > 0
    assert 2 < int(allowed.sum()) < top_k
    # Kernel on evenly spaced quantiles u = (i + 1/2) / n: the kept tokens, in vocabulary order,
    # own consecutive slices of [0, 1) as long as their probabilities, so every token's count is
    # within 1 of n * p -- a deterministic, exact statement of the distribution.
    n = 128
    u = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    logits = base.expand(n, v).contiguous().to(DEV)
    tokens = K.sample(logits, temp, top_k, top_p, u.to(DEV), backend="triton").cpu()
    assert allowed[tokens].all(), "sampled a token outside the top-k / top-p set"
    counts = torch.bincount(tokens, minlength=v).double()
    assert ((counts - n * probs).abs() <= 1.0 + 1e-9).all(), (counts, n * probs)
    # The twin on random draws (cheap on the CPU): a loose chi-square test.
    m = 50000
    ref_tokens = K.sample_ref(base.expand(m, v), temp, top_k, top_p, torch.rand(m))
    assert allowed[ref_tokens].all()
    ok, msg = _chi2_ok(ref_tokens, probs)
    assert ok, msg


@gpu
@pytest.mark.gpu
def test_sample_distribution_random_draws_gpu() -> None:
    base = torch.tensor(_DIST_LOGITS)
    temp, top_k, top_p = _DIST_PARAMS
    probs = _expected_probs(base, temp, top_k, top_p)
    n = 20000
    tokens = K.sample(base.cuda().expand(n, -1).contiguous(), temp, top_k, top_p, torch.rand(n, device="cuda")).cpu()
    assert (probs[tokens] > 0).all()
    ok, msg = _chi2_ok(tokens, probs)
    assert ok, msg


# --------------------------------------------------------------------------- decode step


def _decode_step(backend: str, x, res, qkv_w, o_w, up_w, down_w, norm_w, cos, sin, pos, seq, kc, vc, temp, u, dims):
    hq, hkv, d, inter = dims
    kwargs = {"backend": backend}
    h, res2 = K.add_rms_norm(x, res, norm_w, **kwargs)
    qkv = K.quant_linear(h, qkv_w, **kwargs)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q = K.rope_kv_write(q.view(1, 1, hq, d), k.view(1, 1, hkv, d), v.view(1, 1, hkv, d), cos, sin, pos, kc, vc,
                        **kwargs)
    att = K.decode_attention(q.view(1, hq, d), kc, vc, seq, **kwargs)
    y = K.quant_linear(att.view(1, hq * d), o_w, **kwargs)
    gu = K.quant_linear(y, up_w, **kwargs)
    mlp = K.quant_linear(K.swiglu_fused(gu, **kwargs), down_w, **kwargs)
    return K.sample(mlp, temp, 20, 0.9, u, **kwargs), res2


def _decode_fixture(dtype: torch.dtype):
    hidden, hq, hkv, d, inter, s = 64, 4, 2, 16, 96, 32
    mk = lambda n, k, bits: (K.quantize_int4 if bits == 4 else K.quantize_int8)(torch.randn(n, k) * 0.2, 32).to(DEV)  # noqa: E731
    weights = dict(
        qkv_w=mk((hq + 2 * hkv) * d, hidden, 4), o_w=mk(hidden, hq * d, 8),
        up_w=mk(2 * inter, hidden, 4), down_w=mk(hidden, inter, 4),
        norm_w=torch.ones(hidden, device=DEV, dtype=dtype),
    )
    cos, sin = K.rope_tables(s, d, device=DEV)
    state = dict(
        x=torch.randn(1, hidden, device=DEV).to(dtype), res=torch.randn(1, hidden, device=DEV).to(dtype),
        pos=torch.zeros(1, device=DEV, dtype=torch.int32), seq=torch.ones(1, device=DEV, dtype=torch.int32),
        kc=torch.zeros(1, hkv, s, d, device=DEV, dtype=dtype), vc=torch.zeros(1, hkv, s, d, device=DEV, dtype=dtype),
        temp=torch.full((1,), 0.8, device=DEV), u=torch.rand(1, device=DEV),
    )
    return weights, cos, sin, state, (hq, hkv, d, inter)


@needs_triton
def test_decode_step_reads_positions_from_device_tensors() -> None:
    """CPU twin of the CUDA-graph test: the same launches, parameters mutated in place between
    steps (as a graph replay sees them), must track the eager twin step after step."""
    weights, cos, sin, st, dims = _decode_fixture(torch.float32)
    ref_kc, ref_vc = st["kc"].clone(), st["vc"].clone()
    for step in range(3):
        st["pos"].fill_(step)
        st["seq"].fill_(step + 1)
        st["u"].uniform_()
        st["x"].normal_()
        args = dict(weights, cos=cos, sin=sin, dims=dims, **st)
        tok, _ = _decode_step("triton", **args)
        args.update(kc=ref_kc, vc=ref_vc)
        ref_tok, _ = _decode_step("torch", **args)
        assert torch.equal(tok, ref_tok)
        close(st["kc"], ref_kc, torch.float32)


@gpu
@pytest.mark.gpu
def test_decode_step_cuda_graph_capture() -> None:
    """A whole decode step captured once and replayed with new positions, lengths and random
    draws must equal the same launches run eagerly (and track the torch twin's KV cache)."""
    weights, cos, sin, st, dims = _decode_fixture(torch.bfloat16)
    args = dict(weights, cos=cos, sin=sin, dims=dims, **st)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up compiles every kernel outside the capture
        _decode_step("triton", **args)
    torch.cuda.current_stream().wait_stream(stream)
    st["kc"].zero_()
    st["vc"].zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_tok, graph_res = _decode_step("triton", **args)
    eager_kc, eager_vc = st["kc"].clone(), st["vc"].clone()
    ref_kc, ref_vc = st["kc"].clone(), st["vc"].clone()
    for step in range(4):
        st["pos"].fill_(step)
        st["seq"].fill_(step + 1)
        st["u"].uniform_()
        st["x"].normal_()
        graph.replay()
        eager_tok, eager_res = _decode_step("triton", **dict(args, kc=eager_kc, vc=eager_vc))
        _decode_step("torch", **dict(args, kc=ref_kc, vc=ref_vc))
        torch.cuda.synchronize()
        assert torch.equal(graph_tok, eager_tok)
        assert torch.equal(graph_res, eager_res)
        assert torch.equal(st["kc"], eager_kc) and torch.equal(st["vc"], eager_vc)
        close(st["kc"], ref_kc, torch.bfloat16, scale=2.0)


# --------------------------------------------------------------------------- GPU-only (bf16, real sizes)


@gpu
@pytest.mark.gpu
def test_llama_1b_shapes_bf16_gpu() -> None:
    """bf16 at Llama-3.2-1B sizes; the fp16/fp32 interpreter tests above are the CPU twins."""
    dt = torch.bfloat16
    x = torch.randn(1, 2048, device="cuda", dtype=dt)
    r = torch.randn(1, 2048, device="cuda", dtype=dt)
    w = torch.randn(2048, device="cuda", dtype=dt)
    out, h = K.add_rms_norm(x, r, w)
    ro, rh = K.add_rms_norm_ref(x, r, w)
    close(out, ro, dt)
    assert torch.equal(h, rh)
    for bits in (4, 8):
        qw = _weights(bits, 8192, 2048, 32)
        xx = torch.randn(1, 2048, device="cuda", dtype=dt)
        close(K.quant_linear(xx, qw), K.quant_linear_ref(xx, qw), dt, scale=2.0)
    q = torch.randn(1, 32, 64, device="cuda", dtype=dt)
    kc = torch.randn(1, 8, 4096, 64, device="cuda", dtype=dt)
    vc = torch.randn(1, 8, 4096, 64, device="cuda", dtype=dt)
    seq = torch.tensor([3001], device="cuda")
    close(K.decode_attention(q, kc, vc, seq), K.decode_attention_ref(q, kc, vc, seq), dt)
    g, u = torch.randn(1, 8192, device="cuda", dtype=dt), torch.randn(1, 8192, device="cuda", dtype=dt)
    close(K.swiglu(g, u), K.swiglu_ref(g, u), dt)


@gpu
@pytest.mark.gpu
def test_sample_large_vocab_gpu() -> None:
    logits = (torch.randn(4, 128256, device="cuda") * 4).to(torch.bfloat16)
    temp = torch.tensor([0.0, 0.7, 1.0, 1.2], device="cuda")
    top_k = torch.tensor([0, 50, 0, 1000], device="cuda", dtype=torch.int32)
    top_p = torch.tensor([1.0, 0.9, 0.95, 1.0], device="cuda")
    u = torch.rand(4, device="cuda")
    got = K.sample(logits, temp, top_k, top_p, u)
    assert torch.equal(got, K.sample_ref(logits, temp, top_k, top_p, u))


# --------------------------------------------------------------------------- compile check


def test_kernels_compile_for_h100(tmp_path) -> None:
    """The interpreter never compiles a kernel; this builds every kernel (every dtype) for sm_90
    down to a cubin with Triton's bundled ptxas -- no GPU needed -- and checks for spills."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    import json

    report = tmp_path / "aot.json"
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    res = subprocess.run(
        [sys.executable, "-m", "rejoinder.kernels._aot_check", "--arch", "90", "--json", str(report)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    kernels = json.loads(report.read_text())["kernels"]
    names = {k["kernel"] for k in kernels}
    assert names == {
        "rmsnorm_kernel", "rope_kv_kernel", "decode_attn_split_kernel", "decode_attn_merge_kernel",
        "swiglu_kernel", "qgemv_int4_kernel", "qgemv_int8_kernel", "sample_kernel",
    }
    for k in kernels:
        assert 0 < k["registers"] <= 255, k
        # The decode hot path must not spill; the sampler may spill a few bytes (one per step).
        assert k["spill_store_bytes"] <= (64 if k["kernel"] == "sample_kernel" else 0), k
