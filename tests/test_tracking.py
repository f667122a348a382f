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


# -- issue 27: what the MLflow UI shows; issue 26: concurrent stores, killed runs, NaN metrics ---------------

def _uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_experiment_is_of_the_model_development_kind_also_when_it_existed(tmp_path):
    from mlflow.tracking import MlflowClient
    uri = _uri(tmp_path)
    tracking.Tracker(uri, "new")
    client = MlflowClient(uri)
    assert client.get_experiment_by_name("new").tags[tracking.EXPERIMENT_KIND] == "custom_model_development"
    client.create_experiment("old")  # as an older version of this code left it
    assert tracking.EXPERIMENT_KIND not in client.get_experiment_by_name("old").tags
    tracking.Tracker(uri, "old")
    assert client.get_experiment_by_name("old").tags[tracking.EXPERIMENT_KIND] == "custom_model_development"


def test_four_processes_create_a_fresh_store_at_once(tmp_path):
    import subprocess
    import sys
    code = ("import sys; from ttha import tracking; t = tracking.Tracker(sys.argv[1], 'e'); "
            "t.start('r'); t.end('FINISHED')")
    procs = [subprocess.Popen([sys.executable, "-c", code, _uri(tmp_path)], stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [e[-500:] for e in errors]
    from mlflow.tracking import MlflowClient
    client = MlflowClient(_uri(tmp_path))
    runs = client.search_runs([client.get_experiment_by_name("e").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 4


def test_a_sigkilled_run_is_marked_killed_when_the_next_run_starts(tmp_path):
    import signal
    import subprocess
    import sys
    code = ("import sys, time; from ttha import tracking; t = tracking.Tracker(sys.argv[1], 'e'); "
            "print(t.start('victim'), flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, _uri(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        victim = proc.stdout.readline().strip()
        assert victim
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    live = tracking.Tracker(_uri(tmp_path), "e")
    alive_id = live.start("alive")  # a live owner (this process) is never touched
    again = tracking.Tracker(_uri(tmp_path), "e")
    with again:
        again.start("next")
    victim_run = again.client.get_run(victim)
    assert victim_run.info.status == "KILLED"
    assert "killed" in victim_run.data.tags["error"] and victim_run.data.tags[tracking.OWNER_TAG].endswith(
        f":{proc.pid}")
    assert again.client.get_run(alive_id).info.status == "RUNNING"
    live.end("FINISHED")


def test_a_nan_metric_is_logged_warned_once_and_tagged(tmp_path, caplog):
    import math
    with tracking.Tracker(_uri(tmp_path), "e") as t:
        run_id = t.start("r")
        t.log_step(0, {"loss/task": float("nan"), "ok": 1.0})
        t.log_step(1, {"loss/task": float("nan")})
        t.log_summary({"eval/perplexity": float("nan")})
    run = t.client.get_run(run_id)
    assert math.isnan(run.data.metrics["eval/perplexity"]) and run.data.metrics["ok"] == 1.0
    assert run.data.tags[tracking.NONFINITE_TAG] == "eval/perplexity,loss/task"
    warned = [r.getMessage() for r in caplog.records if "not finite" in r.getMessage()]
    assert len(warned) == 2 and any("eval/perplexity" in w for w in warned)


def test_log_every_logs_each_windows_mean_at_its_last_step(tmp_path):
    """A key absent from some steps is averaged over the steps that had it; the last, partial window is logged
    when the run ends; log_summary's values are not averaged."""
    with tracking.Tracker(_uri(tmp_path), "e", log_every=4) as t:
        run_id = t.start("r")
        for step in range(10):
            t.log_step(step, {"a": float(step), **({"b": 10.0 * step} if step % 5 == 0 else {})})
        t.log_summary({"eval/perplexity": 7.0})
    history = {k: sorted((m.step, m.value) for m in t.client.get_metric_history(run_id, k)) for k in ("a", "b")}
    assert history["a"] == [(3, 1.5), (7, 5.5), (9, 8.5)]
    assert history["b"] == [(3, 0.0), (7, 50.0)]
    assert t.client.get_run(run_id).data.metrics["eval/perplexity"] == 7.0


def test_bad_plots_value_is_one_line_naming_the_key():
    from ttha.config import ConfigError
    with pytest.raises(ConfigError, match="tracking.plots"):
        tracking.tracker_from_config(OmegaConf.create({"uri": "sqlite:///x.db", "experiment": "e",
                                                      "flush_every_s": 1.0, "plots": "some"}))


def test_a_resumed_parent_of_a_killed_sweep_is_taken_over_not_killed(tmp_path):
    import socket
    import subprocess
    import sys
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    t = tracking.Tracker(_uri(tmp_path), "e")  # a RUNNING parent owned by a dead process: as a killed sweep left it
    parent = t.client.create_run(t.experiment_id, run_name="sweep",
                                 tags={tracking.OWNER_TAG: f"{socket.gethostname()}:{dead.pid}"}).info.run_id
    again = tracking.Tracker(_uri(tmp_path), "e")
    assert again.resume(parent)
    run = again.client.get_run(parent)
    assert run.info.status == "RUNNING" and "error" not in run.data.tags
    assert run.data.tags[tracking.OWNER_TAG] == tracking.owner()
    again.end("FINISHED")


@pytest.mark.parametrize("kind", ["folder", "file URI"])
def test_a_folder_tracking_uri_records_runs(monkeypatch, tmp_path, kind):
    """tracking.uri=<folder> passes the config check; MLflow 3 refuses its file store unless told, with a
    traceback before any run."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")  # absent again after the test, whatever the tracker sets
    folder = tmp_path / "mlruns"
    uri = str(folder) if kind == "folder" else folder.as_uri()
    tracker = tracking.Tracker(uri, "ttha")
    run_id = tracker.start("a run")
    tracker.log_step(0, {"eval/perplexity": 3.0})
    tracker.end("FINISHED")
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["eval/perplexity"] == 3.0
    assert folder.is_dir()
