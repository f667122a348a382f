"""Fused router top-k: softmax(logits + bias) in fp32, k largest, renormalised to sum 1; one launch.

Renormalising the k largest softmax probabilities cancels the softmax denominator, so the
kernel never needs it: weights = exp(l_sel - l_max) / sum(exp(l_sel - l_max)) over the k
selected logits (bias added). Each program owns BT rows held whole in registers (E <= 256),
picks the k maxima by k rounds of max + mask, and optionally adds per-expert counts of the
routed tokens (what the load balancer needs) with one atomic add per expert per program.

The route plan (return_plan) is what a grouped MoE kernel needs to read only the routed experts: per-expert
counts, their exclusive prefix sum (offsets [E + 1]) and the token slots (slot = t * k + j) grouped by expert,
in slot order within an expert. At decode sizes (plan_supported) one program holds every row and writes it in
the same launch, on the device: no host sync, so a CUDA graph captures it and a bias written in place between
replays changes the plan. Larger calls build it with torch ops from the indices (route_plan_ref), also on the
device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._backend import HAS_TRITON, triton, tl

MAX_E = 256  # kernel limits (the sizes); larger calls use the reference
MAX_K = 16
PLAN_ROWS_X_E = 8192  # the one-program plan: rows x experts (padded) held in registers, and times k (its
PLAN_WORK = 16384     # k gathers) within PLAN_WORK: sm_90 builds of larger plans spill registers


@dataclass
class RoutePlan:
    """Token slots grouped by expert, all int32 on the routing's device: counts [E] (slots per expert), offsets
    [E + 1] (exclusive prefix sum of counts: expert e's slots are order[offsets[e]:offsets[e + 1]]) and order
    [T * k] (slot t * k + j, ascending within an expert)."""
    counts: torch.Tensor
    offsets: torch.Tensor
    order: torch.Tensor


def route_plan_ref(indices: torch.Tensor, n_experts: int) -> RoutePlan:
    """The plan of indices [T, k] with torch ops on their device (index_add_, cumsum, stable argsort): no
    bincount, whose output size needs the host."""
    flat = indices.reshape(-1)
    counts = torch.zeros(n_experts, dtype=torch.int32, device=flat.device)
    counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offsets = torch.zeros(n_experts + 1, dtype=torch.int32, device=flat.device)
    offsets[1:] = torch.cumsum(counts, 0, dtype=torch.int32)
    order = torch.argsort(flat, stable=True).to(torch.int32)
    return RoutePlan(counts, offsets, order)


def topk_router_ref(logits: torch.Tensor, bias: torch.Tensor, k: int, return_counts: bool = False,
                    return_plan: bool = False):
    """Torch reference: softmax + add + topk + normalise (+ bincount) (+ route_plan_ref)."""
    probs = torch.softmax(logits.float() + bias.float(), dim=-1)
    w, idx = probs.topk(k, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    out = (w, idx)
    if return_counts:
        out += (torch.bincount(idx.flatten(), minlength=logits.shape[-1]).to(torch.int32),)
    if return_plan:
        out += (route_plan_ref(idx, logits.shape[-1]),)
    return out


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


def plan_supported(t: int, e: int, k: int) -> bool:
    """The kernel writes the plan itself (one program over all rows): decode sizes."""
    p2 = lambda v: 1 << max(0, v - 1).bit_length()  # noqa: E731 - triton.next_power_of_2 without triton
    return e <= MAX_E and k <= MAX_K and p2(t) * p2(e) <= PLAN_ROWS_X_E and p2(t) * p2(e) * p2(k) <= PLAN_WORK


if HAS_TRITON:

    @triton.jit
    def _topk_router_kernel(l_ptr, b_ptr, w_ptr, i_ptr, c_ptr, off_ptr, ord_ptr, T, E, stride_l,
                            K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr,
                            COUNTS: tl.constexpr, PLAN: tl.constexpr = False):
        """Top-k of BT rows a program; COUNTS: per-expert counts added atomically. PLAN (one program, BT >= T):
        counts stored, offsets and the slot order written too (_write_plan)."""
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
        chosen = tl.zeros((BT, BE), dtype=tl.int32)  # PLAN: 1 where a real row routes to an expert
        for i in tl.static_range(K):
            v = tl.max(x, axis=1)
            # lowest column holding the max (ties resolved like a stable argmax)
            idx = tl.min(tl.where(x == v[:, None], cols[None, :], BE), axis=1)
            sel = cols[None, :] == idx[:, None]
            vals = tl.where(kc[None, :] == i, v[:, None], vals)
            idxs = tl.where(kc[None, :] == i, idx[:, None], idxs)
            if PLAN:
                chosen += (sel & r_ok[:, None]).to(tl.int32)
            elif COUNTS:
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
        if PLAN:
            _write_plan(idxs, chosen, rows, r_ok, cols, c_ok, c_ptr, off_ptr, ord_ptr, E, K, KP)
        elif COUNTS:
            tl.atomic_add(c_ptr + cols, counts, mask=c_ok)

    @triton.jit
    def _write_plan(idxs, chosen, rows, r_ok, cols, c_ok, c_ptr, off_ptr, ord_ptr, E, K: tl.constexpr,
                    KP: tl.constexpr):
        """Counts, offsets (exclusive prefix sum) and the slots grouped by expert, from every row's top-k idxs
        [BT, KP] and chosen [BT, BE] (1 where a real row routes to an expert). A row's k experts are distinct, so
        slot (t, j) goes to offsets[e] + (rows before t that chose e, e = idxs[t, j]): an exclusive cumsum of
        chosen down the rows, read at each choice's expert. A stable counting sort, in registers of the size
        of the logits."""
        counts = tl.sum(chosen, axis=0)
        offsets = tl.cumsum(counts, axis=0) - counts
        pos = offsets[None, :] + tl.cumsum(chosen, axis=0) - chosen  # [BT, BE]
        kc = tl.arange(0, KP)
        for i in tl.static_range(K):
            e = tl.sum(tl.where(kc[None, :] == i, idxs, 0), axis=1)
            p = tl.sum(tl.where(cols[None, :] == e[:, None], pos, 0), axis=1)
            tl.store(ord_ptr + p, rows * K + i, mask=r_ok)
        tl.store(c_ptr + cols, counts, mask=c_ok)
        tl.store(off_ptr + cols, offsets, mask=c_ok)
        tl.store(off_ptr + E, tl.sum(counts, axis=0))


def _block_t(e_pad: int) -> int:
    """Rows per program: about 4096 logits in registers."""
    return max(1, min(128, 4096 // e_pad))


def topk_router_triton(logits: torch.Tensor, bias: torch.Tensor, k: int, return_counts: bool = False,
                       return_plan: bool = False):
    check_args(logits, bias, k)
    if not kernel_supports(logits, k):
        raise ValueError(f"logits: kernel takes E <= {MAX_E} and k <= {MAX_K}, got E={logits.shape[1]}, k={k}")
    t, e = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    dev = logits.device
    w = torch.empty((t, k), dtype=torch.float32, device=dev)
    idx = torch.empty((t, k), dtype=torch.int64, device=dev)
    in_kernel = return_plan and plan_supported(t, e, k)
    counts = torch.zeros(e if return_counts or in_kernel else 1, dtype=torch.int32, device=dev)
    offsets = torch.zeros(e + 1 if in_kernel else 1, dtype=torch.int32, device=dev)
    order = torch.empty(t * k if in_kernel else 1, dtype=torch.int32, device=dev)
    if t:
        be = triton.next_power_of_2(e)
        bt = triton.next_power_of_2(t) if in_kernel else _block_t(be)
        _topk_router_kernel[(triton.cdiv(t, bt),)](
            logits, bias, w, idx, counts, offsets, order, t, e, logits.stride(0),
            K=k, KP=triton.next_power_of_2(k), BT=bt, BE=be, COUNTS=return_counts, PLAN=in_kernel,
            num_warps=4 if be * bt <= 4096 else 8)
    out = (w, idx, counts) if return_counts else (w, idx)
    if return_plan:
        out += (RoutePlan(counts, offsets, order) if in_kernel else route_plan_ref(idx, e),)
    return out
