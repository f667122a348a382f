"""Which operations the profiler measures and how each one is built and called.

An op template maps an op name to a builder that, given a batch size in tokens, returns a zero-argument
callable running one call of the op. Names are the ones KernelCostModel users look up (ttha.costs.expert_op,
the TTT policy): expert_16bit / expert_fp8 / expert_int4 / expert_int2 (the path a run takes: Triton on
CUDA), router_topk, ttha_adapter_forward, ttha_update, ttt_light, ttt_full. Where the run's path is a Triton
kernel the torch reference is profiled too, as <op>_torch, for the side-by-side ratio.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ttha import costs, kernels
from ttha.kernels.quant import dequantize
from ttha.model import MoELM, SimpleExpert, make_expert, quantize_experts
from ttha.pretrain import model_dtype
from ttha.routing import AdaptiveRouter, topk_route
from ttha.telemetry import TelemetrySample
from ttha.ttt import TestTimeTrainer

Fn = Callable[[], Any]


@dataclass
class OpTemplate:
    name: str
    group: str  # expert | router | ttha | ttt
    path: str  # triton | torch | host: which implementation runs
    build: Callable[[int], Fn]  # batch size in tokens -> one call of the op


def serving_dtype(device: torch.device) -> torch.dtype:
    """The model's 16-bit dtype on a GPU (bf16); fp32 on a CPU, as the model's dtype=auto."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class Context:
    """What the templates are built from: device, dtype, shapes, options (see conf/profile.yaml)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, shape: dict, ttt_model_cfg: Any,
                 rotate_bytes: int):
        self.device, self.dtype, self.shape = device, dtype, dict(shape)
        self.ttt_model_cfg = ttt_model_cfg
        self.rotate_bytes = int(rotate_bytes) if device.type == "cuda" else 0
        self._cache: dict[str, Any] = {}

    def cached(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def tokens(self, t: int, d: int) -> torch.Tensor:
        return torch.randn(t, d, device=self.device, dtype=self.dtype)

    def dense_expert(self) -> nn.Module:
        with torch.device(self.device):  # initialised on the device: fast for 4096 x 14336 weights
            return SimpleExpert(self.shape["d_model"], self.shape["d_ff"])

    def triton_on(self) -> bool:
        return kernels.use_triton(self.device)


# ---------------------------------------------------------------------------------------------------
# Experts: the model's own classes (ttha.model), so each op runs the path a run takes.
def _nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in itertools.chain(module.parameters(), module.buffers()))


class _TorchRefExpert(nn.Module):
    """The torch reference path of a QuantizedExpert (dequantize, then F.linear), whatever the backend."""

    def __init__(self, expert: nn.Module):
        super().__init__()
        self.expert = expert

    def _linear(self, x, name):
        return F.linear(x, dequantize(self.expert.qweight(name), x.dtype))

    def forward(self, x):
        return self._linear(F.gelu(self._linear(x, "w1")), "w2")


def _rotation(make: Callable[[], nn.Module], rotate_bytes: int) -> list[nn.Module]:
    """Enough copies of an expert that back-to-back calls read weights from HBM, not from the L2 cache
    (in a serving step consecutive calls go to different experts and layers)."""
    first = make()
    copies = 1 if rotate_bytes <= 0 else max(1, min(16, -(-rotate_bytes // max(1, _nbytes(first)))))
    return [first] + [make() for _ in range(copies - 1)]


def _cycling_call(modules: list[nn.Module], x: torch.Tensor) -> Fn:
    it = itertools.cycle(modules)

    @torch.no_grad()  # serving: no autograd graph
    def call():
        return next(it)(x)
    return call


def _expert_templates(ctx: Context) -> list[OpTemplate]:
    d = ctx.shape["d_model"]
    group = int(ctx.shape.get("group_size", 64))

    def experts(bits: int) -> list[nn.Module]:  # built once per type, shared by both paths
        def make():
            expert = make_expert(ctx.dense_expert(), bits, group)
            return expert.to(ctx.dtype) if bits == 16 else expert  # quantized: stored formats stay
        return ctx.cached(f"e{bits}", lambda: _rotation(make, ctx.rotate_bytes))

    def builder(get_modules):
        return lambda t: _cycling_call(get_modules(), ctx.tokens(t, d))

    triton = ctx.triton_on()
    out = []
    for bits in (16, 8, 4, 2):
        quant_kernel = bits in (2, 4) and triton
        out.append(OpTemplate(costs.expert_op(bits), "expert", "triton" if quant_kernel else "torch",
                              builder(lambda b=bits: experts(b))))
        if quant_kernel:  # the torch reference on the same weights
            out.append(OpTemplate(f"{costs.expert_op(bits)}_torch", "expert", "torch",
                                  builder(lambda b=bits: [_TorchRefExpert(m) for m in experts(b)])))
    return out


# ---------------------------------------------------------------------------------------------------
def _router_templates(ctx: Context) -> list[OpTemplate]:
    d, e, k = ctx.shape["d_model"], ctx.shape["n_experts"], ctx.shape["top_k"]
    gate = torch.randn(e, d, device=ctx.device, dtype=ctx.dtype) * d ** -0.5
    bias = torch.zeros(e, device=ctx.device)
    triton = ctx.triton_on()

    def build(fused: bool):
        def make(t):
            x = ctx.tokens(t, d)
            if fused:
                return lambda: kernels.topk_router(F.linear(x, gate).float(), bias, k)
            return lambda: topk_route(F.linear(x, gate).float(), bias, k)
        return make

    out = [OpTemplate("router_topk", "router", "triton" if triton else "torch", build(triton))]
    if triton:
        out.append(OpTemplate("router_topk_torch", "router", "torch", build(False)))
    return out


def _ttt_model_cfg(ctx: Context) -> Any:
    cfg = ctx.ttt_model_cfg
    return cfg if cfg is not None else {"n_layers": 2, "n_experts": ctx.shape["n_experts"],
                                        "top_k": ctx.shape["top_k"]}


def _adaptive_router(ctx: Context) -> AdaptiveRouter:
    """The run's TTHA router (adapter on the CPU, bias on the device), as experiment.py builds it."""
    mc = _ttt_model_cfg(ctx)
    e, k = int(mc["n_experts"]), int(mc["top_k"])
    bits = [int(ctx.shape["ttt_expert_bits"][i % len(ctx.shape["ttt_expert_bits"])]) for i in range(e)]
    return AdaptiveRouter(e, k, bits, ctx.cached("cost_model", costs.KernelCostModel.load), {"name": "ttha"}, {},
                          {"power_w": 350.0, "temp_c": 80.0, "latency_ms": 100.0}, ctx.device)


def _strained_sample() -> TelemetrySample:
    """A reading over every target, so the update's gradient is non-zero (the work it does in a run)."""
    return TelemetrySample(0.0, 500.0, 85.0, 90.0, 1980.0, 0.0)


def _ttha_templates(ctx: Context) -> list[OpTemplate]:
    sample = _strained_sample()

    def forward(t):
        router = _adaptive_router(ctx)
        return lambda: router.begin_step(sample, 20.0)

    def update(t):
        router = _adaptive_router(ctx)
        router.begin_step(sample, 20.0)
        layers = int(_ttt_model_cfg(ctx)["n_layers"])
        for layer in range(layers):  # the gate logits one serving forward of t tokens records
            router(torch.randn(t, router.n_experts, device=ctx.device), layer)
        return lambda: router.update_ttha(sample, 20.0, 3.0)

    return [OpTemplate("ttha_adapter_forward", "ttha", "host", forward),
            OpTemplate("ttha_update", "ttha", "host", update)]


def _ttt_templates(ctx: Context) -> list[OpTemplate]:
    """One TestTimeTrainer step on the run's model (random weights: the cost does not depend on them),
    in the serving dtype, experts quantized per ttt_expert_bits, routed by the TTHA router."""
    if ctx.ttt_model_cfg is None:
        return []
    mc = ctx.ttt_model_cfg
    seq = min(int(ctx.shape["ttt_seq_len"]), int(mc["max_seq_len"]))

    def trainer():
        with torch.device(ctx.device):
            model = MoELM(mc)
        model = model.to(dtype=model_dtype(str(mc.get("dtype", "auto")), ctx.device))
        quantize_experts(model, [int(b) for b in ctx.shape["ttt_expert_bits"]], int(ctx.shape.get("group_size", 64)))
        router = _adaptive_router(ctx)
        router.begin_step(_strained_sample(), 20.0)  # a bias on the device, as in a run's step
        model.set_router(router)
        return TestTimeTrainer(model, {"full_lr": 1e-4, "light_lr": 1e-3})

    def build(mode):
        def make(t):
            tr = ctx.cached("trainer", trainer)
            s = min(seq, t)  # t tokens as sequences of up to ttt_seq_len tokens
            batch = torch.randint(0, 256, (max(1, t // s), s + 1), device=ctx.device)
            return lambda: tr.step(batch, mode)
        return make

    return [OpTemplate("ttt_light", "ttt", "torch", build("light")),
            OpTemplate("ttt_full", "ttt", "torch", build("full"))]


def operation_templates(ctx: Context) -> dict[str, OpTemplate]:
    """All ops this machine can run, by name."""
    ops = _expert_templates(ctx) + _router_templates(ctx) + _ttha_templates(ctx) + _ttt_templates(ctx)
    return {op.name: op for op in ops}
