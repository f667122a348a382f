"""Configs of the `optuna` sweeper (hydra/sweeper=optuna), its samplers, and the named sweeps.

Keys follow Hydra's official Optuna sweeper so users' habits carry over; `mlflow` and
`devices` are ours. Kept import-light: Hydra imports this module at every start.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from ttha import paths


@dataclass
class TPESamplerConf:
    _target_: str = "optuna.samplers.TPESampler"
    seed: Optional[int] = None
    n_startup_trials: int = 10
    multivariate: bool = False


@dataclass
class RandomSamplerConf:
    _target_: str = "optuna.samplers.RandomSampler"
    seed: Optional[int] = None


@dataclass
class CmaEsSamplerConf:
    _target_: str = "optuna.samplers.CmaEsSampler"
    seed: Optional[int] = None


@dataclass
class NSGAIISamplerConf:
    _target_: str = "optuna.samplers.NSGAIISampler"
    seed: Optional[int] = None
    population_size: int = 50


@dataclass
class GPSamplerConf:
    _target_: str = "optuna.samplers.GPSampler"
    seed: Optional[int] = None
    n_startup_trials: int = 10


@dataclass
class QMCSamplerConf:
    _target_: str = "optuna.samplers.QMCSampler"
    seed: Optional[int] = None


@dataclass
class GridSamplerConf:
    # search_space is filled at run time from the params (every distribution must be discrete)
    _target_: str = "optuna.samplers.GridSampler"
    seed: Optional[int] = None


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.ttha_sweeper.optuna_sweeper.OptunaSweeper"
    _recursive_: bool = False  # the sweeper instantiates the sampler itself, to report a bad one in one line
    defaults: List[Any] = field(default_factory=lambda: [{"sampler": "tpe"}])
    sampler: Any = MISSING
    direction: Any = "minimize"          # minimize | maximize, or a list (one per objective)
    storage: Optional[str] = None        # null: sqlite:///<paths.outputs>/optuna.db; any RDB URL; *.log / journal:<file>
    study_name: Optional[str] = None     # null: <job name>-<hash of the search space and directions>
    n_trials: int = 20                   # COMPLETE trials in the study in total (re-running resumes up to it)
    n_jobs: int = 1                      # trials launched at once through the Hydra launcher
    max_failure_rate: float = 0.0        # stop when failed trials of this run > max_failure_rate * n_trials
    params: Dict[str, Any] = field(default_factory=dict)  # key: search-space expression or fixed value
    custom_search_space: Optional[str] = None  # module.f(cfg, trial) under ttha.sweeps or hydra_plugins: more params
    mlflow: bool = True                  # parent MLflow run + child-run overrides (needs tracking.* in the task config)
    devices: Any = None                  # null | auto | [cuda:0, cuda:1]: the k-th trial of a batch gets device=devices[k]
    importance_min_trials: int = 5       # parameter importances once this many trials are COMPLETE


cs = ConfigStore.instance()
cs.store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="ttha_sweeper")
for name, node in {"tpe": TPESamplerConf, "random": RandomSamplerConf, "cmaes": CmaEsSamplerConf,
                   "nsgaii": NSGAIISamplerConf, "gp": GPSamplerConf, "qmc": QMCSamplerConf,
                   "grid": GridSamplerConf}.items():
    cs.store(group="hydra/sweeper/sampler", name=name, node=node, provider="ttha_sweeper")


def register_named_sweeps(directory: Path) -> List[str]:
    """Each <name>.yaml of the folder becomes `sweep=<name>`: a _global_ config (it sets hydra.sweeper.* and
    more) in Hydra's ConfigStore, since a search-path entry would name the group after the folder (sweeps)."""
    names = []
    for path in sorted(Path(directory).glob("*.yaml")):
        cs.store(group="sweep", name=path.stem, node=OmegaConf.load(path), package="_global_",
                 provider="ttha_sweeper")
        names.append(path.stem)
    return names


register_named_sweeps(paths.sweeps_dir())
