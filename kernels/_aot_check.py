"""Ahead-of-time compile check: build every Triton kernel for a GPU target without a GPU.

The CPU interpreter executes kernels but never *compiles* them, so a kernel that runs there can
still fail to compile (loop-carried types, dot shapes, ...). This check drives the real launch
wrappers at Llama-3.2-1B decode shapes with CPU tensors, records each launch instead of running
it, and compiles the recorded (kernel, signature, constexprs, options) through Triton's NVIDIA
backend down to a cubin (ptxas is bundled with Triton), then reports registers and spills.

    TRITON_INTERPRET=0 python -m rejoinder.kernels._aot_check [--arch 90] [--json PATH] [--quick]

Needs Triton with its NVIDIA backend; no GPU, no CUDA driver.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

_PTR = {
    torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
    torch.int32: "*i32", torch.int64: "*i64", torch.int8: "*i8", torch.uint8: "*u8",
}

Launch = tuple[Any, tuple[Any, ...], dict[str, Any]]


def _modules() -> list[Any]:
    from . import (
        _attention_triton,
        _quant_matmul_triton,
        _rmsnorm_triton,
        _rope_triton,
        _sampling_triton,
        _swiglu_triton,
    )

    return [_rmsnorm_triton, _rope_triton, _attention_triton, _swiglu_triton, _quant_matmul_triton, _sampling_triton]


class _Recorder:
    def __init__(self, fn: Any, sink: list[Launch]) -> None:
        self.fn, self.sink = fn, sink

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            self.sink.append((self.fn, args, kwargs))

        return launch


@contextmanager
def recording(sm_count: int) -> Iterator[list[Launch]]:
    """Within the block, kernel launches are recorded (not run) and GPU configs are chosen."""
    from triton.runtime.jit import JITFunction

    from . import _backend

    sink: list[Launch] = []
    saved: list[tuple[Any, str, Any]] = []
    for mod in _modules():
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, JITFunction) and not name.startswith("_"):
                saved.append((mod, name, obj))
                setattr(mod, name, _Recorder(obj, sink))
    old = _backend._ASSUME_GPU
    _backend._ASSUME_GPU = sm_count
    try:
        yield sink
    finally:
        _backend._ASSUME_GPU = old
        for mod, name, obj in saved:
            setattr(mod, name, obj)


def _signature(
    fn: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> tuple[dict[str, str], dict[str, Any], dict[str, int]]:
    names = fn.arg_names
    cexpr = {names[i] for i in fn.constexprs}
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k in names})
    sig: dict[str, str] = {}
    consts: dict[str, Any] = {}
    for name in names:
        value = bound[name]
        if name in cexpr:
            sig[name], consts[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            sig[name] = _PTR[value.dtype]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            sig[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}.{name}: cannot type {type(value)}")
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    return sig, consts, options


def drive(quick: bool = False) -> None:
    """Call every launch wrapper with representative decode shapes (Llama-3.2-1B, bf16)."""
    from . import activations, attention, quant_matmul, rmsnorm, rope, sampling

    bf, e = torch.bfloat16, torch.empty
    hidden, hq, hkv, d, inter, vocab, seq = 2048, 32, 8, 64, 8192, 128256, 4096
    dtypes = [bf] if quick else [bf, torch.float16, torch.float32]
    for dt in dtypes:
        x = e(1, hidden, dtype=dt)
        rmsnorm.add_rms_norm_triton(x, x, e(hidden, dtype=dt))
        rope.rope_kv_write_triton(
            e(1, 1, hq, d, dtype=dt), e(1, 1, hkv, d, dtype=dt), e(1, 1, hkv, d, dtype=dt),
            e(seq, d // 2), e(seq, d // 2), e(1, dtype=torch.int32),
            e(1, hkv, seq, d, dtype=dt), e(1, hkv, seq, d, dtype=dt),
        )
        kc = e(1, hkv, seq, d, dtype=dt)
        attention.decode_attention_triton(e(1, hq, d, dtype=dt), kc, kc, e(1, dtype=torch.int32))
        activations.swiglu_triton(e(1, inter, dtype=dt), e(1, inter, dtype=dt))
        sampling.sample_triton(e(1, vocab, dtype=dt), e(1), e(1, dtype=torch.int32), e(1), e(1))
        for n, k in [(hidden, hidden), (vocab, hidden)]:  # split-K and single-pass variants
            for bits in (4, 8):
                if bits == 4:
                    qw = quant_matmul.QuantizedWeight(
                        e(n, k // 2, dtype=torch.uint8), e(n, k // 32, dtype=torch.float16),
                        e(n, k // 32, dtype=torch.float16), 4, 32, k,
                    )
                else:
                    qw = quant_matmul.QuantizedWeight(
                        e(n, k, dtype=torch.int8), e(n, k // 32, dtype=torch.float16), None, 8, 32, k,
                    )
                quant_matmul.quant_linear_triton(e(1, k, dtype=dt), qw)
                quant_matmul.quant_linear_triton(e(4, k, dtype=dt), qw)  # a batch of 4 sessions
        # a batch of 4 sessions over 8 per-session cache slots
        slots, rows = 8, e(4, dtype=torch.int64)
        rope.rope_kv_write_triton(
            e(4, 1, hq, d, dtype=dt), e(4, 1, hkv, d, dtype=dt), e(4, 1, hkv, d, dtype=dt),
            e(seq, d // 2), e(seq, d // 2), e(4, dtype=torch.int64),
            e(slots, hkv, seq, d, dtype=dt), e(slots, hkv, seq, d, dtype=dt), rows,
        )
        kcs = e(slots, hkv, seq, d, dtype=dt)
        attention.decode_attention_triton(e(4, hq, d, dtype=dt), kcs, kcs, e(4, dtype=torch.int64), cache_rows=rows)
        if not quick:
            rmsnorm.rms_norm_triton(x, e(hidden, dtype=dt))
            attention.decode_attention_triton(e(1, hq, d, dtype=dt), kc, kc, e(1, dtype=torch.int32), num_splits=1)


def _ptxas_stats(ptx: str, arch: int) -> dict[str, int]:
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path  # the ptxas Triton itself compiled with
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run(
            [ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", path, "-o", os.devnull], capture_output=True, text=True
        ).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return {"registers": int(regs.group(1)) if regs else -1, "spill_store_bytes": int(spill.group(1)) if spill else -1}


def compile_all(arch: int = 90, quick: bool = False) -> list[dict[str, Any]]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("run with TRITON_INTERPRET=0: interpreted kernels cannot be compiled")
    with recording(sm_count=132) as launches:
        drive(quick)
    seen: set[str] = set()
    results = []
    for fn, args, kwargs in launches:
        sig, consts, options = _signature(fn, args, kwargs)
        key = json.dumps([fn.__name__, sig, {k: str(v) for k, v in consts.items()}, options], sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        t0 = time.perf_counter()
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                                  target=GPUTarget("cuda", arch, 32), options=options)
        entry = {
            "kernel": fn.__name__,
            "dtypes": sorted({v for v in sig.values() if v.startswith("*")}),
            "constexprs": {k: v for k, v in consts.items()},
            "options": options,
            "shared_bytes": compiled.metadata.shared,
            "compile_s": round(time.perf_counter() - t0, 2),
        }
        entry.update(_ptxas_stats(compiled.asm["ptx"], arch))
        results.append(entry)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="SM architecture, e.g. 90 (H100), 80 (A100)")
    parser.add_argument("--json", help="write the per-kernel report here")
    parser.add_argument("--quick", action="store_true", help="bf16 variants only")
    ns = parser.parse_args(argv)
    results = compile_all(ns.arch, ns.quick)
    for r in results:
        print(f"{r['kernel']:28s} {','.join(r['dtypes']):32s} regs={r['registers']:4d} "
              f"spill={r['spill_store_bytes']:5d}B smem={r['shared_bytes']:6d}B {r['compile_s']:.1f}s")
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump({"arch": f"sm_{ns.arch}", "triton": __import__("triton").__version__, "kernels": results}, f,
                      indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
