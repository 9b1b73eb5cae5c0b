"""Build and bind the native CPU decode kernels (``cpu_decode.c``).

The C file is compiled once per machine with the host C compiler (``$CC``, else ``cc``/``gcc``/
``clang``) and ``-march=native``, into a cache folder keyed by the source, the compiler and the CPU,
then loaded with ctypes: no build step at install time, no Python extension ABI, about a second
the first time and nothing after. OpenMP is used when the compiler has it (row-parallel matvecs);
without it the kernels run on one thread.

Weights are handed over as :class:`~.ggml.GGMLWeight`: rows of ggml blocks exactly as the GGUF file
stores them (Q4_0 / Q4_1 / Q8_0), or plain fp32. Their reference twin is
:func:`ggml_weight_dequantize` + ``x @ W.T`` -- the same numbers the torch engine multiplies.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from rejoinder.errors import EngineError

from .ggml import F32, Q4_0, Q4_1, Q8_0, GGMLWeight
from .quant_matmul import pack_q4_0_blocks, pack_q4_1_blocks, pack_q8_0_blocks

SOURCE = Path(__file__).with_name("cpu_decode.c")
CACHE_ENV = "REJOINDER_KERNEL_CACHE"


class NativeKernelsUnavailable(EngineError, RuntimeError):
    """No C compiler, or the kernels failed to build; the message says which and how to fix it."""


def ggml_weight_dequantize(w: GGMLWeight) -> torch.Tensor:
    """The torch twin: the fp32 [rows, cols] weight these blocks stand for."""
    if w.type == F32:
        return w.data.clone()
    pack = {Q4_0: pack_q4_0_blocks, Q4_1: pack_q4_1_blocks, Q8_0: pack_q8_0_blocks}[w.type]
    return pack(w.data.reshape(-1), (w.rows, w.cols)).dequantize(torch.float32)


# ------------------------------------------------------------------------------------------------
# ctypes mirrors of the C structs (field order and types must match cpu_decode.c)


class RjWeight(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("type", ctypes.c_int32), ("rows", ctypes.c_int32), ("cols", ctypes.c_int32)]

    @classmethod
    def of(cls, w: GGMLWeight) -> RjWeight:
        return cls(w.data.data_ptr(), w.type, w.rows, w.cols)


class RjLayer(ctypes.Structure):
    _fields_ = [(n, RjWeight) for n in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")] + [
        (n, ctypes.c_void_p) for n in ("bq", "bk", "bv", "attn_norm", "ffn_norm", "k_cache", "v_cache")
    ]


class RjModel(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_int32)
        for n in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab", "max_seq", "threads",
                  "n_slots")
    ] + [
        ("norm_eps", ctypes.c_float),
        ("embed", ctypes.c_void_p),
        ("rope_cos", ctypes.c_void_p),
        ("rope_sin", ctypes.c_void_p),
        ("final_norm", ctypes.c_void_p),
        ("output", RjWeight),
        ("layers", ctypes.POINTER(RjLayer)),
    ]


# ------------------------------------------------------------------------------------------------
# building


def _compiler() -> str:
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return cand
    raise NativeKernelsUnavailable(
        "no C compiler found (set $CC, or install one: `apt-get install gcc`); "
        "the engine decodes with the slower eager torch path instead"
    )


def _cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "rejoinder", "kernels"
    )
    return Path(root)


def _cpu_signature() -> str:
    """What -march=native depends on: a library built on one CPU may not run on another."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def _build(cc: str, out: Path, extra: Sequence[str] = ()) -> None:
    base = [cc, "-O3", "-march=native", *extra, "-fno-math-errno", "-fPIC", "-shared", "-std=c11"]
    attempts = [base + ["-fopenmp"], base]  # OpenMP when the compiler has it, one thread otherwise
    errors = []
    out.parent.mkdir(parents=True, exist_ok=True)
    for flags in attempts:
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        proc = subprocess.run(flags + [str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
        if proc.returncode == 0:
            os.replace(tmp, out)  # atomic: concurrent builders never see a half-written library
            return
        os.unlink(tmp)
        errors.append(f"$ {' '.join(flags)} ...\n{proc.stderr.strip()[-2000:]}")
    raise NativeKernelsUnavailable("building the CPU kernels failed:\n" + "\n".join(errors))


_lib: ctypes.CDLL | None = None
_lib_lock = threading.Lock()


def library_path(extra: Sequence[str] = ()) -> Path:
    cc = _compiler()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        SOURCE.read_bytes() + version.encode() + _cpu_signature().encode() + platform.machine().encode()
        + " ".join(extra).encode()
    ).hexdigest()[:16]
    return _cache_dir() / f"rejoinder_cpu_{key}.so"


def _open(extra: Sequence[str] = ()) -> ctypes.CDLL:
    path = library_path(extra)
    if not path.exists():
        _build(_compiler(), path, extra)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise NativeKernelsUnavailable(f"cannot load {path}: {exc}") from None
    model, i32, ptr = ctypes.POINTER(RjModel), ctypes.c_int32, ctypes.c_void_p
    lib.rj_decode_batch.argtypes = [model, i32, ptr, ptr, ptr, ptr, ptr]
    lib.rj_decode_batch.restype = ctypes.c_int
    lib.rj_decode_floats.argtypes = [model, i32]
    lib.rj_decode_floats.restype = ctypes.c_size_t
    lib.rj_prefill.argtypes = [model, ptr, i32, i32, i32, ptr, ptr]
    lib.rj_prefill.restype = ctypes.c_int
    lib.rj_prefill_floats.argtypes = [model, i32]
    lib.rj_prefill_floats.restype = ctypes.c_size_t
    lib.rj_matvec.argtypes = [ctypes.POINTER(RjWeight), i32, ptr, ptr]
    lib.rj_matvec.restype = None
    return lib


def load_library() -> ctypes.CDLL:
    """The compiled kernels (built on first use). Raises NativeKernelsUnavailable if impossible."""
    global _lib
    with _lib_lock:
        if _lib is None:
            _lib = _open()
        return _lib


def load_variant(extra_flags: Sequence[str]) -> ctypes.CDLL:
    """The kernels built with extra compiler flags after -march=native (say ``-mno-avx2``, the
    portable C path), so tests can hold every instruction-set path to the same results."""
    with _lib_lock:
        return _open(tuple(extra_flags))


def matvec(x: torch.Tensor, w: GGMLWeight, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """y = W x for one fp32 vector x [cols], or Y = X W^T for a batch X [n, cols] of vectors, each
    weight row read once for several of them (single thread; the decode step parallelises itself).
    `lib`: a `load_variant` build instead of the default one."""
    if x.dtype != torch.float32 or x.shape[-1:] != (w.cols,) or x.dim() not in (1, 2) or x.device.type != "cpu":
        raise ValueError(f"x must be a float32 CPU vector of {w.cols} (or [n, {w.cols}]), "
                         f"got {tuple(x.shape)} {x.dtype}")
    lib = lib or load_library()
    x = x.contiguous()
    y = torch.empty((*x.shape[:-1], w.rows), dtype=torch.float32)
    if x.numel() == 0:
        return y
    lib.rj_matvec(ctypes.byref(RjWeight.of(w)), 1 if x.dim() == 1 else x.shape[0], x.data_ptr(), y.data_ptr())
    return y
