"""Stress scenarios: load on the run's GPU from outside the run.

Kinds: none, matmul (the seeds' size x size fp16 matmul loop at a duty cycle), bursty (on_s / off_s),
thermal_ramp (duty rising 0 -> 1 over ramp_s). A `Schedule` gives the load level at each time; the
matmul loop realises it as on/off within period_s.

Backends: on a CUDA device a managed child process (spawn) on the same GPU; under sim telemetry
sim.SimStressor, simulated power as a function of the simulated clock (monitor.set_external_power); `cpu` is
a tiny numpy stand-in child so the process lifecycle is testable without a GPU.

The child never outlives the run: the parent stops it on stop()/__exit__/atexit (SIGTERM, then
SIGKILL), ttha.runtime.install_signal_handlers() turns SIGTERM into KeyboardInterrupt so the run's cleanup
runs, and the child dies by itself when the parent dies, even by SIGKILL (PR_SET_PDEATHSIG, plus a
watchdog on os.getppid()). PDEATHSIG follows the parent *thread*: start stressors from the main thread.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ttha.config import ConfigError
from ttha.gpu import LIVE, Stressor
from ttha.paths import conf_dir
from ttha.sim import SimStressor

log = logging.getLogger(__name__)

KINDS = ("none", "matmul", "bursty", "thermal_ramp")
BACKENDS = ("auto", "sim", "cuda", "cpu")


@dataclass(frozen=True)
class Schedule:
    """Load level over time since the stressor started (picklable: the child gets a copy)."""
    kind: str
    duty_cycle: float = 1.0
    period_s: float = 0.5
    on_s: float = 2.0
    off_s: float = 2.0
    ramp_s: float = 60.0

    def level(self, t: float) -> float:
        """Average load in [0, 1] at time t (what a power meter averaging over a period sees)."""
        if self.kind == "matmul":
            return self.duty_cycle
        if self.kind == "bursty":
            return 1.0 if (t % (self.on_s + self.off_s)) < self.on_s else 0.0
        if self.kind == "thermal_ramp":
            return min(1.0, max(0.0, t / self.ramp_s))
        return 0.0

    def on(self, t: float) -> bool:
        """Whether the matmul loop runs at time t: the level as on/off within each period_s."""
        return (t % self.period_s) < self.level(t) * self.period_s


# ----------------------------------------------------------------------------- child process

def _die_with_parent(parent_pid: int) -> None:
    """Exit when the parent dies: the kernel's PDEATHSIG on Linux, and a watchdog thread anywhere."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        except OSError:
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)

    def watchdog() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.2)
        os._exit(0)

    threading.Thread(target=watchdog, daemon=True).start()


def _child_main(schedule: Schedule, backend: str, device: str, size: int, dtype: str, parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C hits the process group: the parent stops us
    if backend == "cuda":
        import torch
        torch.set_num_threads(1)  # it only launches GPU work: leave the host's cores to the run
        dev = torch.device(device)
        if dev.index is None:  # "cuda" = the current device, 0 in a fresh process
            dev = torch.device("cuda", 0)
        torch.cuda.set_device(dev)
        dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
        a = torch.randn(size, size, device=dev, dtype=dt)
        b = torch.randn(size, size, device=dev, dtype=dt)

        def work() -> None:
            for _ in range(4):
                torch.mm(a, b)
            torch.cuda.synchronize(dev)  # keep the queue short so the on/off schedule is honoured
    else:
        import numpy as np
        a = np.random.rand(size, size).astype(np.float32)

        def work() -> None:
            a @ a
    t0 = time.monotonic()
    while True:
        t = time.monotonic() - t0
        if schedule.on(t):
            work()
        else:
            time.sleep(min(0.01, schedule.period_s / 20))


# ----------------------------------------------------------------------------- stressors

class ProcessStressor(Stressor):
    """A matmul loop in a spawned child process on `device` (cuda:N, or cpu for the stand-in)."""

    def __init__(self, schedule: Schedule, backend: str, device: str, size: int, dtype: str,
                 stop_timeout_s: float = 5.0):
        self.schedule, self.backend, self.device = schedule, backend, device
        self.kind = schedule.kind
        self.size, self.dtype, self.stop_timeout_s = size, dtype, stop_timeout_s
        self._proc = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    def start(self) -> "ProcessStressor":
        if self.running:
            return self
        ctx = mp.get_context("spawn")  # fork would copy the parent's CUDA context and threads
        self._proc = ctx.Process(target=_child_main, name=f"ttha-stress-{self.kind}", daemon=True,
                                 args=(self.schedule, self.backend, self.device, self.size, self.dtype,
                                       os.getpid()))
        self._proc.start()
        LIVE.add(self)
        log.info("stressor %s started on %s (pid %d)", self.kind, self.device, self._proc.pid)
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        LIVE.discard(self)
        if proc is None:
            return
        if proc.is_alive():
            proc.terminate()
            proc.join(self.stop_timeout_s)
            if proc.is_alive():
                proc.kill()
        proc.join()
        if proc.exitcode not in (0, -signal.SIGTERM, -signal.SIGKILL):
            log.warning("stressor %s exited with code %s before it was stopped", self.kind, proc.exitcode)
        log.info("stressor %s stopped", self.kind)


# ----------------------------------------------------------------------------- building

def _num(cfg: Any, key: str, default: float, low: float, high: float | None = None,
         strict_low: bool = False) -> float:
    value = cfg.get(key, default)
    bad = isinstance(value, bool) or not isinstance(value, (int, float))
    if not bad:
        bad = (value <= low) if strict_low else (value < low)
        bad = bad or (high is not None and value > high)
    if bad:
        rng = f"> {low}" if strict_low else f">= {low}"
        raise ConfigError(f"stress.{key}", value, f"must be a number {rng}" + (f" and <= {high}" if high else ""))
    return float(value)


def build_stressor(cfg: Any, device, monitor, backend: str | None = None) -> Stressor:
    """The stressor named by cfg.stress. backend: auto (sim under sim telemetry, else the GPU),
    sim, cuda, cpu (the test stand-in); cfg.stress.backend is read when the argument is None."""
    kind = cfg.get("kind", "none")
    if kind not in KINDS:
        raise ConfigError("stress.kind", kind, f"must be one of {', '.join(KINDS)}")
    backend = backend or cfg.get("backend", "auto")
    if backend not in BACKENDS:
        raise ConfigError("stress.backend", backend, f"must be one of {', '.join(BACKENDS)}")
    if kind == "none":
        return Stressor()
    schedule = Schedule(kind, duty_cycle=_num(cfg, "duty_cycle", 1.0, 0.0, 1.0),
                        period_s=_num(cfg, "period_s", 0.5, 0.0, strict_low=True),
                        on_s=_num(cfg, "on_s", 2.0, 0.0), off_s=_num(cfg, "off_s", 2.0, 0.0),
                        ramp_s=_num(cfg, "ramp_s", 60.0, 0.0, strict_low=True))
    if kind == "bursty" and schedule.on_s + schedule.off_s <= 0:
        raise ConfigError("stress.on_s", schedule.on_s, "on_s + off_s must be > 0")
    size = int(_num(cfg, "size", 4096, 1.0))
    dtype = cfg.get("dtype", "fp16")
    if dtype not in ("fp16", "bf16", "fp32"):
        raise ConfigError("stress.dtype", dtype, "must be one of fp16, bf16, fp32")
    sim_power_w = _num(cfg, "sim_power_w", 250.0, 0.0)

    dev_type = getattr(device, "type", str(device))
    if backend == "auto":
        if monitor is not None and monitor.source == "sim":
            backend = "sim"
        elif dev_type == "cuda":
            backend = "cuda"
        else:
            log.warning("stress=%s ignored: telemetry is %s on a %s device (no GPU to load, no simulator)",
                        kind, getattr(monitor, "source", None), dev_type)
            return Stressor()
    if backend == "sim":
        if monitor is None:
            raise ConfigError("stress.backend", "sim", "needs a monitor with sim telemetry")
        return SimStressor(schedule, sim_power_w, monitor)
    if backend == "cuda":
        if dev_type != "cuda":
            raise ConfigError("stress.backend", "cuda", f"the run's device is {device}")
        return ProcessStressor(schedule, "cuda", str(device), size, dtype)
    return ProcessStressor(schedule, "cpu", "cpu", min(size, 64), dtype)


# ----------------------------------------------------------------------------- measuring a scenario

CONF = conf_dir()  # the scenarios' and the simulator's own configs


def _cool_down(monitor, idle_w: float, max_s: float) -> None:
    """Wait (up to max_s on the monitor's clock) until power is back within 15 % of the first idle reading:
    the last scenario's heat would otherwise count as idle for the next."""
    deadline = monitor.clock() + max_s
    while monitor.clock() < deadline and monitor.latest().power_w > 1.15 * idle_w:
        monitor.wait(0.2)


def measure(kinds: list[str], seconds: float, device: str = "auto", idle_s: float = 3.0,
            cool_down_s: float = 20.0) -> list[dict]:
    """What each scenario adds: mean power and max temperature over `seconds` of the stressor alone, against
    the idle reading just before it (nvml on a GPU, the simulator elsewhere: then in simulated seconds)."""
    import torch
    from omegaconf import OmegaConf

    from ttha import telemetry

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    base = OmegaConf.load(CONF / "telemetry" / "sim.yaml")
    monitor = telemetry.build_monitor(OmegaConf.merge(base, {"source": "auto"}), dev)
    results = []
    with monitor:
        monitor.wait(0.3)
        first_idle_w = monitor.latest().power_w
        for kind in kinds:
            _cool_down(monitor, first_idle_w, cool_down_s)
            cfg = OmegaConf.load(CONF / "stress" / f"{kind}.yaml")
            if kind == "thermal_ramp":
                cfg.ramp_s = seconds
            window = {}
            for phase, secs in (("idle", idle_s), ("stress", seconds)):
                stressor = build_stressor(cfg, dev, monitor) if phase == "stress" else Stressor()
                with stressor:  # stops it on exit
                    stressor.start()
                    t0 = monitor.clock()
                    monitor.wait(secs)
                    window[phase] = [s for s in list(monitor.history) if s.t >= t0]
            idle_p = sum(s.power_w for s in window["idle"]) / max(len(window["idle"]), 1)
            p = [s.power_w for s in window["stress"]]
            row = {"kind": kind, "telemetry": monitor.source, "seconds": seconds, "idle_w": idle_p,
                   "mean_power_w": sum(p) / max(len(p), 1), "max_power_w": max(p, default=float("nan")),
                   "idle_temp_c": window["idle"][-1].temp_c if window["idle"] else float("nan"),
                   "max_temp_c": max((s.temp_c for s in window["stress"]), default=float("nan"))}
            row["added_power_w"] = row["mean_power_w"] - idle_p
            row["added_temp_c"] = row["max_temp_c"] - row["idle_temp_c"]
            results.append(row)
            log.info("%s", row)
    return results


def main(argv: list[str] | None = None) -> list[dict]:
    import argparse
    import json

    ap = argparse.ArgumentParser(description="Measure the power and temperature each stress scenario adds.")
    ap.add_argument("--measure", nargs="+", default=["matmul", "bursty", "thermal_ramp"], choices=KINDS[1:])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--cool-down", type=float, default=20.0, help="max seconds to wait for idle power between")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    rows = measure(args.measure, args.seconds, args.device, cool_down_s=args.cool_down)
    print(f"{'kind':<14}{'telemetry':>10}{'idle W':>8}{'mean W':>8}{'+W':>7}{'max W':>7}"
          f"{'idle C':>8}{'max C':>7}{'+C':>6}")
    for r in rows:
        print(f"{r['kind']:<14}{r['telemetry']:>10}{r['idle_w']:8.0f}{r['mean_power_w']:8.0f}{r['added_power_w']:7.0f}"
              f"{r['max_power_w']:7.0f}{r['idle_temp_c']:8.1f}{r['max_temp_c']:7.1f}{r['added_temp_c']:6.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
