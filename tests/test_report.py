"""python -m ttha.report: a sweep's parent run is skipped, bad input is one line."""
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ttha import report


@pytest.fixture
def store(tmp_path) -> str:
    """An experiment as a sweep leaves it: a parent run without params and two finished trials."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("ttha", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(exp, run_name="sweep").info.run_id
    client.set_terminated(parent, "FINISHED")
    for router, power in (("static", 300.0), ("ttha", 250.0)):
        run = client.create_run(exp, tags={"mlflow.parentRunId": parent}).info.run_id
        client.log_param(run, "router.name", router)
        client.log_metric(run, "eval/mean_power_w", power)
        client.set_terminated(run, "FINISHED")
    return uri


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ttha.report", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_report_skips_runs_without_the_group_params(store, capsys):
    text = report.main(["--uri", store, "--group-by", "router.name", "--metrics", "eval/mean_power_w"])
    assert "| static | 1 | 300 ± 0 |" in text and "| ttha | 1 | 250 ± 0 |" in text
    assert "skipped 1 run(s) without param(s) router.name" in capsys.readouterr().err


def test_report_unknown_experiment_is_one_line(store, tmp_path):
    proc = cli(tmp_path, "--uri", store, "--experiment", "nope")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: experiment='nope': not in {store}"


def test_report_without_a_store_is_one_line_and_creates_none(tmp_path):
    proc = cli(tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error: --uri=sqlite:///") and len(proc.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
