"""Triton kernels (installed as ttha.kernels): fused 4/2-bit dequant-linear and fused router top-k, and the
packed weight format they read (quant.py). Standalone: torch and triton only.

One switch: set_backend("auto"|"triton"|"torch"); use_triton(tensor_or_device) says which path a call
takes. dequant_linear and topk_router dispatch to the Triton kernel on CUDA and to the torch
reference beside it elsewhere; both validate their arguments (ValueError naming the argument).
"""
from __future__ import annotations

import torch

from ._backend import HAS_TRITON, get_backend, set_backend, use_triton
from .dequant_linear import check_args as _check_linear
from .dequant_linear import dequant_linear_ref, dequant_linear_triton
from .quant import QuantizedWeight
from .topk_router import check_args as _check_router
from .topk_router import kernel_supports, topk_router_ref, topk_router_triton

__all__ = ["HAS_TRITON", "set_backend", "get_backend", "use_triton", "dequant_linear", "dequant_linear_ref",
           "dequant_linear_triton", "topk_router", "topk_router_ref", "topk_router_triton"]


def dequant_linear(x: torch.Tensor, qweight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ dequant(qweight).T (+ bias) for x [..., K] in bf16/fp16; output in x's dtype."""
    if use_triton(x):
        return dequant_linear_triton(x, qweight, bias)
    _check_linear(x, qweight, bias)
    return dequant_linear_ref(x, qweight, bias)


def topk_router(logits: torch.Tensor, bias: torch.Tensor, k: int, return_counts: bool = False):
    """(weights [T, k] fp32, indices [T, k] int64[, counts [E] int32]) of softmax(logits + bias) top-k,
    weights renormalised to sum 1; counts = routed tokens per expert (same pass)."""
    _check_router(logits, bias, k)
    if use_triton(logits) and kernel_supports(logits, k):
        return topk_router_triton(logits, bias, k, return_counts)
    return topk_router_ref(logits, bias, k, return_counts)
