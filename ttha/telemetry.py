"""GPU telemetry: one monitor, three sources (nvml | sim | replay), read by a background sampler.

The hot loop only calls `GpuSystemMonitor.latest()`, which returns the last sample the sampler
thread stored (an attribute read, no lock, no NVML call). A failed read keeps the last sample
and counts the error; the run never crashes on telemetry.

- nvml: nvidia-ml-py. Power/temperature/utilisation/SM clock/throttle reasons every sample; the
  energy counter (a slow read) every `energy_every`-th sample, integrated power in between.
- sim: the simulated H100 of sim.py (`SimGpu`): power follows the work the run reports plus simulated
  stress, temperature follows a two-node thermal model fitted on the measured H100 trace. It runs on a
  simulated clock, moved by the run (advance / run_work / wait): no sampler thread, samples are taken at
  sample_hz of simulated time, so a simulated run reads the same telemetry on any host.
- replay: a recorded trace (the probe trace's format), looped, at `replay_speed`.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ttha.config import ConfigError
from ttha.gpu import NAN_SAMPLE, TelemetrySample
from ttha.sim import CAP_W, DEFAULT_TRACE, IDLE_W, SimGpu, load_trace

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- sources

class ReplaySource:
    """Replays a trace at `speed` x real time, looping; energy keeps growing across loops."""

    name = "replay"

    def __init__(self, path: str | Path | None, speed: float):
        self.trace = load_trace(path)
        self.speed = speed
        t = self.trace["t"]
        step = float(np.median(np.diff(t))) if len(t) > 1 else 1.0
        self.duration = float(t[-1]) + step
        e = self.trace["e"] - self.trace["e"][0]
        self.energy_per_loop = float(e[-1] + self.trace["p"][-1] * step)
        self._t0 = time.monotonic()

    def clock(self) -> float:
        return (time.monotonic() - self._t0) * self.speed

    def index_at(self, trace_t: float) -> int:
        """Index of the trace record in force at trace time trace_t (modulo the loop)."""
        return int(np.searchsorted(self.trace["t"], trace_t % self.duration, side="right") - 1)

    def at(self, trace_t: float) -> TelemetrySample:
        i, loops = self.index_at(trace_t), int(trace_t // self.duration)
        tr = self.trace
        energy = loops * self.energy_per_loop + float(tr["e"][i] - tr["e"][0])
        return TelemetrySample(trace_t, float(tr["p"][i]), float(tr["T"][i]), float(tr["u"][i]),
                               float(tr["clk"][i]), energy, 0)

    def read(self) -> TelemetrySample:
        return self.at(self.clock())

    def close(self) -> None:
        pass


def _nvml_open(index: int):
    """(pynvml module, handle) or raise with NVML's own message."""
    import pynvml
    pynvml.nvmlInit()
    try:
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:
        pynvml.nvmlShutdown()
        raise


class NvmlSource:
    """Real readings through nvidia-ml-py. Energy: the hardware counter every `energy_every`-th
    read (a slow read), power integrated in between so energy_j moves every sample."""

    name = "nvml"

    def __init__(self, index: int, energy_every: int = 5, opened=None):
        self.nv, self.handle = opened if opened is not None else _nvml_open(index)
        nv = self.nv
        self.energy_every = max(1, int(energy_every))
        reasons = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None)
        self._reasons: Callable = reasons or nv.nvmlDeviceGetCurrentClocksThrottleReasons
        self._e0_mj = nv.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        self._t0 = time.monotonic()
        self._n = 0
        self._energy_anchor = 0.0
        self._last_t, self._last_p = 0.0, None

    def clock(self) -> float:
        return time.monotonic() - self._t0

    def read(self) -> TelemetrySample:
        nv, h = self.nv, self.handle
        t = self.clock()
        power = nv.nvmlDeviceGetPowerUsage(h) / 1000.0
        temp = float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))
        util = float(nv.nvmlDeviceGetUtilizationRates(h).gpu)
        clock = float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM))
        reasons = int(self._reasons(h))
        if self._n % self.energy_every == 0:
            energy = (nv.nvmlDeviceGetTotalEnergyConsumption(h) - self._e0_mj) / 1000.0
        else:  # trapezoid since the last read
            energy = self._energy_anchor + 0.5 * (power + (self._last_p or power)) * (t - self._last_t)
        self._n += 1
        self._energy_anchor, self._last_t, self._last_p = energy, t, power
        return TelemetrySample(t, power, temp, util, clock, energy, reasons)

    def close(self) -> None:
        try:
            self.nv.nvmlShutdown()
        except Exception:  # already shut down / driver gone: nothing to release
            pass


# ----------------------------------------------------------------------------- the monitor

class GpuSystemMonitor:
    """Background sampler over one source (for sim: samples taken as the simulated clock passes each
    1/sample_hz). start()/stop() are idempotent; a context manager."""

    def __init__(self, source, sample_hz: float = 10.0):
        if not sample_hz > 0:
            raise ValueError(f"sample_hz={sample_hz!r}: must be > 0")
        self._source = source
        self.source: str = source.name
        self.sample_hz = float(sample_hz)
        self.error_count = 0
        self.history: list[TelemetrySample] = []
        self._latest: TelemetrySample | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._closed = False
        self.simulated = isinstance(source, SimGpu)
        self._sim_started = False
        self._n_sim_samples = 0  # samples taken on the simulated clock: the next is at n / sample_hz

    # -- sampling
    def _sample(self) -> None:
        try:
            s = self._source.read()
        except Exception as err:  # keep the last sample; telemetry never kills the run
            self.error_count += 1
            if self.error_count == 1 or self.error_count % 100 == 0:
                log.warning("telemetry read failed (%d so far): %s", self.error_count, err)
            return
        self._latest = s
        self.history.append(s)

    def _loop(self) -> None:
        period = 1.0 / self.sample_hz
        next_t = time.monotonic()
        while not self._stop.is_set():
            next_t += period
            self._stop.wait(max(0.0, next_t - time.monotonic()))
            if not self._stop.is_set():
                self._sample()

    def start(self) -> "GpuSystemMonitor":
        if self.simulated:
            if not self._sim_started:
                self._sim_started = True
                self._sample_sim_until(self._source.clock())
            return self
        if self._thread is not None and self._thread.is_alive():
            return self
        self._stop.clear()
        self._sample()  # so latest() has a value at once
        self._thread = threading.Thread(target=self._loop, name=f"ttha-telemetry-{self.source}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._sim_started = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        """Stop and release the source (NVML shutdown)."""
        self.stop()
        if not self._closed:
            self._closed = True
            self._source.close()

    @property
    def running(self) -> bool:
        return self._sim_started or (self._thread is not None and self._thread.is_alive())

    def latest(self) -> TelemetrySample:
        s = self._latest
        if s is None:  # not started: read once, synchronously
            self._sample()
            s = self._latest
        return s if s is not None else NAN_SAMPLE

    def clock(self) -> float:
        """Seconds on the source's clock (simulated seconds for sim)."""
        return self._source.clock()

    def energy_j(self) -> float:
        """Energy since the monitor started, now (sim: exact at the simulated clock; else the latest sample)."""
        return self._source.energy_j if self.simulated else self.latest().energy_j

    # -- the simulated clock (sim only; wait() also serves real sources)
    def _sample_sim_until(self, t: float) -> None:
        """Advance the simulated GPU to time t, sampling at each 1/sample_hz passed on the way."""
        src = self._source
        while self._sim_started and self._n_sim_samples / self.sample_hz <= t:
            src.advance(self._n_sim_samples / self.sample_hz - src.clock())
            self._sample()
            self._n_sim_samples += 1
        src.advance(t - src.clock())

    def advance(self, seconds: float) -> None:
        """Let `seconds` of simulated time pass at the work last reported (sim only)."""
        if self.simulated:
            self._sample_sim_until(self._source.clock() + max(float(seconds), 0.0))

    def run_work(self, seconds: float, relative_power: float) -> None:
        """The GPU is busy for `seconds` at `relative_power` (0..1 of idle..cap), then idle (sim only)."""
        if self.simulated:
            self.report_work(relative_power)
            self.advance(seconds)
            self.report_work(0.0)

    def wait(self, seconds: float) -> None:
        """Let time pass: simulated time for sim, a sleep otherwise."""
        if self.simulated:
            self.advance(seconds)
        elif seconds > 0:
            time.sleep(seconds)

    # -- what the run and the stressor tell the simulator (no-ops for real sources)
    def report_work(self, relative_power: float) -> None:
        """Fraction 0..1 of the idle..cap range that the run's work demands now (sim only)."""
        if self.simulated:
            self._source.relative_work = float(relative_power)

    def set_external_power(self, watts: float | Callable[[float], float]) -> None:
        """Power drawn by a simulated stressor (sim only): watts, or watts as a function of simulated time."""
        if self.simulated:
            self._source.external = watts if callable(watts) else float(watts)

    def __enter__(self) -> "GpuSystemMonitor":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- building from config

def _positive(node: Any, key: str, prefix: str, default: float | None = None) -> float:
    value = node.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{prefix}.{key}", value, "must be a number > 0")
    return float(value)


def _check_sim(sim: Any) -> None:
    for key in ("idle_w", "cap_w", "tau_fast", "tau_slow", "power_avg_s"):
        if key in sim:
            _positive(sim, key, "telemetry.sim")
    if sim.get("serve_s") is not None:
        _positive(sim, "serve_s", "telemetry.sim")
    for key in ("r_fast", "r_slow"):
        if key in sim and not float(sim[key]) >= 0:
            raise ConfigError(f"telemetry.sim.{key}", sim[key], "must be >= 0")
    if float(sim.get("cap_w", CAP_W)) <= float(sim.get("idle_w", IDLE_W)):
        raise ConfigError("telemetry.sim.cap_w", sim.get("cap_w"), "must be above telemetry.sim.idle_w")


def _nvml_probe(index: int):
    """((pynvml, handle), None) when a GPU answers, else (None, NVML's message)."""
    try:
        return _nvml_open(index), None
    except Exception as err:  # ImportError, NVMLError_LibraryNotFound, NVMLError_InvalidArgument ...
        return None, f"{type(err).__name__}: {err}".strip()


def build_monitor(cfg: Any, device=None) -> GpuSystemMonitor:
    """The monitor named by cfg.telemetry (auto resolved). Raises ConfigError before any work."""
    source = cfg.get("source", "auto")
    hz = _positive(cfg, "sample_hz", "telemetry", 10.0)
    index = int(cfg.get("device_index", 0))
    sim = cfg.get("sim") or {}
    _check_sim(sim)
    if source not in ("auto", "nvml", "sim", "replay"):
        raise ConfigError("telemetry.source", source, "must be one of auto, nvml, sim, replay")

    if source == "replay":
        path = cfg.get("replay_path")
        if path is not None and not Path(str(path)).expanduser().is_file():
            raise ConfigError("telemetry.replay_path", str(path), "no such trace file")
        speed = _positive(cfg, "replay_speed", "telemetry", 1.0)
        try:
            src = ReplaySource(Path(str(path)).expanduser() if path else None, speed)
        except (ValueError, KeyError, json.JSONDecodeError) as err:
            raise ConfigError("telemetry.replay_path", str(path), f"not a probe trace ({err})") from None
        log.info("telemetry source: replay (%s at %gx)", path or DEFAULT_TRACE.name, speed)
        return GpuSystemMonitor(src, hz)

    if source in ("auto", "nvml"):
        on_cpu = device is not None and getattr(device, "type", str(device)) == "cpu"
        if source == "auto" and on_cpu:
            reason = "the run's device is the CPU"
        else:
            opened, reason = _nvml_probe(index)
            if opened is not None:
                import torch
                if source == "nvml" or torch.cuda.is_available():
                    log.info("telemetry source: nvml (GPU %d)", index)
                    return GpuSystemMonitor(NvmlSource(index, int(cfg.get("energy_every", 5)), opened), hz)
                opened[0].nvmlShutdown()
                reason = "NVML answers but torch sees no CUDA device"
            elif source == "nvml":
                raise ConfigError("telemetry.source", "nvml", f"no NVIDIA GPU answers (NVML: {reason})")
        log.info("telemetry source: sim (auto: %s)", reason)
    else:
        log.info("telemetry source: sim")
    return GpuSystemMonitor(SimGpu(sim), hz)
