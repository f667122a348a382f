"""Profile operations into a cost model: `python profile_kernels.py [overrides]`.

Writes outputs/cost_models/<gpu-name>.json (what KernelCostModel.load picks up on that GPU) and logs an
MLflow run with the JSON and a plot. Config: conf/profile.yaml (e.g. size=tiny batch_sizes=[1,64]).
Not named profile.py: that would shadow the standard library's `profile` module.
"""
import sys

import hydra
from omegaconf import DictConfig

from ttha.config import ConfigError


@hydra.main(config_path="conf", config_name="profile", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from ttha.profiler import report, run  # torch and mlflow after Hydra has parsed the command line

    try:
        path, data = run(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(report.table(data))
    print(f"wrote {path} ({data['profile_seconds']:.1f} s)")


if __name__ == "__main__":
    main()
