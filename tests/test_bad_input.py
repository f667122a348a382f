"""Bad input to train.py: one line `error: <key>=<value>: <problem>`, a non-zero exit, no traceback, nothing
run and nothing left behind. Each case starts a real train.py, which stops before any work (a few seconds)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from ttha import plots

ROOT = Path(__file__).resolve().parents[1]


def train(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in (env or os.environ).items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_refused(proc: subprocess.CompletedProcess, line: str, code: int = 2) -> None:
    """Exit `code`, no traceback, and stderr is one line starting with `line`."""
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(line), proc.stderr


@pytest.mark.parametrize("override", ["targets.power_w=nan", "targets.power_w=inf", "ttt.full_lr=nan",
                                      "pretrain.lr=-inf"])
def test_numbers_must_be_finite(tmp_path, override):
    assert_refused(train(tmp_path, "experiment=smoke_cpu", override),
                   f"error: {override}: must be a finite number")


@pytest.mark.parametrize("override, value", [("test.n_batches=2.5", "2.5"), ("seed=abc", "'abc'"),
                                             ("model.d_ff=256.0", "256.0")])
def test_integer_keys_take_integers(tmp_path, override, value):
    key = override.split("=")[0]
    assert_refused(train(tmp_path, "experiment=smoke_cpu", override), f"error: {key}={value}: must be an integer")


def test_seed_out_of_numpys_range_is_refused(tmp_path):
    assert_refused(train(tmp_path, "experiment=smoke_cpu", "seed=-1"), "error: seed=-1: must be an integer in")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_triton_kernels_need_cuda_or_the_interpreter(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # conftest sets it for the tests
    assert_refused(train(tmp_path, "experiment=smoke_cpu", "kernels=triton", env=env),
                   "error: kernels='triton': needs CUDA")


@pytest.mark.parametrize("override, line", [
    ("tracking.uri=", "error: tracking.uri='': must not be empty"),
    ("tracking.uri=foo://bar", "error: tracking.uri='foo://bar': unknown scheme 'foo'"),
    ("cost_model=", "error: cost_model='': must not be empty"),
    ("tracking.experiment=", "error: tracking.experiment='': must be a non-empty name"),
])
def test_empty_or_unknown_tracking_settings(tmp_path, override, line):
    assert_refused(train(tmp_path, "experiment=smoke_cpu", override), line)


def test_unreachable_tracking_server_fails_fast(tmp_path):
    t0 = time.perf_counter()
    proc = train(tmp_path, "experiment=smoke_cpu", "tracking.uri=http://127.0.0.1:9")
    assert_refused(proc, "error: tracking.uri='http://127.0.0.1:9': cannot connect to 127.0.0.1:9")
    assert time.perf_counter() - t0 < 60  # was 251 s of retries


def test_unknown_sweep_lists_the_sweeps(tmp_path):
    proc = train(tmp_path, "-m", "sweep=nonexistent")
    assert_refused(proc, "error: sweep=nonexistent: no such option; available: ")
    assert "smoke" in proc.stderr
    assert not (tmp_path / "outputs").exists()  # nothing ran


@pytest.mark.parametrize("override, line", [
    ("router=foo", "error: router=foo: no such option; available: static, ttha"),
    ("foo=1", "error: Could not override 'foo'."),
    ("targets.power_w=[1,", "error: targets.power_w=[1,: "),
    ("targets.power_w=${oops}", "error: targets.power_w='${oops}': Interpolation key 'oops' not found"),
])
def test_hydra_and_interpolation_errors_are_one_line(tmp_path, override, line):
    assert_refused(train(tmp_path, "experiment=smoke_cpu", override), line)


@pytest.mark.parametrize("override", ["model.d_model=1000000000", "model.n_experts=100000000",
                                      "model.d_ff=100000000000"])
def test_a_model_too_big_for_memory_is_refused_before_allocating(tmp_path, override):
    proc = train(tmp_path, "experiment=smoke_cpu", override)
    assert_refused(proc, f"error: {override}: a model of ")
    assert "needs at least" in proc.stderr


@pytest.mark.parametrize("content, problem", [
    (None, "file does not exist"),
    ("{not json", "not valid JSON"),
    ("negative", "is not a finite number >= 0"),
])
def test_bad_cost_model_files(tmp_path, content, problem):
    path = tmp_path / "costs.json"
    if content == "negative":
        data = json.loads((ROOT / "ttha" / "resources" / "cost_model_h100.json").read_text())
        data["ops"]["expert_16bit"]["latency_ms"][0] = -1.0
        content = json.dumps(data)
    if content is not None:
        path.write_text(content)
    proc = train(tmp_path, "experiment=smoke_cpu", f"cost_model={path}")
    assert_refused(proc, f"error: cost_model='{path}': ")
    assert problem in proc.stderr


@pytest.mark.parametrize("key, value", [
    ("pretrain.cache_dir", "{file}/cache"),
    ("tracking.uri", "sqlite:///{file}/mlflow.db"),
    ("tracking.uri", "{file}/mlruns"),
])
def test_unwritable_places_are_refused(tmp_path, key, value):
    """Under a regular file: unwritable for root too (chmod does not stop root)."""
    (tmp_path / "file").write_text("")
    value = value.format(file=tmp_path / "file")
    assert_refused(train(tmp_path, "experiment=smoke_cpu", f"{key}={value}"),
                   f"error: {key}='{value}': {tmp_path / 'file'} is not a folder")


def test_outputs_that_is_not_a_folder_is_one_line(tmp_path):
    (tmp_path / "outputs").write_text("")
    proc = train(tmp_path, "experiment=smoke_cpu")
    assert_refused(proc, "error: ", code=1)
    assert "outputs" in proc.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_outputs_is_one_line(tmp_path):
    (tmp_path / "outputs").mkdir(mode=0o555)
    proc = train(tmp_path, "experiment=smoke_cpu")
    assert_refused(proc, "error: ", code=1)
    assert "Permission denied" in proc.stderr


def test_bad_sweeper_storage(tmp_path):
    assert_refused(train(tmp_path, "-m", "sweep=smoke", "hydra.sweeper.storage=foo://bar"),
                   "error: hydra.sweeper.storage='foo://bar': ")


def test_a_refused_run_leaves_no_folder_behind(tmp_path):
    assert_refused(train(tmp_path, "targets.power_w=-5"), "error: targets.power_w=-5: must be > 0")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_marks_the_run_killed_in_one_line(tmp_path, sig, code):
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), "experiment=smoke_cpu", "model.d_model=64", "model.d_ff=128",
         "model.n_layers=1", "pretrain.steps=2", "pretrain.eval_batches=1", "test.n_batches=1000000",
         "tracking.plots=false", "tracking.flush_every_s=0.2", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"})
    try:
        log = tmp_path / "run" / "train.log"
        deadline = time.time() + 120
        while not (log.exists() and "MLflow:" in log.read_text()):  # the run has started
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
            time.sleep(0.2)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in err, err
    assert proc.returncode == code
    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("ttha").experiment_id])
    assert run.info.status == "KILLED"
    assert err.strip().splitlines()[-1] == f"interrupted ({sig.name}): run {run.info.run_id} marked KILLED"


def test_loss_plot_without_loss_terms_draws_no_empty_legend(tmp_path):
    rows = [{"step": i, "eval/batch_loss": 1.0} for i in range(3)]  # a static router: no loss terms
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plots.loss_terms(rows, tmp_path / "loss_terms.png")
    assert (tmp_path / "loss_terms.png").stat().st_size > 0


def test_readme_says_how_to_install_the_cpu_wheel():
    readme = (ROOT / "README.md").read_text()
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in readme


def _train_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ttha_train_cli", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("outputs, made", [
    (None, "outputs/runs/day/time"),                    # outputs/ is a file: Not a directory
    ("/proc/ttha", "/proc/ttha"),                       # nothing can be created there, not even by root
    ("elsewhere/out", "elsewhere/out/runs"),
])
def test_a_run_folder_hydra_cannot_create_names_paths_outputs(compose_cfg, tmp_path, monkeypatch, outputs, made):
    """In process: the OSError Hydra raises making the run's folder (after the paths callback's on_run_start), as
    train.py prints it; any other file keeps the plain line."""
    import errno

    from ttha import paths

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(paths, "_outputs", None)  # put back after the test
    cfg = compose_cfg(*([f"paths.outputs={outputs}"] if outputs else []))
    paths.UseOutputs().on_run_start(cfg)
    cli = _train_module()
    err = NotADirectoryError(errno.ENOTDIR, "Not a directory", made)
    assert cli.error_line(err) == (f"error: paths.outputs={outputs or 'outputs'!r}: cannot create the run folder "
                                   f"(Not a directory: {made})")
    other = FileNotFoundError(errno.ENOENT, "No such file or directory", str(tmp_path / "other"))
    assert cli.error_line(other) == f"error: {tmp_path / 'other'}: No such file or directory"
