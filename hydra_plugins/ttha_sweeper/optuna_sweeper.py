"""The Hydra Sweeper class (hydra/sweeper=optuna). Heavy imports (optuna, mlflow) wait until a sweep runs."""
from __future__ import annotations

from typing import Any, List

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class OptunaSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        self.settings = settings  # validated in sweep(), so a bad value reads as one line

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from ._impl import SweepRunner

        self.runner = SweepRunner(self.settings, hydra_context=hydra_context, task_function=task_function,
                                  config=config)

    def sweep(self, arguments: List[str]) -> Any:
        return self.runner.sweep(arguments)
