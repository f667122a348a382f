"""Helpers of the sweeper's tests: run tests/sweep_app/app.py as a sweep (in-process or as a subprocess) and
read what it left: the Optuna study and the MLflow runs (straight from MLflow's sqlite file)."""
import importlib.util
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import optuna
from hydra.core.global_hydra import GlobalHydra

APP_DIR = Path(__file__).parent
APP = APP_DIR / "app.py"
BASE = ["-m", "hydra/sweeper=optuna", "hydra.sweeper.sampler.seed=0", "hydra.sweep.dir=multirun"]


def _load_app():
    spec = importlib.util.spec_from_file_location("sweep_app_main", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_app(monkeypatch, tmp_path, db, *overrides) -> int:
    """`python app.py -m hydra/sweeper=optuna <overrides>` in-process, launched from tmp_path; exit code."""
    app = _load_app()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["app.py", *BASE, f"tracking.uri=sqlite:///{db}", *overrides])
    GlobalHydra.instance().clear()
    try:
        app.main()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    finally:
        GlobalHydra.instance().clear()
    return 0


def app_command(db, *overrides) -> list[str]:
    return [sys.executable, str(APP), *BASE, f"tracking.uri=sqlite:///{db}", *overrides]


def app_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(APP_DIR.parents[1])}


def run_subprocess(tmp_path, db, *overrides, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(app_command(db, *overrides), cwd=tmp_path, env=app_env(), capture_output=True,
                          text=True, timeout=timeout)


def study(tmp_path, name):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/outputs/optuna.db")


def states(tmp_path, name):
    return sorted(t.state.name for t in study(tmp_path, name).trials)


def param_sets(trials):
    return [tuple(sorted(t.params.items())) for t in trials]


def mlflow_runs(db):
    """{run_id: {"status", "tags", "params"}} from the MLflow sqlite file."""
    con = sqlite3.connect(db)
    runs = {rid: {"status": status, "tags": {}, "params": {}}
            for rid, status in con.execute("select run_uuid, status from runs")}
    for key, value, rid in con.execute("select key, value, run_uuid from tags"):
        runs[rid]["tags"][key] = value
    for key, value, rid in con.execute("select key, value, run_uuid from params"):
        runs[rid]["params"][key] = value
    con.close()
    return runs


def children(runs, parent_id):
    return {int(r["tags"]["trial_number"]): r for r in runs.values()
            if r["tags"].get("mlflow.parentRunId") == parent_id}


def parents(runs, study_name):
    return [rid for rid, r in runs.items()
            if "mlflow.parentRunId" not in r["tags"] and r["tags"].get("study_name") == study_name]
