"""ttha.paths and ttha.tracking: one outputs root for everything a run writes (Hydra's dirs, MLflow's store
and artifacts), and the MLflow helpers runs and the sweeper share."""
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ttha import paths, tracking


@pytest.fixture
def outputs(monkeypatch, tmp_path):
    """Launched from tmp_path; the process's outputs root is restored afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(paths, "_outputs", None)
    return tmp_path


@pytest.mark.parametrize("config_name", ["config", "profile"])
def test_hydra_dirs_and_the_callback_come_from_paths_outputs(compose_cfg, config_name):
    cfg = compose_cfg(config_name=config_name, hydra=True)
    assert cfg.paths.outputs == "outputs"
    assert cfg.hydra.run.dir.startswith("outputs/runs/") and cfg.hydra.sweep.dir.startswith("outputs/multirun/")
    assert cfg.hydra.callbacks.outputs._target_ == "ttha.paths.UseOutputs"
    moved = compose_cfg("paths.outputs=/scratch/o", config_name=config_name, hydra=True)
    assert moved.hydra.run.dir.startswith("/scratch/o/runs/")
    assert moved.hydra.sweep.dir.startswith("/scratch/o/multirun/")


def test_outputs_root_is_under_the_launch_dir_unless_absolute(outputs):
    assert paths.outputs_root() == outputs / "outputs"
    assert paths.use_outputs("elsewhere") == outputs / "elsewhere"
    paths.UseOutputs().on_job_start(config=OmegaConf.create({"paths": {"outputs": str(outputs / "abs")}}))
    assert paths.outputs_root() == outputs / "abs"


def test_configs_are_found_as_installed_and_sweeps_can_move(monkeypatch, tmp_path):
    assert (paths.conf_dir() / "config.yaml").is_file() and (paths.conf_dir() / "paths" / "default.yaml").is_file()
    assert (paths.sweeps_dir() / "smoke.yaml").is_file()
    monkeypatch.setenv("TTHA_SWEEPS_DIR", str(tmp_path))
    assert paths.sweeps_dir() == tmp_path


def test_default_store_and_artifacts_are_under_the_outputs_root(outputs):
    paths.use_outputs("o")
    uri = tracking.default_uri()
    assert uri == f"sqlite:///{outputs.resolve() / 'o' / 'mlflow.db'}"
    note = outputs / "note.txt"
    note.write_text("x")
    with tracking.Tracker(uri, "paths-test") as tracker:
        run_id = tracker.start("r", {"k": 1})
        tracker.log_artifacts([note])
    assert (outputs / "o" / "mlartifacts" / run_id / "artifacts" / "note.txt").read_text() == "x"
    assert sorted(p.name for p in outputs.iterdir()) == ["note.txt", "o"]  # no ./mlruns


def test_parent_run_resumes_and_records_its_children(outputs):
    uri = f"sqlite:///{outputs / 'mlflow.db'}"
    parent = tracking.Tracker(uri, "sweep-test")
    parent_id = parent.start("study", {"study_name": "s"})
    child = tracking.Tracker(uri, "sweep-test")
    with child:
        child.start("trial-0", {"trial_number": 0}, parent_id)
    failed = parent.start_child("trial-1", {"trial_number": 1}, {"x": 0.5})
    parent.end_child(failed, "FAILED", "boom: last line")
    parent.end("FINISHED")

    again = tracking.Tracker(uri, "sweep-test")
    assert not again.resume(None) and not again.resume("no-such-run")
    assert again.resume(parent_id) and again.run_id == parent_id
    kids = again.children()
    assert [k.data.tags["trial_number"] for k in kids] == ["0", "1"]
    assert [k.info.status for k in kids] == ["FINISHED", "FAILED"]
    assert kids[1].data.tags["error"] == "boom: last line" and kids[1].data.params == {"x": "0.5"}
    again.end("FINISHED")
    assert Path(tracking.artifact_location(uri).removeprefix("file://")) == outputs / "mlartifacts"
    assert tracking.artifact_location("http://mlflow:5000") is None


def test_failure_line_is_the_last_non_empty_line():
    assert tracking.failure_line(RuntimeError("trial 1 failed\nboom: last line\n\n")) == "boom: last line"
    assert tracking.failure_line(KeyError("k")) == "KeyError: 'k'"
