"""The one switch between Triton kernels and torch references."""
from __future__ import annotations

import inspect
import logging
import os

import torch

log = logging.getLogger("ttha.kernels")

try:
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - triton is a Linux-only dependency
    triton, tl, HAS_TRITON = None, None, False

BACKENDS = ("auto", "triton", "torch")
_state = {"backend": "auto"}


def interpreting() -> bool:
    """Triton's CPU interpreter is on (CI without a GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def set_backend(name: str) -> str:
    """'auto' (Triton on CUDA, torch elsewhere), 'triton' (also the interpreter on CPU) or 'torch'."""
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r}: must be one of {BACKENDS}")
    if name == "triton" and not HAS_TRITON:
        raise ValueError("backend='triton': triton is not importable here")
    _state["backend"] = name
    log.info("ttha.kernels backend: %s (triton %s, cuda %s)", name,
             "available" if HAS_TRITON else "missing", torch.cuda.is_available())
    return name


def get_backend() -> str:
    return _state["backend"]


def use_triton(x) -> bool:
    """True when a call on this tensor/device should run the Triton kernel.

    CUDA tensors use Triton unless the backend is 'torch'; CPU tensors only when the backend is
    forced to 'triton' and Triton's interpreter is on (how the CPU tests exercise the kernels).
    """
    if not HAS_TRITON or _state["backend"] == "torch":
        return False
    dev = x.device if isinstance(x, torch.Tensor) else torch.device(x)
    if dev.type == "cuda":
        return True
    return _state["backend"] == "triton" and interpreting()


def autotune_kwargs() -> dict:
    """Persist tuned configs in Triton's cache dir where this Triton version supports it."""
    if HAS_TRITON and "cache_results" in inspect.signature(triton.autotune).parameters:
        return {"cache_results": True}
    return {}
