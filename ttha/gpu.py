"""What the run reads from a GPU and what it puts on one: a telemetry sample and a stressor.

The real sources and stressors (telemetry.py, stress.py) and the simulated ones (sim.py) build on these
two, so the simulator needs neither of the modules that build it.
"""
from __future__ import annotations

import atexit
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class TelemetrySample:
    t: float             # seconds since the monitor started, on the source's clock (sim: simulated s)
    power_w: float
    temp_c: float
    util_pct: float
    sm_clock_mhz: float
    energy_j: float      # since the monitor started
    throttle_reasons: int = 0


NAN_SAMPLE = TelemetrySample(0.0, math.nan, math.nan, math.nan, math.nan, 0.0, 0)

LIVE: set["Stressor"] = set()  # started and not yet stopped: stopped at exit, so no load outlives the run


@atexit.register
def _stop_all() -> None:
    for s in list(LIVE):
        s.stop()


class Stressor:
    """Base: the `none` stressor. A context manager that stops (never starts) the stress on exit:
    the run starts it after warm-up with start()."""

    kind = "none"
    backend = "none"
    pid: int | None = None

    def start(self) -> "Stressor":
        return self

    def stop(self) -> None:
        pass

    @property
    def running(self) -> bool:
        return False

    def __enter__(self) -> "Stressor":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
