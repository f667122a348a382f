"""Where a run reads and writes: the launch directory (Hydra changes each job's cwd), the outputs root
and the job's own output directory. Everything a run writes lives under the outputs root
(`paths.outputs` of the composed config; <launch dir>/outputs/ by default)."""
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


_root: dict[str, Path] = {}


def use_outputs(path) -> Path:
    """Set the outputs root for this process (a relative path is under the launch directory)."""
    root = Path(path)
    _root["outputs"] = root if root.is_absolute() else launch_dir() / root
    return _root["outputs"]


def outputs_root() -> Path:
    """The one place every file a run writes goes under: caches, cost models, MLflow, Hydra's run dirs."""
    return _root.get("outputs") or launch_dir() / "outputs"


def output_dir() -> Path:
    """This job's own output directory (Hydra's), else outputs/runs/<time> under the launch directory."""
    runtime = _hydra_runtime()
    if runtime is not None:
        return Path(runtime.output_dir)
    path = outputs_root() / "runs" / time.strftime("%Y%m%d-%H%M%S")
    path.mkdir(parents=True, exist_ok=True)
    return path
