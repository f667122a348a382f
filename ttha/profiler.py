"""Profile operations into a measured cost model (the library behind profile_kernels.py).

Operation templates (the seeds' OPERATION_TEMPLATES): an op name -> a builder that, given a batch size
in tokens, returns a zero-argument callable running one call of the op. Names are the ones
KernelCostModel users look up (ttha.costs.expert_op, the TTT policy): expert_16bit / expert_fp8 /
expert_int4 / expert_int2 (the path a run takes: Triton on CUDA), router_topk, ttha_adapter_forward,
ttha_update, ttt_light, ttt_full; where the run's path is a Triton kernel the torch reference is
profiled too, as <op>_torch.

Per op and batch size:
  latency  median of `repeats` calls after `warmup` calls: CUDA events on a GPU, perf_counter on a CPU.
  energy   NVML total-energy counter (mJ) over >= energy.window_s of back-to-back calls. The counter
           refreshes every ~100 ms, so the window starts and ends on a counter update (the GPU kept busy
           meanwhile); gross = J per call, net = gross - idle_w x time per call, idle_w measured in the
           same run with the GPU idle. energy_j (what the router reads) = net, as in the shipped
           estimates. On a CPU: energy null.
Output: schema 1 of ttha.costs plus energy_j_gross / energy_j_net / power_w per op and the run's
metadata (idle_w, gpu, driver, versions, timestamp). torch.profiler traces can be saved
(`save_trace`) and parsed back into the same schema (`parse_trace`, latency only).
"""
from __future__ import annotations

import datetime
import itertools
import json
import logging
import math
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ttha import costs
from ttha.config import ConfigError
from ttha.paths import launch_dir
from ttha.quant import dequantize

log = logging.getLogger(__name__)

PROFILE_VERSION = 1
SIZES = ("auto", "full", "tiny")
MIN_WINDOW_S = 0.5  # NVML energy refreshes every ~100 ms: shorter windows are mostly quantisation error
TRACE_LABEL = "{op}@{batch}"  # record_function label of one call in a torch.profiler trace

Fn = Callable[[], Any]


@dataclass
class OpTemplate:
    name: str
    group: str  # expert | router | ttha | ttt
    path: str  # triton | torch | host: which implementation runs
    build: Callable[[int], Fn]  # batch size in tokens -> one call of the op


# ---------------------------------------------------------------------------------------------------
# Experts: the model's own classes (ttha.model), so each op runs the path a run takes.
def _kernels():
    try:
        from ttha import kernels

        return kernels if hasattr(kernels, "dequant_linear") and hasattr(kernels, "use_triton") else None
    except ImportError:  # pragma: no cover - kernels/ is part of the package
        return None


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


# ---------------------------------------------------------------------------------------------------
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
        from ttha.model import SimpleExpert

        with torch.device(self.device):  # initialised on the device: fast for 4096 x 14336 weights
            return SimpleExpert(self.shape["d_model"], self.shape["d_ff"])

    def triton_on(self) -> bool:
        k = _kernels()
        return k is not None and k.use_triton(self.device)


def _expert_templates(ctx: Context) -> list[OpTemplate]:
    from ttha.model import make_expert

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
        if quant_kernel:  # the torch reference on the same weights, for the side-by-side ratio
            out.append(OpTemplate(f"{costs.expert_op(bits)}_torch", "expert", "torch",
                                  builder(lambda b=bits: [_TorchRefExpert(m) for m in experts(b)])))
    return out


def _router_templates(ctx: Context) -> list[OpTemplate]:
    from ttha.routing import topk_route

    d, e, k = ctx.shape["d_model"], ctx.shape["n_experts"], ctx.shape["top_k"]
    gate = torch.randn(e, d, device=ctx.device, dtype=ctx.dtype) * d ** -0.5
    bias = torch.zeros(e, device=ctx.device)
    kern = _kernels()
    triton = ctx.triton_on() and hasattr(kern, "topk_router")

    def build(fused: bool):
        def make(t):
            x = ctx.tokens(t, d)
            if fused:
                return lambda: kern.topk_router(F.linear(x, gate).float(), bias, k)
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


def _adaptive_router(ctx: Context):
    """The run's TTHA router (adapter on the CPU, bias on the device), as experiment.py builds it."""
    from ttha.routing import AdaptiveRouter

    mc = _ttt_model_cfg(ctx)
    e, k = int(mc["n_experts"]), int(mc["top_k"])
    bits = [int(ctx.shape["ttt_expert_bits"][i % len(ctx.shape["ttt_expert_bits"])]) for i in range(e)]
    return AdaptiveRouter(e, k, bits, ctx.cached("cost_model", costs.KernelCostModel.load), {"name": "ttha"}, {},
                          {"power_w": 350.0, "temp_c": 80.0, "latency_ms": 100.0}, ctx.device)


def _strained_sample():
    """A reading over every target, so the update's gradient is non-zero (the work it does in a run)."""
    from ttha.telemetry import TelemetrySample

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
    from ttha.model import MoELM, quantize_experts
    from ttha.pretrain import model_dtype
    from ttha.ttt import TestTimeTrainer

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
    """All ops this machine can run, by name (the seeds' OPERATION_TEMPLATES)."""
    ops = (_expert_templates(ctx) + _router_templates(ctx) + _ttha_templates(ctx) + _ttt_templates(ctx))
    return {op.name: op for op in ops}


# ---------------------------------------------------------------------------------------------------
# Measurement
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def latency_ms(fn: Fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median latency of one call: CUDA events around each call on a GPU, perf_counter on a CPU."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))


class EnergyMeter:
    """The NVML total-energy counter of the GPU `device` is (matched by PCI bus id when torch says it)."""

    def __init__(self, device: torch.device):
        import pynvml

        pynvml.nvmlInit()
        self.nvml = pynvml
        index = device.index if device.index is not None else torch.cuda.current_device()
        bus = getattr(torch.cuda.get_device_properties(index), "pci_bus_id", None)
        try:
            self.handle = (pynvml.nvmlDeviceGetHandleByPciBusId(bus) if isinstance(bus, str)
                           else pynvml.nvmlDeviceGetHandleByIndex(index))
        except pynvml.NVMLError:
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)

    def read_j(self) -> float:
        return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1e3  # mJ -> J

    def driver(self) -> str:
        v = self.nvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except Exception:  # already shut down
            pass


def counter_window(run_batch: Callable[[], Any], wait: Callable[[Any], None], read_j: Callable[[], float],
                   seconds: float, clock: Callable[[], float] = time.perf_counter) -> tuple[float, float, int]:
    """(joules, seconds, batches completed) over >= `seconds` of back-to-back batches, from one update of
    the energy counter to another (it refreshes every ~100 ms: aligning both ends removes most of its
    quantisation). The next batch is queued before waiting for the previous one, so reading the counter
    (~4 ms) never leaves the GPU idle."""
    pending = run_batch()
    first = read_j()
    while True:  # start on a counter update
        nxt = run_batch()
        wait(pending)
        pending = nxt
        e0 = read_j()
        if e0 != first:
            break
    t0, batches = clock(), 0
    while True:
        nxt = run_batch()
        wait(pending)
        pending = nxt
        batches += 1
        if clock() - t0 < seconds:
            continue
        e1 = read_j()
        if e1 != e0 and clock() - t0 >= seconds:  # end on an update too
            t1 = clock()
            wait(pending)
            return e1 - e0, t1 - t0, batches


def idle_power_w(meter: EnergyMeter, seconds: float, device: torch.device) -> float:
    _sync(device)
    joules, dt, _ = counter_window(lambda: time.sleep(0.01), lambda _: None, meter.read_j, seconds)
    return joules / dt


def energy_per_call(fn: Fn, meter: EnergyMeter, device: torch.device, seconds: float, call_ms: float,
                    idle_w: float) -> dict[str, float]:
    """Gross and net J per call over a window of >= `seconds`; batches of ~15 ms of calls."""
    n = max(1, min(100_000, math.ceil(15.0 / max(call_ms, 1e-4))))

    def run_batch():
        for _ in range(n):
            fn()
        if device.type != "cuda":
            return None
        ev = torch.cuda.Event()
        ev.record()
        return ev

    joules, dt, batches = counter_window(run_batch, lambda ev: ev is not None and ev.synchronize(), meter.read_j,
                                         seconds)
    calls = batches * n
    gross = joules / calls
    return {"gross": gross, "net": max(0.0, gross - idle_w * dt / calls), "power_w": joules / dt,
            "window_s": dt, "calls": calls, "call_ms": 1e3 * dt / calls}


# ---------------------------------------------------------------------------------------------------
# Configuration
def _get(cfg: Any, key: str, default=None):
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def resolve_device(name: str) -> torch.device:
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", name, "CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError("device", name, "not a torch device (auto | cpu | cuda | cuda:N)") from None


def check_batch_sizes(value: Any) -> list[int]:
    sizes = list(value) if isinstance(value, (list, tuple)) or hasattr(value, "__len__") else None
    if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
        raise ConfigError("batch_sizes", value, "expected a non-empty list of integers >= 1")
    if any(b2 <= b1 for b1, b2 in zip(sizes, sizes[1:])):
        raise ConfigError("batch_sizes", value, "must be strictly increasing")
    return [int(b) for b in sizes]


def resolve_size(cfg: Any, device: torch.device) -> tuple[str, dict]:
    size = str(_get(cfg, "size", "auto"))
    if size not in SIZES:
        raise ConfigError("size", size, f"must be one of {', '.join(SIZES)}")
    if size == "auto":
        size = "full" if device.type == "cuda" else "tiny"
    shape = _get(cfg, "sizes", {}).get(size)
    if shape is None:
        raise ConfigError(f"sizes.{size}", None, "missing")
    shape = dict(_plain(shape))
    for key in ("d_model", "d_ff", "n_experts", "top_k", "ttt_seq_len"):
        if not isinstance(shape.get(key), int) or shape[key] < 1:
            raise ConfigError(f"sizes.{size}.{key}", shape.get(key), "expected an integer >= 1")
    return size, shape


def _dtype(device: torch.device) -> torch.dtype:
    """The model's 16-bit dtype on a GPU (bf16); fp32 on a CPU, as the model's dtype=auto."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def versions() -> dict[str, str | None]:
    try:
        import triton

        triton_v = triton.__version__
    except Exception:
        triton_v = None
    return {"torch": torch.__version__, "triton": triton_v, "cuda": torch.version.cuda,
            "python": platform.python_version()}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine() or 'unknown'}"


# ---------------------------------------------------------------------------------------------------
def profile(templates: dict[str, OpTemplate], batch_sizes: list[int], device: torch.device, *, warmup: int,
            repeats: int, energy_window_s: float | None, idle_s: float = 2.0,
            progress: bool = True) -> dict:
    """Measure every template at every batch size; returns the cost-model dict (schema 1 + extras).
    energy_window_s None = latency only (energy null)."""
    from tqdm import tqdm

    t_start = time.perf_counter()
    meter = EnergyMeter(device) if energy_window_s is not None else None
    gpu = device_name(device)
    meta: dict[str, Any] = {"driver": meter.driver() if meter else None, "idle_w": None, "idle_w_end": None}
    try:
        if meter is not None:
            meta["idle_w"] = idle_power_w(meter, idle_s, device)
            log.info("idle power %.1f W", meta["idle_w"])
        ops: dict[str, dict] = {}
        bar = tqdm(templates.values(), desc="profiling", unit="op", disable=not progress)
        for op in bar:
            bar.set_postfix_str(op.name, refresh=False)
            t_op = time.perf_counter()
            lat, gross, net, power, window_ms = [], [], [], [], []
            for b in batch_sizes:
                fn = op.build(b)
                lat.append(latency_ms(fn, device, warmup, repeats))
                if meter is not None:
                    e = energy_per_call(fn, meter, device, energy_window_s, lat[-1], meta["idle_w"])
                    gross.append(e["gross"])
                    net.append(e["net"])
                    power.append(e["power_w"])
                    window_ms.append(e["call_ms"])
                del fn
            ops[op.name] = {"batch_sizes": list(batch_sizes), "latency_ms": lat,
                            "energy_j": net if meter else None, "energy_j_gross": gross if meter else None,
                            "energy_j_net": net if meter else None, "power_w": power if meter else None,
                            "window_call_ms": window_ms if meter else None,
                            "group": op.group, "path": op.path, "seconds": time.perf_counter() - t_op}
        if meter is not None:
            meta["idle_w_end"] = idle_power_w(meter, idle_s, device)
    finally:
        if meter is not None:
            meter.close()
    return {
        "schema_version": costs.SCHEMA_VERSION, "gpu": gpu, "estimated": False,
        "source": "profile_kernels.py (ttha.profiler)",
        "note": ("latency_ms: median of CUDA-event-timed calls (perf_counter on a CPU); energy_j: NVML "
                 "energy counter over >= window_s of back-to-back calls, J per call net of idle_w "
                 "(energy_j_gross includes it; power_w = mean power and window_call_ms = time per call in "
                 "that window); null when profiled on a CPU"),
        "profile_version": PROFILE_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device), **meta, **versions(),
        "method": {"latency": "cuda_events" if device.type == "cuda" else "perf_counter", "warmup": warmup,
                   "repeats": repeats, "energy_window_s": energy_window_s, "idle_s": idle_s},
        "profile_seconds": time.perf_counter() - t_start,
        "ops": ops,
    }


# ---------------------------------------------------------------------------------------------------
# torch.profiler traces
def save_trace(templates: dict[str, OpTemplate], batch_sizes: list[int], device: torch.device, path: str | Path,
               repeats: int = 5, warmup: int = 2) -> Path:
    """Run each op `repeats` times per batch size under torch.profiler, each call labelled op@batch,
    and export a Chrome trace to `path`."""
    from torch.profiler import ProfilerActivity, record_function

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    calls = []
    for op in templates.values():
        for b in batch_sizes:
            fn = op.build(b)
            for _ in range(warmup):
                fn()
            calls.append((TRACE_LABEL.format(op=op.name, batch=b), fn))
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _, fn in calls:  # unlabelled: the profiler's own start-up cost lands on these calls
            fn()
        _sync(device)
        for label, fn in calls:
            for _ in range(repeats):
                with record_function(label):  # the CPU span = wall time of one call, launch to done
                    fn()
                    _sync(device)
    prof.export_chrome_trace(str(path))
    return path


def parse_trace(path: str | Path, gpu: str | None = None, shape: dict | None = None) -> dict:
    """A cost model (schema 1, energy null) from a trace `save_trace` wrote: per op@batch label the
    median wall time of one call (the CPU span of the label, which waits for the GPU); gpu_span_ms = the
    median GPU-side span (first kernel to last) where the trace has one. Host-side ops (the TTHA update)
    have a short GPU span and a long wall time: the wall time is what a run waits for."""
    path = Path(path)
    try:
        events = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"trace={str(path)!r}: not a readable Chrome trace ({err})") from None
    events = events.get("traceEvents", []) if isinstance(events, dict) else events
    spans: dict[tuple[str, int], dict[str, list[float]]] = {}
    for ev in events:
        name, cat = ev.get("name", ""), ev.get("cat", "")
        if ev.get("ph") != "X" or "@" not in name or cat not in ("user_annotation", "gpu_user_annotation"):
            continue
        op, _, batch = name.rpartition("@")
        if not batch.isdigit():
            continue
        spans.setdefault((op, int(batch)), {}).setdefault(cat, []).append(float(ev.get("dur", 0.0)) / 1e3)
    if not spans:
        raise ValueError(f"trace={str(path)!r}: no op@batch annotations (was it written by save_trace?)")
    ops: dict[str, dict] = {}
    for (op, batch), by_cat in sorted(spans.items()):
        if "user_annotation" not in by_cat:
            continue
        entry = ops.setdefault(op, {"batch_sizes": [], "latency_ms": [], "energy_j": None, "gpu_span_ms": []})
        entry["batch_sizes"].append(batch)
        entry["latency_ms"].append(float(statistics.median(by_cat["user_annotation"])))
        gpu = by_cat.get("gpu_user_annotation")
        entry["gpu_span_ms"].append(float(statistics.median(gpu)) if gpu else None)
    return {"schema_version": costs.SCHEMA_VERSION, "gpu": gpu or "unknown", "estimated": False,
            "source": f"torch.profiler trace {path.name} (ttha.profiler.parse_trace)",
            "note": "latency_ms: median span of each op@batch annotation; no energy in a trace",
            "profile_version": PROFILE_VERSION, "shape": dict(shape or {}), "ops": ops}


# ---------------------------------------------------------------------------------------------------
def plot(data: dict, path: str | Path) -> Path:
    """Latency and energy per token vs batch size per expert op, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    experts = {k: v for k, v in data["ops"].items() if k.startswith("expert_")}
    for name, entry in sorted(experts.items()):
        b = entry["batch_sizes"]
        style = "--" if name.endswith("_torch") else "-"
        axes[0].plot(b, [1e3 * v / t for v, t in zip(entry["latency_ms"], b)], style, marker="o", label=name)
        if entry.get("energy_j") is not None:
            axes[1].plot(b, [1e3 * v / t for v, t in zip(entry["energy_j"], b)], style, marker="o", label=name)
    axes[0].set(title="latency per token", xlabel="batch (tokens)", ylabel="µs / token", xscale="log",
                yscale="log")
    if any(e.get("energy_j") is not None for e in experts.values()):
        axes[1].set(title=f"energy per token (net of idle {data.get('idle_w') or 0:.0f} W)",
                    xlabel="batch (tokens)", ylabel="mJ / token", xscale="log", yscale="log")
        axes[1].legend(fontsize=8)
    else:
        axes[1].text(0.5, 0.5, "no energy counter (profiled on a CPU)", ha="center", va="center")
        axes[1].set_axis_off()
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{data['gpu']} — d_model={data['shape'].get('d_model')}, d_ff={data['shape'].get('d_ff')}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table(data: dict) -> str:
    """Text table: per op and batch, latency (ms, us/token) and net energy (J, mJ/token)."""
    lines = [f"{data['gpu']}  idle {data['idle_w']:.1f} W" if data.get("idle_w") is not None else data["gpu"],
             f"{'op':<24}{'batch':>7}{'lat ms':>11}{'us/tok':>10}{'E net J':>11}{'mJ/tok':>10}{'E gross J':>11}"]
    for op, e in data["ops"].items():
        for i, b in enumerate(e["batch_sizes"]):
            lat = e["latency_ms"][i]
            row = f"{op:<24}{b:>7}{lat:>11.4f}{1e3 * lat / b:>10.3f}"
            if e.get("energy_j") is not None:
                gross = (e.get("energy_j_gross") or e["energy_j"])[i]
                row += f"{e['energy_j'][i]:>11.5f}{1e3 * e['energy_j'][i] / b:>10.4f}{gross:>11.5f}"
            lines.append(row)
    return "\n".join(lines)


def summary_metrics(data: dict) -> dict[str, float]:
    """Flat metrics for MLflow: latency/<op>/b<batch> (ms), energy/<op>/b<batch> (J, net)."""
    out = {"profile/seconds": float(data["profile_seconds"])}
    if data.get("idle_w") is not None:
        out["profile/idle_w"] = float(data["idle_w"])
    for op, entry in data["ops"].items():
        for i, b in enumerate(entry["batch_sizes"]):
            out[f"latency_ms/{op}/b{b}"] = float(entry["latency_ms"][i])
            if entry.get("energy_j") is not None:
                out[f"energy_j/{op}/b{b}"] = float(entry["energy_j"][i])
    return out


def _plain(node: Any) -> Any:
    """An omegaconf node (or anything) as plain JSON-able Python."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(node):
            return OmegaConf.to_container(node, resolve=True)
    except ImportError:
        pass
    return node


def _ttt_model(cfg: Any, shape: dict) -> Any:
    """The model config the TTT ops build: shape.ttt_model names one of cfg.models (conf/model/*.yaml,
    composed by the defaults list), or is a model config itself; null = no TTT ops."""
    from omegaconf import OmegaConf

    choice = shape.get("ttt_model")
    if choice is None:
        return None
    if not hasattr(choice, "keys"):
        models = _get(cfg, "models", {})
        if str(choice) not in models:
            raise ConfigError("ttt_model", choice, f"must be one of {', '.join(models) or '(no models composed)'}")
        choice = models[str(choice)]
    return OmegaConf.create(_plain(choice))  # MoELM reads attributes


def load_base(value: Any, device: torch.device) -> "costs.KernelCostModel | None":
    """The `base` cost model (checked before any profiling), or None."""
    if not value:
        return None
    path = Path(str(value)).expanduser()
    try:
        base = costs.KernelCostModel.from_file(path if path.is_absolute() else launch_dir() / path, "base")
    except ValueError as err:
        raise ConfigError("base", str(value), str(err)) from None
    if base.gpu != device_name(device):
        raise ConfigError("base", str(value), f"measured on {base.gpu}, this run profiles {device_name(device)}")
    return base


def carry_over(data: dict, base: "costs.KernelCostModel") -> list[str]:
    """Copy into `data` the ops of `base` that `data` lacks; record which, and from where."""
    carried = [op for op in base.ops if op not in data["ops"]]
    for op in carried:
        data["ops"][op] = base.data["ops"][op]
    data["carried_over"] = {"from": base.source, "created": base.data.get("created"), "ops": carried}
    return carried


def run(cfg: Any) -> tuple[Path, dict]:
    """Profile per the config (conf/profile.yaml); write the JSON, log the MLflow run; (path, data)."""
    from ttha.routing import limit_host_threads

    device = resolve_device(_get(cfg, "device", "auto"))
    limit_host_threads(device)  # as in a run: the host-side ops (ttha_update) are timed as served
    batch_sizes = check_batch_sizes(_get(cfg, "batch_sizes"))
    warmup, repeats = int(_get(cfg, "warmup", 10)), int(_get(cfg, "repeats", 50))
    if warmup < 0:
        raise ConfigError("warmup", warmup, "must be >= 0")
    if repeats < 1:
        raise ConfigError("repeats", repeats, "must be >= 1")
    size, shape = resolve_size(cfg, device)
    energy_cfg = _get(cfg, "energy", {})
    energy_mode = str(_get(energy_cfg, "enabled", "auto"))
    if energy_mode not in ("auto", "true", "false", "True", "False"):
        raise ConfigError("energy.enabled", energy_mode, "must be auto, true or false")
    use_energy = device.type == "cuda" and energy_mode.lower() != "false"
    if energy_mode.lower() == "true" and device.type != "cuda":
        raise ConfigError("energy.enabled", energy_mode, "needs a CUDA device (NVML energy counter)")
    window = float(_get(energy_cfg, "window_s", 1.0))
    if window < MIN_WINDOW_S:
        raise ConfigError("energy.window_s", window, f"must be >= {MIN_WINDOW_S} (NVML refreshes every 100 ms)")
    kernels_choice = str(_get(cfg, "kernels", "auto"))
    k = _kernels()
    if k is not None:
        try:
            k.set_backend(kernels_choice)
        except ValueError as err:
            raise ConfigError("kernels", kernels_choice, str(err)) from None

    base = load_base(_get(cfg, "base"), device)
    torch.manual_seed(int(_get(cfg, "seed", 0)))
    ttt_model = _ttt_model(cfg, shape)
    ctx = Context(device, _dtype(device), shape, ttt_model, int(_get(cfg, "rotate_bytes", 256 << 20)))
    templates = operation_templates(ctx)
    wanted = _get(cfg, "ops", "all")
    if wanted != "all":
        unknown = [o for o in wanted if o not in templates]
        if unknown:
            raise ConfigError("ops", list(wanted), f"unknown {unknown}; known: {', '.join(templates)}")
        templates = {o: templates[o] for o in wanted}

    threads = torch.get_num_threads()
    if device.type == "cpu" and _get(cfg, "cpu_threads") is not None:
        torch.set_num_threads(int(cfg.cpu_threads))  # a busy shared CPU times erratically with spinning threads
    try:
        data = profile(templates, batch_sizes, device, warmup=warmup, repeats=repeats,
                       energy_window_s=window if use_energy else None,
                       idle_s=float(_get(energy_cfg, "idle_s", 2.0)), progress=bool(_get(cfg, "progress", True)))
    finally:
        torch.set_num_threads(threads)
    data["shape"] = {**shape, "size": size,
                     "ttt_model": _plain(ttt_model)}
    data["kernels_backend"] = kernels_choice
    if base is not None:
        carry_over(data, base)
    costs.KernelCostModel(data, "profile")  # schema check before anything is written

    launch = launch_dir()
    out = _get(cfg, "out")
    path = Path(out) if out else launch / "outputs" / "cost_models" / costs.gpu_file_name(data["gpu"])
    path = path if path.is_absolute() else launch / path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    log.info("cost model: %s (%d ops, %.1f s)", path, len(data["ops"]), data["profile_seconds"])
    artifacts = [path, plot(data, path.with_suffix(".png"))]

    trace_cfg = _get(cfg, "trace", {})
    if bool(_get(trace_cfg, "save", False)):
        trace = save_trace(templates, batch_sizes, device, path.with_name(path.stem + ".trace.json"),
                           int(_get(trace_cfg, "repeats", 5)))
        parsed = path.with_name(path.stem + ".from_trace.json")
        parsed.write_text(json.dumps(parse_trace(trace, data["gpu"], data["shape"]), indent=1) + "\n")
        artifacts += [parsed]
    _track(cfg, data, artifacts, launch)
    return path, data


def _track(cfg: Any, data: dict, artifacts: list[Path], launch: Path) -> None:
    tracking_cfg = _get(cfg, "tracking")
    if tracking_cfg is None or not bool(_get(tracking_cfg, "enabled", True)):
        return
    from ttha.config import flatten
    from ttha.tracking import tracker_from_config

    tracker = tracker_from_config(tracking_cfg, launch)
    tags = {"kind": "profile", "gpu": data["gpu"], "device": data["device"], "torch": data["torch"],
            "triton": data["triton"], "driver": data["driver"]}
    with tracker:
        tracker.start(_get(tracking_cfg, "run_name") or f"profile-{costs.gpu_file_name(data['gpu'])[:-5]}", tags)
        tracker.log_params(flatten(cfg) if hasattr(cfg, "_get_node") else {})
        tracker.log_summary(summary_metrics(data))
        tracker.log_artifacts(artifacts)
