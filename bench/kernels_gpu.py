"""Micro-benchmark of the decode kernels against their peers, measured in the same run.

Llama-3.2-1B decode shapes, bf16, batch 1: hidden 2048, 32 query / 8 KV heads, head_dim 64,
intermediate 8192, vocab 128256. Each op is timed as

* ``triton``   -- our kernel (rejoinder.kernels.<op>_triton),
* ``torch``    -- its plain-torch twin (eager),
* ``compiled`` -- the twin under ``torch.compile`` (inductor, max-autotune-no-cudagraphs),
* peers where one exists: cuBLAS bf16 ``F.linear`` for the quantised GEMV (reading 4x / 2x the
  bytes), SDPA for decode attention.

Times come from CUDA graphs of 20 back-to-back launches (``triton.testing.do_bench_cudagraph``),
so the figures are kernel time, not Python launch overhead. Memory-bound ops also report achieved
bandwidth (bytes that must move / time) against the HBM peak of the GPU.

    python bench/kernels_gpu.py --out bench/results            # on a CUDA machine
    python bench/kernels_gpu.py --smoke                        # CPU: twins only, checks the script

Writes ``kernels_gpu.json`` and ``kernels_gpu.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # run from a checkout, too

from rejoinder import kernels as K  # noqa: E402

# HBM peak in GB/s by product name (datasheet figures).
PEAKS = {"H100 80GB HBM3": 3350.0, "H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H200": 4800.0, "A100": 2039.0}

HIDDEN, HQ, HKV, HEAD_DIM, INTER, VOCAB = 2048, 32, 8, 64, 8192, 128256


def peak_gbps(device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    name = torch.cuda.get_device_name(device)
    for key, value in PEAKS.items():
        if key in name:
            return value
    return float("nan")


def bench(fn: Callable[[], Any], device: torch.device, smoke: bool) -> float:
    """Median time of one call in microseconds."""
    if device.type == "cuda":
        import triton.testing

        fn()  # compile / autotune outside the graph
        torch.cuda.synchronize()
        return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=50 if smoke else 200)
    times = []
    for _ in range(2 if smoke else 10):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e6 * sorted(times)[len(times) // 2]


def compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    return torch.compile(fn, mode="max-autotune-no-cudagraphs", dynamic=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--smoke", action="store_true", help="tiny run; on CPU only the twins are timed")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile peers")
    ns = parser.parse_args(argv)

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = dev.type == "cuda"
    use_compile = on_gpu and not ns.no_compile
    dt = torch.bfloat16 if on_gpu else torch.float32
    peak = peak_gbps(dev)
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []

    def record(op: str, shape: str, impl: str, fn: Callable[[], Any], nbytes: int | None = None) -> None:
        try:
            us = bench(fn, dev, ns.smoke)
        except Exception as exc:  # a peer failing to build must not sink the whole report
            print(f"{op:18s} {impl:10s} FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
            return
        row: dict[str, Any] = {"op": op, "shape": shape, "impl": impl, "us": round(us, 2)}
        if nbytes is not None:
            row["bytes"] = nbytes
            row["gbps"] = round(nbytes / us / 1e3, 1)
            if not math.isnan(peak):
                row["pct_peak"] = round(100 * row["gbps"] / peak, 1)
        rows.append(row)
        extra = (f" {row['gbps']:8.1f} GB/s" + (f" ({row['pct_peak']:.0f}% of peak)" if "pct_peak" in row else "")
                 if nbytes else "")
        print(f"{op:18s} {shape:26s} {impl:10s} {us:9.2f} us{extra}", flush=True)

    def triple(op: str, shape: str, tri: Callable[[], Any], ref: Callable[[], Any], ref_c: Callable[[], Any] | None,
               nbytes: int | None) -> None:
        if on_gpu:
            record(op, shape, "triton", tri, nbytes)
        record(op, shape, "torch", ref, nbytes)
        if use_compile and ref_c is not None:
            record(op, shape, "compiled", ref_c, nbytes)

    esz = torch.finfo(dt).bits // 8

    # RMSNorm fused with the residual add.
    x = torch.randn(1, HIDDEN, device=dev, dtype=dt)
    r = torch.randn_like(x)
    w = torch.randn(HIDDEN, device=dev, dtype=dt)
    c_norm = compiled(K.add_rms_norm_ref)
    triple("add_rms_norm", f"[1,{HIDDEN}]", lambda: K.add_rms_norm_triton(x, r, w), lambda: K.add_rms_norm_ref(x, r, w),
           lambda: c_norm(x, r, w), 5 * HIDDEN * esz)

    # RoPE + KV-cache write (decode: one token).
    max_seq = 8192 if not ns.smoke else 1024
    kc = torch.zeros(1, HKV, max_seq, HEAD_DIM, device=dev, dtype=dt)
    vc = torch.zeros_like(kc)
    cos, sin = K.rope_tables(max_seq, HEAD_DIM, 500000.0, device=dev)
    qkv = torch.randn(1, 1, (HQ + 2 * HKV) * HEAD_DIM, device=dev, dtype=dt)
    q, k, v = (t.view(1, 1, -1, HEAD_DIM) for t in qkv.split([HQ * HEAD_DIM, HKV * HEAD_DIM, HKV * HEAD_DIM], -1))
    pos = torch.tensor([777], device=dev, dtype=torch.int32)
    triple("rope_kv_write", f"q[1,1,{HQ},{HEAD_DIM}]", lambda: K.rope_kv_write_triton(q, k, v, cos, sin, pos, kc, vc),
           lambda: K.rope_kv_write_ref(q, k, v, cos, sin, pos, kc, vc), None, None)

    # Decode attention at several context lengths (cache capacity max_seq).
    kc.normal_()
    vc.normal_()
    qd = torch.randn(1, HQ, HEAD_DIM, device=dev, dtype=dt)
    c_attn = compiled(K.decode_attention_ref)
    for length in ([512, 2048, 8192] if not ns.smoke else [512]):
        lens = torch.tensor([length], device=dev, dtype=torch.int32)
        nbytes = 2 * HKV * length * HEAD_DIM * esz + 2 * HQ * HEAD_DIM * esz
        shape = f"L={length} (cap {max_seq})"
        triple("decode_attention", shape, lambda: K.decode_attention_triton(qd, kc, vc, lens),
               lambda: K.decode_attention_ref(qd, kc, vc, lens), lambda: c_attn(qd, kc, vc, lens), nbytes)
        if on_gpu:  # SDPA over exactly the live prefix (needs the length on the host: a peer, not a drop-in)
            ks, vs = kc[:, :, :length], vc[:, :, :length]
            record("decode_attention", shape, "sdpa", lambda: F.scaled_dot_product_attention(
                qd[:, :, None], ks, vs, enable_gqa=True), nbytes)

    # SwiGLU.
    g = torch.randn(1, INTER, device=dev, dtype=dt)
    u = torch.randn_like(g)
    c_swiglu = compiled(K.swiglu_ref)
    triple("swiglu", f"[1,{INTER}]", lambda: K.swiglu_triton(g, u), lambda: K.swiglu_ref(g, u), lambda: c_swiglu(g, u),
           3 * INTER * esz)

    # Weight-only quantised GEMV, every linear of a Llama-3.2-1B layer plus the LM head.
    shapes = {"q/o_proj": (HIDDEN, HIDDEN), "k/v_proj": (HKV * HEAD_DIM, HIDDEN), "gate/up_proj": (INTER, HIDDEN),
              "down_proj": (HIDDEN, INTER), "lm_head": (VOCAB, HIDDEN)}
    if ns.smoke:
        shapes = {"q/o_proj": (HIDDEN, HIDDEN)}
    for name, (n, kdim) in shapes.items():
        w_f = torch.randn(n, kdim, device=dev, dtype=dt) * 0.02
        xx = torch.randn(1, kdim, device=dev, dtype=dt)
        if on_gpu:
            record("linear", f"{name} {n}x{kdim}", "cublas-bf16", lambda: F.linear(xx, w_f),
                   (n * kdim + kdim + n) * esz)
        for bits in (4, 8):
            qw = (K.quantize_int4(w_f, 32) if bits == 4 else K.quantize_int8(w_f, 32)).to(dev)
            nbytes = qw.nbytes() + (kdim + n) * esz
            op = f"gemv_int{bits}"
            if on_gpu:
                record(op, f"{name} {n}x{kdim}", "triton", lambda: K.quant_linear_triton(xx, qw), nbytes)
            else:
                record(op, f"{name} {n}x{kdim}", "torch", lambda: K.quant_linear_ref(xx, qw), nbytes)

    # Sampling over the full vocabulary.
    logits = torch.randn(1, VOCAB, device=dev, dtype=dt) * 3
    uu = torch.rand(1, device=dev)
    for label, (t, tk, tp) in {"greedy": (0.0, 0, 1.0), "t0.7 k50 p0.9": (0.7, 50, 0.9),
                               "t0.7 p0.9": (0.7, 0, 0.9)}.items():
        temp = torch.full((1,), t, device=dev)
        topk = torch.full((1,), tk, device=dev, dtype=torch.int32)
        topp = torch.full((1,), tp, device=dev)
        triple("sample", f"V={VOCAB} {label}", lambda: K.sample_triton(logits, temp, topk, topp, uu),
               lambda: K.sample_ref(logits, temp, topk, topp, uu), None, VOCAB * esz)

    meta = {
        "device": torch.cuda.get_device_name(dev) if on_gpu else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": __import__("triton").__version__ if K.triton_available() else None,
        "dtype": str(dt),
        "peak_gbps": peak,
        "smoke": ns.smoke,
        "method": "triton.testing.do_bench_cudagraph (median), batch 1" if on_gpu else "wall clock (CPU smoke)",
    }
    os.makedirs(ns.out, exist_ok=True)
    stem = "kernels_gpu" if on_gpu else "kernels_cpu_smoke"
    with open(os.path.join(ns.out, f"{stem}.json"), "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)
    plot(rows, meta, os.path.join(ns.out, f"{stem}.png"))
    return 0


def plot(rows: list[dict[str, Any]], meta: dict[str, Any], path: str) -> None:
    """Two panels: bandwidth of the memory-bound ops vs peak, and latency of every op."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: JSON written, no PNG", file=sys.stderr)
        return
    impls = sorted({r["impl"] for r in rows})
    colors = {i: c for i, c in zip(impls, ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"])}
    fig, axes = plt.subplots(2, 1, figsize=(13, 10))
    bw = [r for r in rows if "gbps" in r and r["op"].startswith(("gemv", "linear", "decode_attention"))]
    for ax, data, key, label in ((axes[0], bw, "gbps", "achieved GB/s"), (axes[1], rows, "us", "µs per call (log)")):
        cases = list(dict.fromkeys(f"{r['op']}\n{r['shape']}" for r in data))
        width = 0.8 / max(1, len(impls))
        for j, impl in enumerate(impls):
            xs, ys = [], []
            for i, case in enumerate(cases):
                for r in data:
                    if r["impl"] == impl and f"{r['op']}\n{r['shape']}" == case:
                        xs.append(i + j * width)
                        ys.append(r[key])
            if xs:
                ax.bar(xs, ys, width, label=impl, color=colors[impl])
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
        ax.set_xticklabels(cases, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    if not math.isnan(meta["peak_gbps"]):
        axes[0].axhline(meta["peak_gbps"], color="k", ls="--", lw=1)
        axes[0].axhline(0.7 * meta["peak_gbps"], color="gray", ls=":", lw=1)
    axes[1].set_yscale("log")
    fig.suptitle(f"rejoinder kernels, {meta['device']}, {meta['dtype']}, batch 1 (dashed: HBM peak, dotted: 70%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
