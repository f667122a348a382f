"""The simulated GPU, for machines without one: the work the run puts on it, the GPU telemetry reads, the
stress added to it.

- SimWork: what the run's work would draw on the GPU (cost model x busy time), as a share of idle..cap;
- SimGpu: the telemetry source. Power = idle + the run's work + simulated stress, capped (the clock drops
  over the cap); temperature follows a two-node thermal model fitted on a measured H100 trace (ThermalModel,
  fit_thermal); time is the wall clock x time_scale;
- SimStressor: stress as simulated power, on the SimGpu's clock.
"""
from __future__ import annotations

import itertools
import json
import math
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ttha.costs import expert_op
from ttha.gpu import LIVE, Stressor, TelemetrySample

DEFAULT_TRACE = Path(__file__).parent / "resources" / "h100_probe_trace_10hz.json"
IDLE_W, CAP_W = 78.0, 700.0  # the H100 trace's idle power and the H100's power cap
# NVML throttle-reason bits the simulator sets (same values as pynvml's constants).
THROTTLE_SW_POWER_CAP = 0x4
THROTTLE_SW_THERMAL = 0x20


# ----------------------------------------------------------------------------- the run's work

class SimWork:
    """What the run tells the simulated GPU: its power as a fraction of the idle..cap range.

    The CPU stands in for the GPU's time, the cost model for what the GPU would run in it:
    - serving busy time = the measured serving time (or a fixed sim.serve_s, for a simulation that does
      not depend on a busy CPU's timing) x (latency of the routed expert mix / latency of 16-bit experts,
      from the cost model). On a CPU a quantized expert computes with its dequantized
      weights, so the measured time does not depend on the mix and the cost model alone tells them apart;
    - TTT busy time = the measured TTT time;
    - power while busy = sim.busy_w (what 16-bit expert GEMVs draw on the H100 trace) x the mix's
      energy per second relative to 16-bit experts (memory-bound kernels draw about the same power);
    - a paced workload leaves the GPU idle for the rest of each arrival interval, a saturated one never.
    So cheaper experts lower the simulated power when the workload is paced; a saturated loop stays
    high whatever the mix, as on the H100."""

    def __init__(self, cost_model, bits: list[int], top_k: int, tokens: int, sim_cfg):
        per_expert = max(1, tokens * top_k // len(bits))  # typical tokens an expert sees per call
        ref = cost_model.get_cost(expert_op(16), per_expert)
        mix = [cost_model.get_cost(expert_op(b), per_expert) for b in bits]
        self.latency_rel = np.array([c.latency_ms / ref.latency_ms for c in mix])
        known = ref.energy_j is not None and all(c.energy_j is not None for c in mix)
        self.energy_rel = (np.array([c.energy_j / ref.energy_j for c in mix]) if known
                           else self.latency_rel.copy())  # no energy measured: same power as 16-bit
        g = lambda key, default: float(sim_cfg.get(key, default))  # noqa: E731
        idle, cap = g("idle_w", IDLE_W), g("cap_w", CAP_W)
        self.busy_rel = (g("busy_w", 550.0) - idle) / (cap - idle)
        fixed = sim_cfg.get("serve_s")
        self.fixed_serve_s = None if fixed is None else float(fixed)

    @property
    def n_experts(self) -> int:
        return len(self.latency_rel)

    def relative_power(self, usage: np.ndarray, serve_s: float, ttt_s: float, interval_s: float) -> float:
        """Mean relative power over one batch: busy serving + busy TTT, idle for the rest of the interval."""
        time_rel = max(float(usage @ self.latency_rel), 1e-9)
        serve_busy = (serve_s if self.fixed_serve_s is None else self.fixed_serve_s) * time_rel
        busy = serve_busy + ttt_s
        intensity = float(usage @ self.energy_rel) / time_rel
        return self.busy_rel * (serve_busy * intensity + ttt_s) / max(busy, interval_s, 1e-9)


# ----------------------------------------------------------------------------- traces and the thermal model

def load_trace(path: str | Path | None = None) -> dict[str, np.ndarray]:
    """A probe trace (list of {t, phase, p, T, e, u, clk}) as column arrays; None = the shipped one."""
    path = Path(path) if path is not None else DEFAULT_TRACE
    rows = json.loads(path.read_text())
    if not rows or not all(k in rows[0] for k in ("t", "p", "T", "e", "u", "clk")):
        raise ValueError(f"trace {path}: expected a list of records with t, p, T, e, u, clk")
    cols = {k: np.array([r[k] for r in rows], dtype=float) for k in ("t", "p", "T", "e", "u", "clk")}
    cols["t"] = cols["t"] - cols["t"][0]
    cols["phase"] = np.array([r.get("phase", "") for r in rows])
    return cols


class ThermalModel:
    """Two-node (Foster) RC model: T = ambient + sum_i r_i * (x_i - idle), x_i = power low-passed
    with time constant tau_i. A fast node (die, sub-second) and a slow one (package/heatsink)."""

    def __init__(self, ambient_c: float, idle_w: float, r_fast: float, tau_fast: float,
                 r_slow: float, tau_slow: float):
        self.ambient_c, self.idle_w = ambient_c, idle_w
        self.r = np.array([r_fast, r_slow])
        self.tau = np.array([tau_fast, tau_slow])
        self.x = np.full(2, float(idle_w))  # starts at steady idle

    def step(self, power_w: float, dt: float) -> float:
        """Advance dt seconds with constant power (exact for any dt); return the temperature."""
        a = np.exp(-dt / self.tau)
        self.x = a * self.x + (1.0 - a) * power_w
        return self.temp_c

    @property
    def temp_c(self) -> float:
        return float(self.ambient_c + self.r @ (self.x - self.idle_w))


def true_power(trace: dict[str, np.ndarray], lead_s: float) -> np.ndarray:
    """NVML reports a running average of power (on the trace power ramps over about a second while
    temperature moves at once), so the power the die sees is approximated by the reading lead_s later."""
    return np.interp(trace["t"] + lead_s, trace["t"], trace["p"])


def simulate_temperature(trace: dict[str, np.ndarray], params: dict[str, float]) -> np.ndarray:
    """Replay a trace's power through the thermal model; the temperature at each sample."""
    p = true_power(trace, params["lead_s"])
    model = ThermalModel(params["ambient_c"], params["idle_w"], params["r_fast"], params["tau_fast"],
                         params["r_slow"], params["tau_slow"])
    model.x[:] = p[0]
    out = np.empty(len(p))
    out[0] = model.temp_c
    for i in range(1, len(p)):
        out[i] = model.step(p[i - 1], trace["t"][i] - trace["t"][i - 1])
    return out


def fit_thermal(trace: dict[str, np.ndarray], idle_w: float = IDLE_W, lead_s: float = 0.5,
                taus: np.ndarray | None = None) -> dict[str, float]:
    """Least-squares fit of the two-node model: grid over (tau_fast, tau_slow); for each pair the
    model is linear in (ambient, r_fast, r_slow), solved with lstsq; gains constrained >= 0."""
    taus = np.geomspace(0.05, 200.0, 60) if taus is None else np.asarray(taus, dtype=float)
    t, T, p = trace["t"], trace["T"], true_power(trace, lead_s)
    x = np.empty((len(t), len(taus)))
    x[0] = p[0]
    for i in range(1, len(t)):  # all the low-passed powers at once, one column per tau
        a = np.exp(-(t[i] - t[i - 1]) / taus)
        x[i] = a * x[i - 1] + (1 - a) * p[i - 1]
    best = None
    for i, j in itertools.combinations(range(len(taus)), 2):
        A = np.stack([np.ones_like(t), x[:, i] - idle_w, x[:, j] - idle_w], 1)
        c, *_ = np.linalg.lstsq(A, T, rcond=None)
        if c[1] < 0 or c[2] < 0:
            continue
        err = A @ c - T
        rmse = float(np.sqrt(np.mean(err ** 2)))
        if best is None or rmse < best["rmse"]:
            best = dict(ambient_c=float(c[0]), idle_w=idle_w, r_fast=float(c[1]), tau_fast=float(taus[i]),
                        r_slow=float(c[2]), tau_slow=float(taus[j]), lead_s=lead_s, rmse=rmse,
                        max_err=float(np.abs(err).max()))
    return best


# ----------------------------------------------------------------------------- the telemetry source

class SimGpu:
    """A simulated H100 on the wall clock x time_scale. Thread-safe enough by design: report_work and
    set_external_power store one float each; read() (the sampler thread) integrates the model."""

    name = "sim"

    def __init__(self, sim: Any):
        g = lambda key, default: float(sim.get(key, default))  # noqa: E731
        self.idle_w, self.cap_w = g("idle_w", IDLE_W), g("cap_w", CAP_W)
        self.time_scale = g("time_scale", 1.0)
        self.power_avg_s = g("power_avg_s", 0.5)
        self.max_clock, self.min_clock = g("max_clock_mhz", 1980.0), g("min_clock_mhz", 1100.0)
        self.slowdown_c = g("slowdown_c", 87.0)
        self.busy_rel = g("busy_rel", 0.5)
        self.thermal = ThermalModel(g("ambient_c", 46.0), self.idle_w, g("r_fast", 0.022), g("tau_fast", 0.14),
                                    g("r_slow", 0.020), g("tau_slow", 5.5))
        self.relative_work = 0.0
        self.external_w = 0.0
        self.reported_w = self.idle_w
        self.energy_j = 0.0
        self.sim_t = 0.0
        self._t0 = time.monotonic()

    def clock(self) -> float:
        return (time.monotonic() - self._t0) * self.time_scale

    def demand_w(self) -> float:
        """What the work + stress would draw without the power cap."""
        rel = min(max(self.relative_work, 0.0), 1.0)
        return self.idle_w + (self.cap_w - self.idle_w) * rel + max(self.external_w, 0.0)

    def read(self) -> TelemetrySample:
        now = self.clock()
        dt, self.sim_t = max(now - self.sim_t, 0.0), now
        demand = self.demand_w()
        power = min(demand, self.cap_w)
        if dt > 0:
            temp = self.thermal.step(power, dt)
            a = math.exp(-dt / self.power_avg_s)  # NVML's running average of the reading
            self.reported_w = a * self.reported_w + (1 - a) * power
            self.energy_j += power * dt
        else:
            temp = self.thermal.temp_c
        dyn = demand - self.idle_w
        util = 100.0 * min(1.0, dyn / ((self.cap_w - self.idle_w) * self.busy_rel)) if dyn > 0 else 0.0
        # Over the cap the clock drops about in proportion (power ~ clock at fixed voltage).
        clock = self.max_clock
        reasons = 0
        if demand > self.cap_w:
            clock = max(self.min_clock, self.max_clock * (self.cap_w - self.idle_w) / dyn)
            reasons |= THROTTLE_SW_POWER_CAP
        if temp >= self.slowdown_c:
            reasons |= THROTTLE_SW_THERMAL
        return TelemetrySample(now, self.reported_w, temp, util, clock, self.energy_j, reasons)

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- simulated stress

class SimStressor(Stressor):
    """Under sim telemetry: a thread adding sim_power_w x level(t) of simulated power (sim seconds)."""

    backend = "sim"

    def __init__(self, schedule, sim_power_w: float, monitor, rate_hz: float = 20.0):
        self.schedule, self.sim_power_w, self.monitor = schedule, sim_power_w, monitor
        self.kind = schedule.kind
        self.rate_hz = rate_hz
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self, t0: float) -> None:
        while True:
            self.monitor.set_external_power(self.sim_power_w * self.schedule.level(self.monitor.clock() - t0))
            if self._stop.wait(1.0 / self.rate_hz):
                break
        self.monitor.set_external_power(0.0)

    def start(self) -> "SimStressor":
        if self.running:
            return self
        self._stop.clear()
        self.monitor.set_external_power(self.sim_power_w * self.schedule.level(0.0))
        self._thread = threading.Thread(target=self._loop, args=(self.monitor.clock(),),
                                        name=f"ttha-sim-stress-{self.kind}", daemon=True)
        self._thread.start()
        LIVE.add(self)
        return self

    def stop(self) -> None:
        self._stop.set()
        LIVE.discard(self)
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self.monitor.set_external_power(0.0)
