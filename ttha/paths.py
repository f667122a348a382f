"""Where a run reads and writes.

Reads: the Hydra configs (conf/) and the named sweeps (sweeps/) ship inside the package as ttha.conf and
ttha.sweeps (pyproject's package-dir), so they are found the same way from a checkout and from a wheel.
Writes: everything goes under one outputs root (`paths.outputs` of conf/paths/default.yaml; relative to the
launch directory): Hydra's run and sweep dirs, MLflow's store and artifacts, Optuna's study, caches.
"""
from __future__ import annotations

import os
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

# ${ttha.pid:} in conf/paths/default.yaml: with ${now:...%f} it makes each process's run dir its own, so runs started
# in the same second never share one. Cached like Hydra's ${now:}, so a sweep's jobs get the sweeper's value; this
# module is imported wherever the paths callback is (every process of a run, any launcher), before the dirs resolve.
if not OmegaConf.has_resolver("ttha.pid"):
    OmegaConf.register_new_resolver("ttha.pid", os.getpid, use_cache=True)


def conf_dir() -> Path:
    """conf/ as installed (the package ttha.conf): for code that reads one config file without composing."""
    return Path(str(resources.files("ttha.conf")))


def sweeps_dir() -> Path:
    """sweeps/ as installed (the package ttha.sweeps); TTHA_SWEEPS_DIR points at another folder of them."""
    env = os.environ.get("TTHA_SWEEPS_DIR")
    return Path(env) if env else Path(str(resources.files("ttha.sweeps")))


def launch_dir() -> Path:
    """The directory the command was launched from (Hydra may have changed the job's cwd)."""
    return Path(HydraConfig.get().runtime.cwd) if HydraConfig.initialized() else Path.cwd()


_outputs: Path | None = None  # as configured; a relative one is resolved at each call, against the launch dir


def use_outputs(path: str | os.PathLike) -> Path:
    """Set the outputs root for this process (a relative path is under the launch directory)."""
    global _outputs
    _outputs = Path(path)
    return outputs_root()


def outputs_setting() -> str:
    """paths.outputs as configured (relative or not)."""
    return str(_outputs if _outputs is not None else "outputs")


def outputs_root() -> Path:
    """The one place every file a run writes goes under: caches, cost models, MLflow, Optuna, Hydra's dirs."""
    root = _outputs if _outputs is not None else Path("outputs")
    return root if root.is_absolute() else launch_dir() / root


def output_dir() -> Path:
    """This job's own output directory (Hydra's), else runs/<date>/<time>-<microseconds>-<pid> under the outputs
    root (as Hydra's, one per process)."""
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    path = outputs_root() / "runs" / f"{datetime.now():%Y-%m-%d/%H-%M-%S-%f}-{os.getpid()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


class UseOutputs(Callback):
    """Hydra callback of conf/paths/default.yaml: the sweeper's process and every job (whatever the entry
    point or launcher) take their outputs root from the composed `paths.outputs`."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        use_outputs(config.paths.outputs)  # before Hydra makes the run dir: train.py names the key if it cannot

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        use_outputs(config.paths.outputs)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        use_outputs(config.paths.outputs)
