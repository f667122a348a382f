"""Test set-up: Triton's interpreter on machines without a GPU, and the one way tests compose configs."""
import os
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
