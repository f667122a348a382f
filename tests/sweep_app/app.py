"""A small Hydra app for the sweeper's tests: returns values computed from its params, and can raise,
return NaN, or SIGKILL its own process (the sweeper, with the basic launcher) on a chosen trial. Its run
is an MLflow run through ttha.tracking, exactly as train.py's, so the parent/child contract is exercised.
"""
import math
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo: hydra_plugins/ and ttha/

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402


def values(cfg: DictConfig) -> dict:
    return {"loss": (cfg.x - 1.0) ** 2 + 0.1 * cfg.y + (0.5 if cfg.kind == "b" else 0.0),
            "cost": cfg.x ** 2 + 0.01 * cfg.y}


@hydra.main(config_path=str(Path(__file__).resolve().parent / "conf"), config_name="config", version_base="1.3")
def main(cfg: DictConfig):
    from ttha import tracking

    trial = int(cfg.tracking.tags.get("trial_number", -1))
    launch = Path(hydra.core.hydra_config.HydraConfig.get().runtime.cwd)
    tracker = tracking.tracker_from_config(cfg.tracking)
    tracker.start(cfg.tracking.run_name, dict(cfg.tracking.tags), cfg.tracking.parent_run_id)
    with tracker:
        tracker.log_params({"x": cfg.x, "y": cfg.y, "kind": cfg.kind, "device": cfg.device})
        time.sleep(cfg.sleep_s)
        if trial in cfg.fail_trials:
            raise RuntimeError(f"trial {trial} failed on purpose\nboom: last line")
        marker = launch / "killed.marker"
        if trial == cfg.kill_trial and not marker.exists():
            marker.write_text("x")
            os.kill(os.getpid(), signal.SIGKILL)
        out = values(cfg)
        tracker.log_summary(out)
    if trial in cfg.nan_trials:
        return math.nan
    result = [out[name] for name in cfg.objectives]
    return result[0] if len(result) == 1 else result


if __name__ == "__main__":
    main()
