"""The simulated GPU, for machines without one: the work the run puts on it, the GPU telemetry reads, the
stress added to it, all on a simulated clock, so that a simulated run is deterministic given its seed.

- SimWork: what a batch of the run costs the GPU (busy seconds, power) from the cost model;
- decode_step_energy_j / decode_step_s: what one decode step costs, from the bytes of the experts it
  activates, fitted on a measured H200 file (fit_decode, DECODE_FIT);
- SimGpu: the telemetry source. Power = idle + the run's work + simulated stress, capped (the clock drops
  over the cap); temperature follows a two-node thermal model fitted on a measured H100 trace (ThermalModel,
  fit_thermal). Its time moves only when the run says how long its work (or an idle gap) lasted;
- SimStressor: stress as simulated power, a function of the SimGpu's clock.
"""
from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ttha.costs import WEIGHT_BYTES_PER_PARAM, expert_op
from ttha.gpu import LIVE, Stressor, TelemetrySample

RESOURCES = Path(__file__).parent / "resources"
DEFAULT_TRACE = RESOURCES / "h100_probe_trace_10hz.json"
DECODE_FILE = RESOURCES / "h200_decode_activation.csv"
IDLE_W, CAP_W = 78.0, 700.0  # the H100 trace's idle power and the H100's power cap
# NVML throttle-reason bits the simulator sets (same values as pynvml's constants).
THROTTLE_SW_POWER_CAP = 0x4
THROTTLE_SW_THERMAL = 0x20
MAX_STEP_S = 0.02  # the simulated GPU integrates in steps this short, so stress schedules are followed


# ----------------------------------------------------------------------------- the run's work

class SimWork:
    """What a batch of the run costs the simulated GPU: (busy seconds, power as a share of idle..cap).

    - serving: the cost model's latency of what the batch ran (per layer: the router on the batch's tokens
      and each expert on the tokens routed to it, at its precision), or sim.serve_s x the mix's latency
      relative to 16-bit experts when serve_s is set; power = sim.busy_w (what 16-bit expert GEMVs draw on
      the H100 trace) x the mix's energy per second relative to 16-bit experts;
    - TTT: the cost model's ttt_full / ttt_light latency at the batch's tokens (what the TTT policy plans
      with), at busy_w.
    The CPU's own timing never enters: the same batches give the same simulated seconds on any host."""

    def __init__(self, cost_model, bits: list[int], top_k: int, tokens: int, sim_cfg, n_layers: int = 1):
        self.cost_model, self.bits, self.tokens = cost_model, [int(b) for b in bits], int(tokens)
        self.top_k, self.n_layers = int(top_k), int(n_layers)
        per_expert = max(1, tokens * top_k // len(bits))  # typical tokens an expert sees per call
        ref = cost_model.get_cost(expert_op(16), per_expert)
        mix = [cost_model.get_cost(expert_op(b), per_expert) for b in self.bits]
        self.latency_rel = np.array([c.latency_ms / ref.latency_ms for c in mix])
        known = ref.energy_j is not None and all(c.energy_j is not None for c in mix)
        self.energy_rel = (np.array([c.energy_j / ref.energy_j for c in mix]) if known
                           else self.latency_rel.copy())  # no energy measured: same power as 16-bit
        g = lambda key, default: float(sim_cfg.get(key, default))  # noqa: E731
        idle, cap = g("idle_w", IDLE_W), g("cap_w", CAP_W)
        self.busy_rel = (g("busy_w", 550.0) - idle) / (cap - idle)
        fixed = sim_cfg.get("serve_s")
        self.fixed_serve_s = None if fixed is None else float(fixed)
        self._ttt_s = {}

    @property
    def n_experts(self) -> int:
        return len(self.latency_rel)

    def _serve_s(self, usage: np.ndarray) -> float:
        if self.fixed_serve_s is not None:
            return self.fixed_serve_s * max(float(usage @ self.latency_rel), 1e-9)
        routed = self.tokens * self.top_k
        experts = sum(self.cost_model.get_cost(expert_op(b), routed * u).latency_ms
                      for b, u in zip(self.bits, usage) if routed * u >= 1.0)
        router = (self.cost_model.get_cost("router_topk", self.tokens).latency_ms
                  if "router_topk" in self.cost_model.ops else 0.0)
        return self.n_layers * (experts + router) / 1000.0

    def serve(self, usage: np.ndarray) -> tuple[float, float]:
        """(busy seconds, relative power) of serving one batch whose routed tokens are shared as `usage`."""
        usage = np.asarray(usage, dtype=float)
        intensity = float(usage @ self.energy_rel) / max(float(usage @ self.latency_rel), 1e-9)
        return self._serve_s(usage), min(self.busy_rel * intensity, 1.0)

    def ttt(self, mode: str) -> tuple[float, float]:
        """(busy seconds, relative power) of one TTT step of `mode` on a batch (skip: none)."""
        if mode == "skip":
            return 0.0, 0.0
        if mode not in self._ttt_s:
            op = f"ttt_{mode}"
            if op in self.cost_model.ops:
                self._ttt_s[mode] = self.cost_model.get_cost(op, self.tokens).latency_ms / 1000.0
            else:  # forward + backward of every weight (full) or of norms and gates (light), as costs.py estimates
                balanced = np.full(self.n_experts, 1.0 / self.n_experts)
                self._ttt_s[mode] = {"full": 3.0, "light": 1.1}[mode] * self._serve_s(balanced)
        return self._ttt_s[mode], self.busy_rel

    def decode(self, layer_counts, expert_params: float, idle_w: float, cap_w: float) -> tuple[float, float]:
        """(busy seconds, relative power) of one decode step from its per-layer expert token counts [L, E]:
        each layer reads the weights of the experts it activates (decode_step_s / decode_step_energy_j)."""
        layers = np.asarray(layer_counts).reshape(-1, self.n_experts)
        busy = sum(decode_step_s(c, self.bits, expert_params) for c in layers)
        energy = sum(decode_step_energy_j(c, self.bits, expert_params) for c in layers)
        return busy, min(energy / busy / (cap_w - idle_w), 1.0)


# ----------------------------------------------------------------------------- decode: bytes of the activated experts

# Fitted by fit_decode() on DECODE_FILE (NVIDIA H200, one MoE layer of 8 experts of 2 x 4096 x 14336 weights,
# 16 tokens x top-2 a step, 12 rows over 4 activation patterns x 3 rates); tests/test_sim.py refits and checks.
# Energy per step net of idle = fixed_j + sum over experts with >= 1 token of weight bytes x j_per_byte[bits];
# step time = fixed_s + sum of weight bytes x s_per_byte[bits]. Per byte, the quantized kernels cost about twice
# the 16-bit one (their dequantisation work), but read 3.6x (int4) and 6.4x (int2) fewer bytes.
DECODE_FIT = {
    "fixed_j": 0.013846, "j_per_byte": {16: 1.17860e-10, 4: 2.31363e-10, 2: 2.28387e-10},
    "fixed_s": 6.0e-6, "s_per_byte": {16: 2.81703e-13, 4: 5.82296e-13, 2: 1.06812e-12},
}
DECODE_IDLE_W = 125.0  # the H200's idle power in DECODE_FILE
DECODE_EXPERT_PARAMS = 2 * 4096 * 14336  # weights of one expert in DECODE_FILE
DECODE_PATTERNS = {  # experts i % 3 -> bf16 / int4 / int2 over 8 experts: activated experts per precision
    "balanced_all8": {16: 3, 4: 3, 2: 2}, "cheap_only_int4_int2": {4: 3, 2: 2},
    "int2_only": {2: 2}, "bf16_only": {16: 3},
}


def _activated_bytes(counts, bits, expert_params: float) -> dict[int, float]:
    """Weight bytes read per precision: an expert is read once if it got >= 1 token, else not at all."""
    read: dict[int, float] = {}
    for c, b in zip(np.asarray(counts).reshape(-1), bits):
        if c >= 1:
            read[int(b)] = read.get(int(b), 0.0) + expert_params * WEIGHT_BYTES_PER_PARAM[int(b)]
    return read


def decode_step_energy_j(counts, bits, expert_params: float = DECODE_EXPERT_PARAMS, fit: dict = DECODE_FIT) -> float:
    """Energy (J, net of idle) of one MoE layer's decode step, from its per-expert token counts [E]."""
    read = _activated_bytes(counts, bits, expert_params)
    return fit["fixed_j"] + sum(n * fit["j_per_byte"][b] for b, n in read.items())


def decode_step_s(counts, bits, expert_params: float = DECODE_EXPERT_PARAMS, fit: dict = DECODE_FIT) -> float:
    """GPU time (s) of one MoE layer's decode step, from its per-expert token counts [E]."""
    read = _activated_bytes(counts, bits, expert_params)
    return fit["fixed_s"] + sum(n * fit["s_per_byte"][b] for b, n in read.items())


def load_decode_rows(path: str | Path = DECODE_FILE) -> list[dict]:
    """The measured rows: pattern, steps/s kept, mean power (W), step time (us)."""
    with open(path) as fh:
        rows = list(csv.DictReader(line for line in fh if not line.startswith("#")))
    return [{"pattern": r["pattern"], "rate": r["rate"], "steps_s": float(r["kept_steps_s"]),
             "mean_w": float(r["mean_w"]), "step_us": float(r["step_us"])} for r in rows]


def fit_decode(rows: list[dict], idle_w: float = DECODE_IDLE_W,
               expert_params: float = DECODE_EXPERT_PARAMS) -> dict:
    """Least squares of DECODE_FIT's two linear models on the measured rows."""
    precisions = (16, 4, 2)
    A = np.array([[1.0] + [DECODE_PATTERNS[r["pattern"]].get(b, 0) * expert_params * WEIGHT_BYTES_PER_PARAM[b]
                           for b in precisions] for r in rows])
    energy = np.array([(r["mean_w"] - idle_w) / r["steps_s"] for r in rows])
    step_s = np.array([r["step_us"] * 1e-6 for r in rows])
    e, *_ = np.linalg.lstsq(A, energy, rcond=None)
    t, *_ = np.linalg.lstsq(A, step_s, rcond=None)
    return {"fixed_j": float(e[0]), "j_per_byte": dict(zip(precisions, map(float, e[1:]))),
            "fixed_s": float(t[0]), "s_per_byte": dict(zip(precisions, map(float, t[1:])))}


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
    """A simulated GPU on a simulated clock: time moves only by advance(seconds), at the work last reported
    (relative_work) plus the stress (external: watts, or watts as a function of simulated time)."""

    name = "sim"

    def __init__(self, sim: Any):
        g = lambda key, default: float(sim.get(key, default))  # noqa: E731
        self.idle_w, self.cap_w = g("idle_w", IDLE_W), g("cap_w", CAP_W)
        self.power_avg_s = g("power_avg_s", 0.5)
        self.max_clock, self.min_clock = g("max_clock_mhz", 1980.0), g("min_clock_mhz", 1100.0)
        self.slowdown_c = g("slowdown_c", 87.0)
        self.busy_rel = g("busy_rel", 0.5)
        self.thermal = ThermalModel(g("ambient_c", 46.0), self.idle_w, g("r_fast", 0.022), g("tau_fast", 0.14),
                                    g("r_slow", 0.020), g("tau_slow", 5.5))
        self.relative_work = 0.0
        self.external: float | Callable[[float], float] = 0.0
        self.reported_w = self.idle_w
        self.energy_j = 0.0
        self.sim_t = 0.0

    def clock(self) -> float:
        return self.sim_t

    def external_w(self) -> float:
        w = self.external(self.sim_t) if callable(self.external) else self.external
        return max(float(w), 0.0)

    def demand_w(self) -> float:
        """What the work + stress would draw without the power cap."""
        rel = min(max(self.relative_work, 0.0), 1.0)
        return self.idle_w + (self.cap_w - self.idle_w) * rel + self.external_w()

    def advance(self, seconds: float) -> None:
        """Run the model for `seconds` of simulated time (exact for constant power within each short step)."""
        end = self.sim_t + max(float(seconds), 0.0)
        while self.sim_t < end:
            dt = min(MAX_STEP_S, end - self.sim_t)
            power = min(self.demand_w(), self.cap_w)
            self.thermal.step(power, dt)
            a = math.exp(-dt / self.power_avg_s)  # NVML's running average of the reading
            self.reported_w = a * self.reported_w + (1 - a) * power
            self.energy_j += power * dt
            self.sim_t = end if dt == end - self.sim_t else self.sim_t + dt  # lands on end exactly

    def read(self) -> TelemetrySample:
        """The readings now (reading does not move the clock)."""
        demand = self.demand_w()
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
        return TelemetrySample(self.sim_t, self.reported_w, temp, util, clock, self.energy_j, reasons)

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- simulated stress

class SimStressor(Stressor):
    """Under sim telemetry: sim_power_w x level(t) of simulated power, t in simulated seconds since start()."""

    backend = "sim"

    def __init__(self, schedule, sim_power_w: float, monitor):
        self.schedule, self.sim_power_w, self.monitor = schedule, sim_power_w, monitor
        self.kind = schedule.kind
        self._running = False

    @property
    def running(self) -> bool:
        return self._running

    def start(self) -> "SimStressor":
        if not self._running:
            t0, level, watts = self.monitor.clock(), self.schedule.level, self.sim_power_w
            self.monitor.set_external_power(lambda t: watts * level(t - t0))
            self._running = True
            LIVE.add(self)
        return self

    def stop(self) -> None:
        LIVE.discard(self)
        if self._running:
            self._running = False
            self.monitor.set_external_power(0.0)
