"""Rejoinder kernels: Triton kernels for decoding, each with a plain-torch reference twin.

Every op comes in three flavours:

* ``<op>_ref(...)``   -- plain torch, any device; the numerical specification.
* ``<op>_triton(...)`` -- the Triton launch (CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1``, which is how CI tests it).
* ``<op>(..., backend=None)`` -- the dispatcher the engine calls: Triton when every tensor is on
  CUDA and Triton is installed, the twin otherwise. ``backend="triton" | "torch"`` (or the
  environment variable ``REJOINDER_KERNEL_BACKEND``) forces one.

Importing this package never imports Triton (it is loaded on the first Triton launch), so it
works on CPU-only machines without Triton. Every launch is CUDA-graph safe: no ``.item()``, no
host synchronisation, and allocations whose sizes depend on shapes only; positions, lengths and
sampling parameters are read from device tensors. (The twins of sampling and quantised matmul
are also sync-free; the GGUF converters below run at load time and may sync.)

Dtypes: activations fp32 / fp16 / bf16; all arithmetic in fp32 with one rounding to the output
dtype. Shapes below use B batch, T new tokens, H hidden, Hq / Hkv query / KV heads, D head_dim,
S the KV cache capacity (max_seq), I intermediate size, N x K a linear weight (out x in), V vocab.

RMSNorm (:mod:`.rmsnorm`)
    ``rms_norm(x [..., H], weight [H], eps=1e-6) -> [..., H]``
    ``add_rms_norm(x [..., H], residual [..., H], weight [H], eps=1e-6) -> (normed, x + residual)``
    -- the residual add fused in; the returned sum is the new residual stream (x.dtype).

RoPE + KV-cache write (:mod:`.rope`)
    ``rope_kv_write(q [B,T,Hq,D], k [B,T,Hkv,D], v [B,T,Hkv,D], cos, sin, input_pos,
    k_cache [B,Hkv,S,D], v_cache [B,Hkv,S,D], cache_rows=None) -> q_rot [B,T,Hq,D]`` (contiguous).
    HF rotate_half convention (halves, not interleaved); ``cos``/``sin`` [S, D/2] (or [S, D]
    duplicated, HF style); ``input_pos`` int tensor [B] (or [1]) of each row's first position;
    rotated k and raw v are written into the caches in place. q/k/v may be strided views.
    ``rope_tables(max_seq, head_dim, theta) -> (cos, sin)`` builds unscaled tables.

Decode attention (:mod:`.attention`)
    ``decode_attention(q [B,Hq,D], k_cache [B,Hkv,S,D], v_cache, seq_lens [B] int, scale=None,
    cache_rows=None, num_splits=None) -> [B,Hq,D]`` -- flash-decoding (KV length split across
    programs, merged by log-sum-exp), GQA-aware (Hq % Hkv == 0), positions >= seq_lens[b] masked.
    Per-session caches: ``cache_rows`` [B] int maps batch row b to cache row cache_rows[b] of
    caches with any number of rows (rope_kv_write takes the same), so B sessions at B lengths
    share one launch.

SwiGLU (:mod:`.activations`)
    ``swiglu(gate [..., I], up [..., I]) -> silu(gate) * up``;
    ``swiglu_fused(gate_up [..., 2I]) -> [..., I]`` (gate first).

Weight-only quantised linear (:mod:`.quant_matmul`)
    ``QuantizedWeight(qweight, scales, mins, bits, group_size, in_features)`` -- packed [N, K]
    weight: int8 (symmetric, ``scale * q``) or int4 (``scale * q + min``, 2 codes per byte, GGUF
    nibble order). ``.dequantize(dtype)``, ``.to(device)``, ``.nbytes()``.
    ``quantize_int8(w [N,K], group_size=None)``, ``quantize_int4(w [N,K], group_size=32)``
    -- from float weights.
    ``pack_q8_0_blocks(raw uint8, (N, K))``, ``pack_q4_0_blocks(...)``, ``pack_q4_1_blocks(...)``
    -- lossless from raw GGUF block bytes (torch-order shape [N, K]; GGUF lists it as (K, N)).
    ``quant_linear(x [..., K], qw, bias=None) -> [..., N]`` -- in-register dequantising GEMV for
    up to ``GEMV_MAX_ROWS`` rows (a decode batch; each dequantised weight tile serves
    ``GEMV_BLOCK_M`` rows); more rows dequantise and use cuBLAS.

Sampling (:mod:`.sampling`)
    ``sample(logits [B,V], temperature, top_k, top_p, uniform [B] fp32) -> int64 [B]`` -- per-row
    tensors or scalars; temperature <= 0 is greedy; top_k 0 / top_p >= 1 disable the filters;
    ``uniform`` are U[0,1) draws on the device, so no host round trip and graph-capturable.

Beside them (not re-exported here): :mod:`.ggml`, the GGML block types (type ids, block sizes,
``GGMLWeight``) that GGUF weights arrive in, and :mod:`.cpu_native`, the native C decode step for
CPUs (compiled on first use, driven through ctypes).

Compile check: ``TRITON_INTERPRET=0 python -m rejoinder.kernels._aot_check --arch 90`` compiles
every kernel at decode shapes for sm_90 with Triton's bundled ptxas -- no GPU needed -- and
prints registers / spills per kernel (the interpreter alone never compiles anything).
"""

from ._backend import BACKEND_ENV, interpreter_enabled, triton_available, use_triton
from .activations import swiglu, swiglu_fused, swiglu_ref, swiglu_triton
from .attention import decode_attention, decode_attention_ref, decode_attention_triton
from .quant_matmul import (
    GEMV_BLOCK_M,
    GEMV_MAX_ROWS,
    QuantizedWeight,
    pack_q4_0_blocks,
    pack_q4_1_blocks,
    pack_q8_0_blocks,
    quant_linear,
    quant_linear_ref,
    quant_linear_triton,
    quantize_int4,
    quantize_int8,
)
from .rmsnorm import (
    add_rms_norm,
    add_rms_norm_ref,
    add_rms_norm_triton,
    rms_norm,
    rms_norm_ref,
    rms_norm_triton,
)
from .rope import apply_rope_ref, rope_kv_write, rope_kv_write_ref, rope_kv_write_triton, rope_tables
from .sampling import logit_keys, sample, sample_ref, sample_triton

__all__ = [
    "BACKEND_ENV",
    "GEMV_BLOCK_M",
    "GEMV_MAX_ROWS",
    "QuantizedWeight",
    "add_rms_norm",
    "add_rms_norm_ref",
    "add_rms_norm_triton",
    "apply_rope_ref",
    "decode_attention",
    "decode_attention_ref",
    "decode_attention_triton",
    "interpreter_enabled",
    "logit_keys",
    "pack_q4_0_blocks",
    "pack_q4_1_blocks",
    "pack_q8_0_blocks",
    "quant_linear",
    "quant_linear_ref",
    "quant_linear_triton",
    "quantize_int4",
    "quantize_int8",
    "rms_norm",
    "rms_norm_ref",
    "rms_norm_triton",
    "rope_kv_write",
    "rope_kv_write_ref",
    "rope_kv_write_triton",
    "rope_tables",
    "sample",
    "sample_ref",
    "sample_triton",
    "swiglu",
    "swiglu_fused",
    "swiglu_ref",
    "swiglu_triton",
    "triton_available",
    "use_triton",
]
