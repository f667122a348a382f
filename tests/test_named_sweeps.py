"""The shipped named sweeps (sweeps/*.yaml) compose with train.py's config, and `train.py -m sweep=smoke`
runs end to end: COMPLETE trials in the study, one MLflow parent run with a child per trial, and nothing
written outside outputs/."""
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from omegaconf import open_dict

from ttha import config as config_mod
from ttha.paths import sweeps_dir

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted(p.stem for p in sweeps_dir().glob("*.yaml"))


def test_the_shipped_sweeps_are_the_ones_of_the_sweeps_folder():
    assert SWEEPS == sorted(p.stem for p in (ROOT / "sweeps").glob("*.yaml")) and "smoke" in SWEEPS


@pytest.mark.parametrize("name", SWEEPS)
def test_every_shipped_sweep_composes_and_validates(compose_cfg, name):
    cfg = compose_cfg(f"sweep={name}", hydra=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper.params, name  # every named sweep searches something
    if "optuna" in sweeper._target_.lower() or "ttha_sweeper" in sweeper._target_:
        directions = sweeper.direction if not isinstance(sweeper.direction, str) else [sweeper.direction]
        assert len(directions) == len(cfg.objectives), name
    with open_dict(cfg):
        del cfg["hydra"]
    config_mod.validate(cfg)  # the fixed keys it sets are valid values


@pytest.mark.slow
def test_smoke_sweep_runs_end_to_end_and_resumes(tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "sweep=smoke", "hydra.sweeper.n_trials=2",
           "test.n_batches=6", "pretrain.steps=20"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["outputs"]
    assert not (tmp_path / "outputs" / "mlruns").exists() and (tmp_path / "outputs" / "mlartifacts").is_dir()
    storage = f"sqlite:///{tmp_path / 'outputs' / 'optuna.db'}"
    trials = optuna.load_study(study_name="smoke", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert all(len(t.values) == 2 for t in trials)  # energy per token, perplexity
    con = sqlite3.connect(tmp_path / "outputs" / "mlflow.db")
    parents = con.execute("select distinct value from tags where key='mlflow.parentRunId'").fetchall()
    kids = con.execute("select t.value, r.status from tags t join runs r on r.run_uuid=t.run_uuid "
                       "where t.key='trial_number'").fetchall()
    assert len(parents) == 1 and sorted(kids) == [("0", "FINISHED"), ("1", "FINISHED")]
    (status,) = con.execute("select status from runs where run_uuid=?", parents[0]).fetchone()
    assert status == "FINISHED"
    [sweep_dir] = (tmp_path / "outputs" / "multirun").glob("*/*")  # <date>/<time>
    assert (sweep_dir / "optimization_results.yaml").exists() and (sweep_dir / "0" / ".hydra").is_dir()
    # the same command again: the study already has its 2 trials, nothing is added
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(optuna.load_study(study_name="smoke", storage=storage).trials) == 2


def test_the_decode_tradeoff_sweep_serves_ttha_in_decode_over_a_preset(compose_cfg):
    cfg = compose_cfg("experiment=decode_h200", "sweep=decode_tradeoff", hydra=True)
    assert (cfg.router.name, cfg.workload.kind, cfg.model.name) == ("ttha", "decode", "decode")
    assert set(cfg.hydra.sweeper.params) == {"router.max_drift", "objective.power_weight", "router.max_bias",
                                              "router.slope_span", "router.per_expert", "targets.power_w"}
