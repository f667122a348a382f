"""The grouped MoE decode op (ttha.kernels.moe_decode) per expert precision and routed-token count: the cost
model's decode section.

In decode an expert's weights are read once a step if it gets a token and not at all if it gets none, so what a
step costs is set by which experts are activated and at what precision. The op is measured as a run serves it:
one layer of n_experts experts mixed i % 3 as 16-bit / int4 / int2 (as `experts=mixed`) in one GroupedExperts, so
the kernels are the ones a mixed layer compiles. A step has M = decode_batch x top_k token slots (x [M, d_model],
one slot a token, so one expert can take all M); for precision p and count m the route plan gives m slots to one
expert of precision p and none to the others. m = 0 is the op with nothing routed, the launches every step pays;
the cost model reads an expert's cost as the difference (ttha.costs.KernelCostModel.decode_cost).

On CUDA with the Triton kernels each build is a CUDA graph of steps rotating over the experts of that precision
and over layer copies that span rotate_bytes (weights from HBM, not from L2, as in a decode loop), replayed back to
back; elsewhere (CPU, kernels=torch) the eager call, whose torch reference reads the plan on the host.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable

import torch

from ttha import costs, kernels
from ttha.kernels.moe import PRECISIONS, kernel_supports
from ttha.kernels.quant import quantize
from ttha.profiler.ops import Context, Fn

METHOD = ("one layer of n_experts experts mixed i % 3 as 16-bit / int4 / int2; a step of `slots` token slots, m "
          "of them routed to one expert of the op's precision, none to the others; latency_ms and energy_j (net of "
          "idle) per step of the whole grouped op, from CUDA graphs rotating over that precision's experts and "
          "layer copies (eager on a CPU); an expert's cost is the value at m less the value at 0")
MAX_COPIES = 16  # layer copies for the L2 rotation; bounds the memory of the rotation for small experts


@dataclass
class DecodeTemplate:
    name: str  # costs.decode_op(bits)
    bits: int
    path: str  # triton (CUDA graph) | torch (eager)
    build: Callable[[int], tuple[Fn, int]]  # routed tokens m -> (one call, decode steps that call runs)


def decode_shape(shape: dict, model: Any = None) -> dict:
    """The decode layer: the experts of `model` (a model config: the one served in decode), else of the size
    of conf/profile.yaml; decode_batch streams a step, the size's group_size."""
    dims = model if model is not None else shape
    n, k, batch = int(dims["n_experts"]), int(dims["top_k"]), int(shape["decode_batch"])
    return {"model": None if model is None else str(model.get("name")), "d_model": int(dims["d_model"]),
            "d_ff": int(dims["d_ff"]), "n_experts": n, "top_k": k, "batch": batch, "slots": batch * k,
            "group_size": int(shape.get("group_size", 64)), "bits": [PRECISIONS[i % len(PRECISIONS)] for i in range(n)]}


def _layer(ctx: Context, s: dict) -> kernels.GroupedExperts:
    """The mixed layer, random weights (a decode step's cost does not depend on their values)."""
    gen = torch.Generator(device=ctx.device).manual_seed(0)
    parts = []
    for bits in s["bits"]:  # one expert at a time: the fp32 weights of all of them need not fit at once
        w1, w2 = (torch.randn(n, k, device=ctx.device, generator=gen) / k ** 0.5
                  for n, k in ((s["d_ff"], s["d_model"]), (s["d_model"], s["d_ff"])))
        parts.append((w1.to(torch.bfloat16), w2.to(torch.bfloat16)) if bits == 16 else
                     (quantize(w1, bits, s["group_size"]), quantize(w2, bits, s["group_size"])))
    return kernels.GroupedExperts.from_parts(parts)


def one_expert_plan(n_experts: int, expert: int, m: int, slots: int, device: torch.device) -> kernels.RoutePlan:
    """A route plan giving slots 0..m-1 to `expert` and no slot to any other."""
    counts = torch.zeros(n_experts, dtype=torch.int32, device=device)
    counts[expert] = m
    offsets = torch.zeros(n_experts + 1, dtype=torch.int32, device=device)
    offsets[expert + 1:] = m
    return kernels.RoutePlan(counts, offsets, torch.arange(slots, dtype=torch.int32, device=device))


def _copies(ctx: Context, layer: kernels.GroupedExperts, experts: list[int]) -> int:
    """Layer copies whose experts of one precision span rotate_bytes (1 where rotate_bytes is 0: a CPU)."""
    nbytes = sum(layer.expert_bytes(e) for e in experts)
    return 1 if ctx.rotate_bytes <= 0 else max(1, min(MAX_COPIES, -(-ctx.rotate_bytes // max(1, nbytes))))


def decode_templates(ctx: Context, s: dict) -> list[DecodeTemplate]:
    """One template per precision of the grouped kernels (costs.DECODE_OPS), for the layer `s` (decode_shape)."""
    dev, slots, n = ctx.device, s["slots"], s["n_experts"]

    def layers(count: int) -> list[kernels.GroupedExperts]:
        have = ctx.cached("decode_layers", lambda: [_layer(ctx, s)])
        while len(have) < count:
            have.append(have[0].clone())
        return have[:count]

    def inputs():
        x = torch.randn(slots, s["d_model"], device=dev, dtype=torch.bfloat16)
        return x, torch.ones(slots, 1, device=dev)  # one slot a token: weight 1

    def builder(bits: int):
        def build(m: int) -> tuple[Fn, int]:
            x, w = ctx.cached("decode_inputs", inputs)
            experts = [e for e in range(n) if s["bits"][e] == bits]
            items = [(lay, one_expert_plan(n, e, m, slots, dev))
                     for lay in layers(_copies(ctx, layers(1)[0], experts)) for e in experts]

            @torch.no_grad()  # serving: no autograd graph
            def step(item):
                return kernels.moe_decode(x, w, item[1], item[0])

            if not _graphs(ctx, s):
                it = itertools.cycle(items)
                return (lambda: step(next(it))), 1
            from ttha.kernels.tuning import timing_graph  # CUDA only

            ctx.cached("decode_tuned", lambda: _tune(x, w, layers(1)[0], n, slots))
            graph, calls = timing_graph(step, items)
            return graph.replay, calls
        return build

    path = "triton" if _graphs(ctx, s) else "torch"
    return [DecodeTemplate(costs.decode_op(b), b, path, builder(b)) for b in PRECISIONS if b in s["bits"]]


def _graphs(ctx: Context, s: dict) -> bool:
    """CUDA graphs where the grouped kernels run (the torch reference reads the plan on the host): on CUDA, with
    Triton, for a layer the kernels take (kernels.moe.kernel_supports: tile and group constraints)."""
    layer = SimpleNamespace(group_size=s["group_size"], d_model=s["d_model"], d_ff=s["d_ff"],
                            quant=dict.fromkeys(b for b in set(s["bits"]) if b != 16))
    return ctx.device.type == "cuda" and ctx.triton_on() and kernel_supports(layer)


@torch.no_grad()
def _tune(x: torch.Tensor, w: torch.Tensor, layer: kernels.GroupedExperts, n: int, slots: int) -> bool:
    """One eager call with the slots spread over every expert, as a served step routes them: the kernels tune
    their tiles on the first call per shape, and a capture cannot tune (nor should an empty plan pick tiles)."""
    indices = torch.arange(slots, device=x.device).remainder(n).unsqueeze(1)
    kernels.moe_decode(x, w, kernels.route_plan_ref(indices, n), layer)
    torch.cuda.synchronize(x.device)
    return True
