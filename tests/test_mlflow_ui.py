"""The MLflow UI as a researcher sees it, in a real browser (the system's Chromium, driven by Playwright): a store
holding a small grid and a small sweep opens in the runs view, with distinct run names and a trial's telemetry
plot. Screenshots are kept under outputs/ui_screenshots/."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = ROOT / "outputs" / "ui_screenshots"
TINY = ["experiment=smoke_cpu", "model.d_model=64", "model.d_ff=128", "model.n_layers=1", "pretrain.steps=2",
        "pretrain.eval_batches=1", "test.n_batches=3", "test.batch_size=2", "test.seq_len=16",
        "test.warmup_batches=1"]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (.ci/run installs the system package)")


def _train(cwd: Path, *args: str) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, *TINY], cwd=cwd, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """outputs/mlflow.db with a 2x2 grid of ad-hoc runs and a 2-trial sweep."""
    cwd = tmp_path_factory.mktemp("ui")
    _train(cwd, "-m", "experts=fp16,int2", "router=static,ttha")
    _train(cwd, "-m", "sweep=smoke", "hydra.sweeper.n_trials=2")
    return cwd / "outputs" / "mlflow.db"


@pytest.fixture(scope="module")
def server(store):
    """`mlflow server` on a free port; its whole process group is ended afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{store}",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_the_ui_opens_the_runs_view_with_distinct_names_and_a_trials_plot(store, server):
    from playwright.sync_api import sync_playwright
    client = MlflowClient(f"sqlite:///{store}")
    exp = client.get_experiment_by_name("ttha")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([exp.experiment_id])
    names = [r.info.run_name for r in runs]
    assert len(runs) == 7 and len(set(names)) == 7, names  # 4 grid runs, a sweep parent, 2 trials
    trial = next(r for r in runs if r.data.tags.get("trial_number") == "1")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 900})
            page.goto(f"{server}/#/experiments/{exp.experiment_id}?workflowType=machine_learning")
            page.get_by_text("Run Name").first.wait_for(timeout=60_000)
            for name in ("fp16-static-saturated-s0", "int2-ttha-saturated-s0"):
                page.get_by_text(name).first.wait_for(timeout=30_000)
            page.screenshot(path=str(SHOTS / "runs_view.png"))
            assert "/runs" in page.url and "Detect Issues" not in page.inner_text("body")

            page.goto(f"{server}/#/experiments/{exp.experiment_id}/runs/{trial.info.run_id}/artifacts/telemetry.png")
            # the artifact viewer shows the PNG from a blob: URL once it has fetched it
            page.wait_for_function("() => [...document.images].some(i => i.src.startsWith('blob:') && i.complete"
                                   " && i.naturalWidth > 100 && i.getBoundingClientRect().width > 100)",
                                   timeout=60_000)
            page.get_by_text("telemetry.png").first.wait_for(timeout=30_000)
            page.screenshot(path=str(SHOTS / "trial_telemetry.png"))
            assert trial.info.run_name in page.inner_text("body")
        finally:
            browser.close()
