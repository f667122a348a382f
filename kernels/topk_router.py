"""Fused router top-k: softmax(logits + bias) in fp32, k largest, renormalised to sum 1; one launch.

Renormalising the k largest softmax probabilities cancels the softmax denominator, so the
kernel never needs it: weights = exp(l_sel - l_max) / sum(exp(l_sel - l_max)) over the k
selected logits (bias added). Each program owns BT rows held whole in registers (E <= 256),
picks the k maxima by k rounds of max + mask, and optionally adds per-expert counts of the
routed tokens (what the load balancer needs) with one atomic add per expert per program.
"""
from __future__ import annotations

import torch

from ._backend import HAS_TRITON, triton, tl

MAX_E = 256  # kernel limits (the sizes); larger calls use the reference
MAX_K = 16


def topk_router_ref(logits: torch.Tensor, bias: torch.Tensor, k: int, return_counts: bool = False):
    """Torch reference: softmax + add + topk + normalise (+ bincount)."""
    probs = torch.softmax(logits.float() + bias.float(), dim=-1)
    w, idx = probs.topk(k, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    if return_counts:
        return w, idx, torch.bincount(idx.flatten(), minlength=logits.shape[-1]).to(torch.int32)
    return w, idx


def check_args(logits, bias, k) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits: expected a 2-D [T, E] tensor, got shape {tuple(getattr(logits, 'shape', ()))}")
    if not logits.dtype.is_floating_point:
        raise ValueError(f"logits: dtype must be floating point, got {logits.dtype}")
    e = logits.shape[1]
    if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (e,):
        raise ValueError(f"bias: expected shape ({e},), got {tuple(getattr(bias, 'shape', ()))}")
    if bias.device != logits.device:
        raise ValueError(f"bias: on {bias.device}, logits on {logits.device}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= e:
        raise ValueError(f"k={k}: must be an int in [1, E={e}]")


def kernel_supports(logits: torch.Tensor, k: int) -> bool:
    return logits.shape[1] <= MAX_E and k <= MAX_K


if HAS_TRITON:

    @triton.jit
    def _topk_router_kernel(l_ptr, b_ptr, w_ptr, i_ptr, c_ptr, T, E, stride_l,
                            K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr,
                            COUNTS: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BT + tl.arange(0, BT)
        cols = tl.arange(0, BE)
        r_ok = rows < T
        c_ok = cols < E
        rows64 = rows.to(tl.int64)
        x = tl.load(l_ptr + rows64[:, None] * stride_l + cols[None, :],
                    mask=r_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        x += tl.load(b_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        x = tl.where(c_ok[None, :], x, float("-inf"))

        kc = tl.arange(0, KP)
        vals = tl.zeros((BT, KP), dtype=tl.float32)
        idxs = tl.zeros((BT, KP), dtype=tl.int32)
        counts = tl.zeros((BE,), dtype=tl.int32)
        for i in tl.static_range(K):
            v = tl.max(x, axis=1)
            # lowest column holding the max (ties resolved like a stable argmax)
            idx = tl.min(tl.where(x == v[:, None], cols[None, :], BE), axis=1)
            sel = cols[None, :] == idx[:, None]
            vals = tl.where(kc[None, :] == i, v[:, None], vals)
            idxs = tl.where(kc[None, :] == i, idx[:, None], idxs)
            if COUNTS:
                counts += tl.sum((sel & r_ok[:, None]).to(tl.int32), axis=0)
            x = tl.where(sel, float("-inf"), x)

        # vals[:, 0] is the row max: the softmax denominator cancels in the renormalisation.
        vmax = tl.max(tl.where(kc[None, :] < K, vals, float("-inf")), axis=1)
        p = tl.where(kc[None, :] < K, tl.exp(vals - vmax[:, None]), 0.0)
        w = p / tl.sum(p, axis=1)[:, None]
        out_off = rows64[:, None] * K + kc[None, :]
        o_mask = r_ok[:, None] & (kc[None, :] < K)
        tl.store(w_ptr + out_off, w, mask=o_mask)
        tl.store(i_ptr + out_off, idxs.to(tl.int64), mask=o_mask)
        if COUNTS:
            tl.atomic_add(c_ptr + cols, counts, mask=c_ok)


def _block_t(e_pad: int) -> int:
    """Rows per program: about 4096 logits in registers."""
    return max(1, min(128, 4096 // e_pad))


def topk_router_triton(logits: torch.Tensor, bias: torch.Tensor, k: int, return_counts: bool = False):
    check_args(logits, bias, k)
    if not kernel_supports(logits, k):
        raise ValueError(f"logits: kernel takes E <= {MAX_E} and k <= {MAX_K}, got E={logits.shape[1]}, k={k}")
    t, e = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    w = torch.empty((t, k), dtype=torch.float32, device=logits.device)
    idx = torch.empty((t, k), dtype=torch.int64, device=logits.device)
    counts = torch.zeros(e if return_counts else 1, dtype=torch.int32, device=logits.device)
    if t:
        be = triton.next_power_of_2(e)
        bt = _block_t(be)
        _topk_router_kernel[(triton.cdiv(t, bt),)](
            logits, bias, w, idx, counts, t, e, logits.stride(0),
            K=k, KP=triton.next_power_of_2(k), BT=bt, BE=be, COUNTS=return_counts,
            num_warps=4 if be * bt <= 4096 else 8)
    return (w, idx, counts) if return_counts else (w, idx)
