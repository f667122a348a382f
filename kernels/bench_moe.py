"""The MoE decode bench (`python -m ttha.kernels.bench --only moe`): one layer's decode step, routing deciding what
the GPU reads.

One MoE layer of 8 experts of up [14336 x 4096] and down [4096 x 14336] projections, mixed i % 3 as bf16 / int4 /
int2 (groups of 64), a step of 16 tokens x top-2: the router (with the route plan) and the grouped kernels
(moe_decode), captured in a CUDA graph, for routing patterns that reach all experts, only the int4 and int2 ones,
only the int2 ones, and one expert of each precision (top-1). Beside each, the same step as per-expert calls
(the router, then for each expert the pattern reaches: F.linear or dequant_linear for both projections, and an
index_add_ into the output), also captured, its experts fixed at capture as a host-side loop needs them. Rows:
GPU time per step from graph replay, the bytes the step really reads (the reached experts' weights, plus x, h,
both projections' fp32 partials and the output), their rate as a share of the copy bandwidth, and each
kernel's time in our step (torch.profiler).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .tuning import kernel_us_per_call, replay_us, timing_graph

D, FF, E, T, GROUP = 4096, 14336, 8, 16, 64
BITS = [(16, 4, 2)[i % 3] for i in range(E)]
_Q = [e for e in range(E) if BITS[e] != 16]  # the int4 and int2 experts
_Q2 = [e for e in range(E) if BITS[e] == 2]
PATTERNS = {  # name -> each token's experts, in order of preference
    "all 8": [(t % E, (t + E // 2) % E) for t in range(T)],
    "int4+int2": [(_Q[t % len(_Q)], _Q[(t + 1) % len(_Q)]) for t in range(T)],
    "int2 only": [tuple(_Q2)] * T,
    "1 bf16 (top-1)": [(BITS.index(16),)] * T,
    "1 int4 (top-1)": [(BITS.index(4),)] * T,
    "1 int2 (top-1)": [(BITS.index(2),)] * T,
}
ROTATE_BYTES = 256 << 20  # layer copies enough that a step's weights are not served from the 50-60 MB L2


def build_layer(device="cuda"):
    from . import GroupedExperts

    g = torch.Generator(device=device).manual_seed(0)
    rand = lambda n, k: torch.randn(n, k, device=device, generator=g) / k**0.5  # noqa: E731
    return GroupedExperts.from_weights([(rand(FF, D), rand(D, FF), b) for b in BITS], GROUP, torch.bfloat16)


def pattern_logits(pattern: list[tuple[int, ...]], device="cuda") -> torch.Tensor:
    """Logits whose top-k is the pattern: 20 - j at a token's j-th expert, 0 elsewhere."""
    logits = torch.zeros(len(pattern), E, device=device)
    for t, experts in enumerate(pattern):
        for j, e in enumerate(experts):
            logits[t, e] = 20.0 - j
    return logits


def per_expert_step(x, logits, bias, k: int, pattern, layer):
    """The step as per-expert calls: the experts and their tokens fixed on the host (from the pattern)."""
    from . import dequant_linear, topk_router

    lin = lambda a, w: F.linear(a, w) if isinstance(w, torch.Tensor) else dequant_linear(a, w)  # noqa: E731
    plan = {}
    for t, experts in enumerate(pattern):
        for j, e in enumerate(experts):
            plan.setdefault(e, []).append((t, t * k + j))
    idx = {e: tuple(torch.tensor(v, device=x.device).unbind(1)) for e, v in plan.items()}

    def step(lay):
        w, _ = topk_router(logits, bias, k)
        wf = w.reshape(-1, 1)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e, (tok, slot) in idx.items():
            y = lin(F.gelu(lin(x[tok], lay.weight(e, "up"))), lay.weight(e, "down"))
            out.index_add_(0, tok, y.float() * wf[slot])
        return out.to(x.dtype)
    return step


def run_moe(rows: list, copy_gbs: float, quick: bool) -> None:
    from . import _moe_kernels as mk
    from . import moe_decode, moe_decode_ref, topk_router

    base = build_layer()
    layers = [base]
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    bias = torch.zeros(E, device="cuda")
    for name, pattern in (list(PATTERNS.items())[:3] if quick else PATTERNS.items()):
        k = len(pattern[0])
        logits = pattern_logits(pattern)
        reached = sorted({e for experts in pattern for e in experts})
        weight_bytes = sum(base.expert_bytes(e) for e in reached)
        copies = max(1, min(8, -(-ROTATE_BYTES // weight_bytes)))
        while len(layers) < copies:
            layers.append(base.clone())

        def ours(lay):
            w, _, plan = topk_router(logits, bias, k, return_plan=True)
            return moe_decode(x, w, plan, lay)
        w, _, plan = topk_router(logits, bias, k, return_plan=True)
        ref = moe_decode_ref(x, w, plan, base)
        relerr = float((ours(base).float() - ref.float()).norm() / ref.float().norm())  # also tunes the kernels
        split = int(mk._moe_down_tuned.best_config.kwargs["SPLIT_K"])
        up_split = int(mk._moe_up_tuned.best_config.kwargs["SPLIT_K"])
        s = T * k
        # x and out, h, the fp32 partials of both projections (written and read)
        io = 2 * T * D * 2 + 2 * s * FF * 2 + 2 * split * s * D * 4 + (2 * up_split * s * FF * 4) * (up_split > 1)
        graph, calls = timing_graph(ours, layers[:copies])
        us = replay_us(graph, calls)
        parts = kernel_us_per_call(graph, calls)
        del graph
        theirs = per_expert_step(x, logits, bias, k, pattern, base)
        graph, calls = timing_graph(theirs, layers[:copies])
        torch_us = replay_us(graph, calls)
        del graph
        gbps = (weight_bytes + io) / (us * 1e-6) / 1e9
        rows.append(dict(table="moe", kernel="grouped_moe", pattern=name, T=T, E=len(reached), k=k,
                         bits=[BITS[e] for e in reached], bytes=weight_bytes + io, graph_us=us, torch_graph_us=torch_us,
                         graph_ratio=torch_us / us, GBps=gbps, bw_share=gbps / copy_gbs,
                         torch_bw_share=(weight_bytes + io) / (torch_us * 1e-6) / 1e9 / copy_gbs, relerr=relerr,
                         kernels=parts))
    del layers, base
    torch.cuda.empty_cache()


def fmt_moe(rows: list) -> list[str]:
    mo = [r for r in rows if r.get("table") == "moe"]
    if not mo:
        return []
    out = [f"\nMoE decode step, {T} tokens, 8 experts of {FF}x{D} mixed bf16/int4/int2 (GPU us a step, from graphs)",
           f"{'pattern':>16} {'experts':>7} {'k':>2} {'MB read':>8} {'ours us':>8} {'%copy':>6} {'per-expert us':>13} "
           f"{'%copy':>6} {'ratio':>6} {'relerr':>8}  kernels"]
    for r in mo:
        parts = ", ".join(f"{name[:24]} {us:.1f}" for name, us in r["kernels"].items())
        out.append(f"{r['pattern']:>16} {r['E']:>7} {r['k']:>2} {r['bytes'] / 1e6:8.1f} {r['graph_us']:8.1f} "
                   f"{100 * r['bw_share']:5.1f}% {r['torch_graph_us']:13.1f} {100 * r['torch_bw_share']:5.1f}% "
                   f"{r['graph_ratio']:6.2f} {r['relerr']:8.1e}  {parts}")
    return out
