"""The Optuna sampler of a sweep, from `hydra.sweeper.sampler`.

A seeded sampler is rebuilt for every trial with a seed derived from (seed, trial number), so trial k
draws the same values whenever it is asked: a resumed sweep continues the sequence instead of replaying
it from trial 0, two sweeps of one study at once draw different values (their trials have different
numbers), and an uninterrupted sweep stays reproducible from its seed.
"""
from __future__ import annotations

import hashlib
import math
from typing import Any, Callable, Sequence

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler

from ttha.tracking import failure_line

from ._errors import SweepConfigError
from ._space import SearchSpace

KEY = "hydra.sweeper.sampler"
# Their seed fixes a whole sequence (the grid's order, the QMC scramble), not one trial's draws, and they
# already continue it on resume: they keep one seed.
WHOLE_SEQUENCE = ("optuna.samplers.GridSampler", "optuna.samplers.QMCSampler")


def trial_seed(seed: int, number: int) -> int:
    digest = hashlib.sha256(f"{seed}:{number}".encode()).digest()
    return int.from_bytes(digest[:4], "little")  # numpy seeds are 32-bit


class TrialSeededSampler(BaseSampler):
    """Delegates to a sampler built anew, before each trial, with seed trial_seed(seed, trial number)."""

    def __init__(self, build: Callable[[int], BaseSampler], seed: int):
        self._build, self._seed = build, seed
        self.inner = build(seed)

    def __str__(self) -> str:
        return type(self.inner).__name__

    def before_trial(self, study: Any, trial: Any) -> None:
        self.inner = self._build(trial_seed(self._seed, trial.number))
        self.inner.before_trial(study, trial)

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, BaseDistribution]:
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: Any, trial: Any, search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self.inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study: Any, trial: Any, param_name: str, param_distribution: BaseDistribution) -> Any:
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: Any, trial: Any, state: Any, values: Sequence[float] | None) -> None:
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


def name(sampler: BaseSampler) -> str:
    return str(sampler) if isinstance(sampler, TrialSeededSampler) else type(sampler).__name__


def grid_values(key: str, dist: Any) -> list[Any]:
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    if isinstance(dist, IntDistribution) and not dist.log:
        return list(range(dist.low, dist.high + 1, dist.step))
    if isinstance(dist, FloatDistribution) and dist.step is not None:
        n = int(round((dist.high - dist.low) / dist.step)) + 1
        return [round(dist.low + i * dist.step, 12) for i in range(n)]
    raise SweepConfigError(key, dist, "the grid sampler needs discrete values (choice or range)")


def space_size(space: SearchSpace) -> int | None:
    """How many distinct parameter sets the space holds; None when one of its distributions is continuous."""
    try:
        return math.prod(len(grid_values("", d)) for d in space.distributions.values())
    except SweepConfigError:
        return None


def make_sampler(settings: Any, space: SearchSpace) -> tuple[BaseSampler, int | None]:
    """(sampler, grid size or None) from the sampler settings (a _target_ under optuna.samplers)."""
    conf = OmegaConf.to_container(settings, resolve=True) if isinstance(settings, DictConfig) else dict(settings or {})
    target = conf.get("_target_", "")
    grid = None
    if target == "optuna.samplers.GridSampler":
        values = {k: grid_values(f"hydra.sweeper.params.{k}", d) for k, d in space.distributions.items()}
        conf["search_space"] = values
        grid = math.prod(len(v) for v in values.values())
    if not str(target).startswith("optuna.samplers."):
        raise SweepConfigError(KEY + "._target_", target, "unknown sampler (expected optuna.samplers.*)")

    def build(seed: Any) -> BaseSampler:
        return instantiate({**conf, "seed": seed} if "seed" in conf else conf, _convert_="all")

    seed = conf.get("seed")
    try:
        if isinstance(seed, int) and not isinstance(seed, bool) and target not in WHOLE_SEQUENCE:
            return TrialSeededSampler(build, seed), grid
        return build(seed), grid
    except Exception as err:
        raise SweepConfigError(KEY + "._target_", target,
                               f"cannot build the sampler ({failure_line(err.__cause__ or err)})") from None
