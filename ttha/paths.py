"""Where a run reads and writes: the launch directory (Hydra changes each job's cwd) and the job's own
output directory. Everything a run writes lives under <launch dir>/outputs/."""
from __future__ import annotations

import time
from pathlib import Path


def _hydra_runtime():
    try:
        from hydra.core.hydra_config import HydraConfig
    except ImportError:
        return None
    return HydraConfig.get().runtime if HydraConfig.initialized() else None


def launch_dir() -> Path:
    """The directory the command was launched from."""
    runtime = _hydra_runtime()
    return Path(runtime.cwd) if runtime is not None else Path.cwd()


def output_dir() -> Path:
    """This job's own output directory (Hydra's), else outputs/runs/<time> under the launch directory."""
    runtime = _hydra_runtime()
    if runtime is not None:
        return Path(runtime.output_dir)
    path = launch_dir() / "outputs" / "runs" / time.strftime("%Y%m%d-%H%M%S")
    path.mkdir(parents=True, exist_ok=True)
    return path
