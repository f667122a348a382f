"""How one op is measured: latency per call, energy per call from the NVML counter, idle power.

  latency  median of `repeats` calls after `warmup` calls: CUDA events on a GPU, perf_counter on a CPU.
  energy   NVML total-energy counter (mJ) over >= a window of back-to-back calls. The counter refreshes
           every ~100 ms, so the window starts and ends on a counter update (the GPU kept busy
           meanwhile); gross = J per call, net = gross - idle_w x time per call, idle_w measured in the
           same run with the GPU idle. energy_j (what the router reads) = net, as in the shipped
           estimates. On a CPU: energy null.
`profile` measures every op at every batch size into the cost-model dict (the schema of ttha.costs plus
energy_j_gross / energy_j_net / power_w per op and the run's metadata: idle_w, gpu, driver, versions), and the
grouped decode op (decode.py) at every routed-token count into its decode section, with the same meter and idle.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import math
import platform
import statistics
import time
from typing import Any, Callable

import torch
from tqdm import tqdm

from ttha import costs
from ttha.profiler.decode import DecodeTemplate
from ttha.profiler.ops import Fn, OpTemplate

log = logging.getLogger(__name__)

PROFILE_VERSION = 1


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def host_threads(n: int | None):
    """torch's host threads set to `n` inside (None: unchanged), restored after."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def latency_ms(fn: Fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median latency of one call: CUDA events around each call on a GPU, perf_counter on a CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
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
        import pynvml  # only on a GPU: a CPU run never needs NVML

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
    (a slow NVML call) never leaves the GPU idle."""
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
    sync(device)
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


def versions() -> dict[str, str | None]:
    try:
        import triton

        triton_v = triton.__version__
    except Exception:  # no Triton on this platform
        triton_v = None
    return {"torch": torch.__version__, "triton": triton_v, "cuda": torch.version.cuda,
            "python": platform.python_version()}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine() or 'unknown'}"


def _measure_decode(op: DecodeTemplate, tokens: list[int], device: torch.device, warmup: int, repeats: int,
                    meter: EnergyMeter | None, window_s: float | None, idle_w: float | None) -> dict:
    """The decode op at every routed-token count: latency and energy per decode step (a call may run several:
    a CUDA graph of steps)."""
    lat, gross, net, power = [], [], [], []
    steps = 1
    for m in tokens:
        fn, steps = op.build(m)
        lat.append(latency_ms(fn, device, warmup, repeats) / steps)
        if meter is not None:
            e = energy_per_call(fn, meter, device, window_s, lat[-1] * steps, idle_w)
            gross.append(e["gross"] / steps)
            net.append(e["net"] / steps)
            power.append(e["power_w"])
        del fn
    return {"bits": op.bits, "tokens": list(tokens), "latency_ms": lat, "energy_j": net if meter else None,
            "energy_j_gross": gross if meter else None, "power_w": power if meter else None, "path": op.path,
            "steps_per_call": steps}


def profile(templates: dict[str, OpTemplate], batch_sizes: list[int], device: torch.device, *, warmup: int,
            repeats: int, energy_window_s: float | None, idle_s: float = 2.0, progress: bool = True,
            decode: dict[str, DecodeTemplate] | None = None, decode_tokens: list[int] | None = None) -> dict:
    """Measure every template at every batch size, and every decode template at every count in decode_tokens;
    returns the cost-model dict (schema + extras; its decode section without the shape, which the caller knows).
    energy_window_s None = latency only (energy null)."""
    t_start = time.perf_counter()
    meter = EnergyMeter(device) if energy_window_s is not None else None
    gpu = device_name(device)
    meta: dict[str, Any] = {"driver": meter.driver() if meter else None, "idle_w": None, "idle_w_end": None}
    try:
        if meter is not None:
            meta["idle_w"] = idle_power_w(meter, idle_s, device)
            log.info("idle power %.1f W", meta["idle_w"])
        ops: dict[str, dict] = {}
        decode_ops: dict[str, dict] = {}
        bar = tqdm([*templates.values(), *(decode or {}).values()], desc="profiling", unit="op",
                   disable=not progress)
        for op in bar:
            bar.set_postfix_str(op.name, refresh=False)
            if isinstance(op, DecodeTemplate):
                t_op = time.perf_counter()
                decode_ops[op.name] = _measure_decode(op, decode_tokens, device, warmup, repeats, meter,
                                                      energy_window_s, meta["idle_w"])
                decode_ops[op.name]["seconds"] = time.perf_counter() - t_op
                continue
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
    data = {
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
    if decode_ops:
        data["decode"] = {"ops": decode_ops}
    return data
