"""Test set-up: Triton's interpreter on machines without a GPU, and the one way tests compose configs."""
import os
from pathlib import Path
from typing import Callable

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from ttha.paths import conf_dir

# Triton reads TRITON_INTERPRET at import: set it before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _compose(*overrides: str, config_name: str = "config", hydra: bool = False) -> DictConfig:
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name, overrides=list(overrides), return_hydra_config=hydra)


@pytest.fixture(scope="session")  # a plain function: module-scoped fixtures may use it too
def compose_cfg() -> Callable[..., DictConfig]:
    """compose_cfg(*overrides, config_name="config", hydra=False): a config as train.py (or, with
    config_name="profile", profile_kernels.py) composes it, without running anything; hydra=True keeps
    the `hydra` node."""
    return _compose


@pytest.fixture
def cfg() -> DictConfig:
    """train.py's default config."""
    return _compose()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One pretraining cache for the whole session: the end-to-end runs after the first load from it."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def make_cfg(compose_cfg):
    """make_cfg(tmp, cache, *overrides): the CPU smoke preset (model pretrained once, seed 0), recording into
    tmp/mlflow.db."""
    def make(tmp: Path, cache: Path, *overrides: str):
        return compose_cfg("experiment=smoke_cpu", "pretrain.seed=0", f"pretrain.cache_dir={cache}",
                           f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", "tracking.plots=true", *overrides)
    return make


def runs(tmp: Path):
    """(MlflowClient, the runs of experiment 'ttha') of the store tmp/mlflow.db."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ttha")
    return client, ([] if exp is None else client.search_runs([exp.experiment_id]))
