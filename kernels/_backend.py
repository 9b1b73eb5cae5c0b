"""Backend selection shared by every kernel module.

Triton is imported lazily: ``import rejoinder.kernels`` must work on a CPU-only machine without
Triton installed, and the choice between Triton's compiler and its CPU interpreter is made by
``triton.jit`` when a kernel is *defined* (it reads ``TRITON_INTERPRET`` at decoration time).
Each op therefore keeps its ``@triton.jit`` functions in a private ``_<op>_triton`` module that is
imported on the first Triton launch only.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Literal

import torch

from rejoinder.errors import ConfigError, EngineError

Backend = Literal["auto", "triton", "torch"]

#: Environment variable that overrides the default backend ("auto", "triton" or "torch").
BACKEND_ENV = "REJOINDER_KERNEL_BACKEND"


class TritonUnavailable(EngineError, RuntimeError):
    """Triton kernels were asked for (``backend="triton"``) where they cannot run."""


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package can be imported (it is not imported here)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # e.g. sys.modules["triton"] = None, a broken install
        return False


def interpreter_enabled() -> bool:
    """True when Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def use_triton(*tensors: torch.Tensor, backend: Backend | None = None) -> bool:
    """Decide whether a dispatcher launches the Triton kernel or calls the torch twin.

    * ``"torch"``: always the twin.
    * ``"triton"``: always Triton; CPU tensors need ``TRITON_INTERPRET=1`` (tests use this).
    * ``"auto"`` (default, or ``$REJOINDER_KERNEL_BACKEND``): Triton when every tensor lives on
      CUDA and Triton is installed, the twin otherwise. CPU tensors go to the twin even under the
      interpreter, which is far too slow for real work.
    """
    choice = backend or os.environ.get(BACKEND_ENV, "auto")
    if choice == "torch":
        return False
    if choice == "triton":
        if not triton_available():
            raise TritonUnavailable("backend='triton' requested but triton is not installed")
        if not interpreter_enabled() and not all(t.is_cuda for t in tensors):
            raise TritonUnavailable(
                "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
            )
        return True
    if choice != "auto":
        raise ConfigError(f"unknown kernel backend {choice!r}; expected 'auto', 'triton' or 'torch'")
    return triton_available() and all(t.is_cuda for t in tensors)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (Triton block shapes must be powers of two)."""
    return 1 << max(0, (int(n) - 1).bit_length())


# Set by the ahead-of-time compile check (``_aot_check``) to the SM count of a GPU to plan for:
# CPU tensors then get that GPU's launch configurations, so the kernels can be compiled for a GPU
# target on a machine without one. 0 = off.
_ASSUME_GPU: int = 0


def gpu_config(t: torch.Tensor) -> bool:
    """Whether to use GPU launch configurations (block sizes, stages) rather than interpreter ones."""
    return t.is_cuda or _ASSUME_GPU > 0


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Number of streaming multiprocessors; a nominal 8 off CUDA (interpreter, heuristics only)."""
    if device.type != "cuda":
        return _ASSUME_GPU or 8
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
