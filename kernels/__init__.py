"""Triton kernels (installed as ttha.kernels): fused 4/2-bit dequant-linear, fused router top-k (with the route
plan), grouped MoE decode, and the packed weight format they read (quant.py). Standalone: torch and triton only.

One switch: set_backend("auto"|"triton"|"torch"); use_triton(tensor_or_device) says which path a call
takes. dequant_linear, topk_router and moe_decode dispatch to the Triton kernels on CUDA and to the torch
reference beside each elsewhere; all validate their arguments (ValueError naming the argument).
"""
from __future__ import annotations

import torch

from ._backend import HAS_TRITON, get_backend, set_backend, use_triton
from .dequant_linear import check_args as _check_linear
from .dequant_linear import dequant_linear_ref, dequant_linear_triton
from .moe import GroupedExperts, moe_decode_ref, moe_decode_triton
from .moe import check_args as _check_moe
from .moe import kernel_supports as _moe_supported
from .quant import QuantizedWeight
from .topk_router import RoutePlan, kernel_supports, route_plan_ref, topk_router_ref, topk_router_triton
from .topk_router import check_args as _check_router

__all__ = ["HAS_TRITON", "set_backend", "get_backend", "use_triton", "dequant_linear", "dequant_linear_ref",
           "dequant_linear_triton", "topk_router", "topk_router_ref", "topk_router_triton", "RoutePlan",
           "route_plan_ref", "GroupedExperts", "moe_decode", "moe_decode_ref", "moe_decode_triton"]


def dequant_linear(x: torch.Tensor, qweight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ dequant(qweight).T (+ bias) for x [..., K] in bf16/fp16; output in x's dtype."""
    if use_triton(x):
        return dequant_linear_triton(x, qweight, bias)
    _check_linear(x, qweight, bias)
    return dequant_linear_ref(x, qweight, bias)


def topk_router(logits: torch.Tensor, bias: torch.Tensor, k: int, return_counts: bool = False,
                return_plan: bool = False):
    """(weights [T, k] fp32, indices [T, k] int64[, counts [E] int32][, plan]) of softmax(logits + bias) top-k,
    weights renormalised to sum 1; counts = routed tokens per expert (same pass); plan = the RoutePlan that
    moe_decode reads (the slots grouped by expert), built on the device (in the same launch at decode sizes)."""
    _check_router(logits, bias, k)
    if use_triton(logits) and kernel_supports(logits, k):
        return topk_router_triton(logits, bias, k, return_counts, return_plan)
    return topk_router_ref(logits, bias, k, return_counts, return_plan)


def moe_decode(x: torch.Tensor, weights: torch.Tensor, plan: RoutePlan, experts: GroupedExperts) -> torch.Tensor:
    """out [T, D] = sum_j weights[t, j] * expert_j(x[t]) over the slots of `plan` (topk_router(...,
    return_plan=True)), experts w2 @ gelu(w1 @ x) in x's dtype (bf16/fp16). On CUDA the grouped kernels: only the
    routed experts' weights are read and the host never syncs (graph-capturable; tuned on the first call per
    shape, so make one eagerly before a capture). Elsewhere, or for a layer the kernels do not take, the torch
    reference, which reads the plan on the host."""
    if use_triton(x) and isinstance(experts, GroupedExperts) and _moe_supported(experts):
        return moe_decode_triton(x, weights, plan, experts)
    _check_moe(x, weights, plan, experts)
    return moe_decode_ref(x, weights, plan, experts)
