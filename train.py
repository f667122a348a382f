"""Run one TTHA experiment (or a sweep of them with -m): `python train.py [overrides]`."""
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from ttha.config import ConfigError


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig):
    from ttha import experiment  # heavy imports (torch, mlflow) after Hydra has parsed the command line

    try:
        values = experiment.run(cfg)
    except ConfigError as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the sweeper records the trial as failed
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    return values[0] if len(values) == 1 else values


if __name__ == "__main__":
    main()
