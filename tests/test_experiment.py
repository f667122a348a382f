"""End-to-end runs of the experiment on CPU (sim telemetry): MLflow contract, adaptation, faults."""
from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import runs
from ttha import experiment
from ttha.config import ConfigError
from ttha.costs import ESTIMATE_PATH

ROOT = Path(__file__).resolve().parents[1]  # where train.py is
CONTRACT_STEP = [
    "telemetry/power_w", "telemetry/temp_c", "telemetry/util_pct", "telemetry/sm_clock_mhz",
    "telemetry/energy_j", "loss/task", "loss/power", "loss/temp", "loss/latency", "loss/throughput_bonus",
    "loss/total", "router/balance_score", "ttt/mode",
]
CONTRACT_SUMMARY = [
    "eval/perplexity", "eval/tokens_per_s", "eval/energy_per_token_j", "eval/mean_power_w", "eval/max_temp_c",
    "eval/time_over_power_target_frac", "eval/time_over_temp_target_frac", "ttt/skip_frac",
]


@pytest.mark.slow
def test_run_logs_the_tracking_contract(tmp_path, cache_dir, monkeypatch, make_cfg):
    monkeypatch.chdir(tmp_path)
    cfg = make_cfg(tmp_path, cache_dir, "objectives=[eval/perplexity,eval/energy_per_token_j]")
    values = experiment.run(cfg)

    client, found = runs(tmp_path)
    assert len(found) == 1
    run = found[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["experts.name"] == "mixed" and run.data.params["model.d_model"] == "128"
    assert run.data.tags["telemetry.source"] == "sim"
    for key in CONTRACT_SUMMARY:
        assert key in run.data.metrics, key
    assert values == [run.data.metrics["eval/perplexity"], run.data.metrics["eval/energy_per_token_j"]]
    # prequential perplexity of a model that learned: well under the byte alphabet's 256
    assert 1.0 < run.data.metrics["eval/perplexity"] < 64
    n_batches = cfg.test.n_batches
    for key in CONTRACT_STEP + [f"experts/usage_{i}" for i in range(cfg.model.n_experts)]:
        history = client.get_metric_history(run.info.run_id, key)
        assert history, key
        if not key.startswith("loss/"):  # loss terms are logged on adapter-update steps only
            assert sorted(m.step for m in history) == list(range(n_batches)), key
    usage = [run.data.metrics[f"experts/usage_{i}"] for i in range(cfg.model.n_experts)]
    assert sum(usage) == pytest.approx(1.0, abs=1e-3)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "steps.csv", "telemetry.png", "expert_usage.png", "loss_terms.png"} <= artifacts
    csv_path = client.download_artifacts(run.info.run_id, "steps.csv", str(tmp_path))
    assert len(Path(csv_path).read_text().strip().splitlines()) == n_batches + 1


@pytest.mark.slow
def test_ttha_router_moves_tokens_to_cheap_experts_and_lowers_sim_power(tmp_path, cache_dir, monkeypatch, make_cfg):
    """Paced serving (a saturated loop stays near the cap whatever the mix, as on the H100) with a power
    target the simulated GPU is always over: TTHA shifts tokens to the quantized experts and the
    simulated power above idle falls with them. On the simulated clock the outcome does not depend on the
    host's speed or load: busy time is modelled (serve_s), not measured."""
    monkeypatch.chdir(tmp_path)
    summaries = {}
    for router in ("static", "ttha"):
        cfg = make_cfg(tmp_path, cache_dir, f"router={router}", "targets.power_w=100", "ttt=never",
                       f"cost_model={ESTIMATE_PATH}",  # roofline costs: the quantized experts are cheap
                       "workload=paced", "workload.tokens_per_s=3000", "tracking.plots=false",
                       "telemetry.sim.serve_s=0.06",  # 16-bit serving = 70 % of each 85 ms arrival interval
                       "test.n_batches=80")
        experiment.run(cfg)
    client, found = runs(tmp_path)
    for run in found:
        m = run.data.metrics
        bits = [int(b) for b in run.data.tags["expert_bits"].split(",")]
        cheap = sum(m[f"experts/mean_usage_{i}"] for i, b in enumerate(bits) if b < 16)
        summaries[run.data.params["router.name"]] = (cheap, m["eval/mean_power_w"] - cfg.telemetry.sim.idle_w)
    (cheap_static, dyn_static), (cheap_ttha, dyn_ttha) = summaries["static"], summaries["ttha"]
    assert cheap_ttha > cheap_static + 0.1
    # The simulated clock makes both runs exact (no host noise to allow for): 5 % less power above idle is a
    # real effect of the routing, not of the machine's load.
    assert dyn_ttha < 0.95 * dyn_static


def run_metrics(tmp: Path, make_cfg, cache: Path, *overrides: str) -> tuple[dict, str]:
    """(summary metrics without the host's own timings, steps.csv without its wall-time columns) of one run."""
    tmp.mkdir()
    experiment.run(make_cfg(tmp, cache, "tracking.plots=false", "router=ttha", "workload=paced",
                            "workload.tokens_per_s=3000", "targets.power_w=150", "stress=bursty", *overrides))
    client, (run,) = runs(tmp)
    metrics = {k: v for k, v in run.data.metrics.items()
               if not k.startswith(("overhead/", "pretrain/")) and k != "eval/wall_tokens_per_s"}
    steps = Path(client.download_artifacts(run.info.run_id, "steps.csv", str(tmp))).read_text()
    return metrics, steps


@pytest.mark.slow
def test_sim_runs_with_the_same_seed_are_identical(tmp_path, cache_dir, monkeypatch, make_cfg):
    """Telemetry=sim: the simulated GPU's clock moves by the modelled cost of the work, so two runs with one
    seed give identical metrics and steps.csv (telemetry, latency, usage, loss terms, TTT modes), under
    TTHA adaptation, TTT budget decisions and bursty stress; another seed gives others. A slowed host
    (a sleep in every TTT step) changes nothing but the wall-clock rate."""
    from ttha import ttt

    monkeypatch.chdir(tmp_path)
    run_metrics(tmp_path / "warm", make_cfg, cache_dir)  # fills the cache: both runs below load the model
    a, steps_a = run_metrics(tmp_path / "a", make_cfg, cache_dir)
    original = ttt.TestTimeTrainer.step

    def slow_step(self, batch, mode):
        time.sleep(0.02)
        return original(self, batch, mode)

    monkeypatch.setattr(ttt.TestTimeTrainer, "step", slow_step)
    b, steps_b = run_metrics(tmp_path / "b", make_cfg, cache_dir)
    assert a == b and steps_a == steps_b
    assert 0.0 < a["eval/time_over_power_target_frac"] < 1.0  # the router had strain to adapt to
    assert a["eval/tokens_per_s"] == pytest.approx(3000.0, rel=0.05)  # paced: arrivals set the rate
    other, _ = run_metrics(tmp_path / "c", make_cfg, cache_dir, "seed=1")
    assert other["eval/perplexity"] != a["eval/perplexity"]


@pytest.mark.parametrize("override, key", [
    ("targets.power_w=-5", "targets.power_w"),
    ("targets.temp_c=0", "targets.temp_c"),
    ("model.top_k=9", "model.top_k"),
    ("experts.bits=[16,3]", "experts.bits[1]"),
    ("objective.latency_weight=-1", "objective.latency_weight"),
    ("workload=paced workload.tokens_per_s=0", "workload.tokens_per_s"),
    ("data.corpus_dir=/does/not/exist", "data.corpus_dir"),
])
def test_bad_values_name_their_key(tmp_path, cache_dir, override, key, make_cfg):
    cfg = make_cfg(tmp_path, cache_dir, *override.split())
    with pytest.raises(ConfigError) as err:
        experiment.run(cfg)
    assert str(err.value).startswith(f"{key}=")
    assert "\n" not in str(err.value)
    assert runs(tmp_path)[1] == []  # nothing recorded, nothing RUNNING


def test_empty_corpus_folder_is_rejected(tmp_path, cache_dir, make_cfg):
    (tmp_path / "empty").mkdir()
    cfg = make_cfg(tmp_path, cache_dir, f"data.corpus_dir={tmp_path / 'empty'}")
    with pytest.raises(ConfigError, match=r"^data.corpus_dir="):
        experiment.run(cfg)


def test_nvml_without_gpu_is_rejected_before_any_run(tmp_path, cache_dir, make_cfg):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cfg = make_cfg(tmp_path, cache_dir, "telemetry=nvml")
    with pytest.raises(ConfigError, match=r"^telemetry.source="):
        experiment.run(cfg)
    assert runs(tmp_path)[1] == []


@pytest.mark.slow
@pytest.mark.parametrize("error, status", [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_interrupted_run_is_marked_and_cleaned_up(tmp_path, cache_dir, monkeypatch, error, status, make_cfg):
    from ttha import ttt

    monkeypatch.chdir(tmp_path)
    calls = {"n": 0}
    original = ttt.TestTimeTrainer.step

    def failing_step(self, batch, mode):
        calls["n"] += 1
        calls["frozen"] = gc.get_freeze_count()  # serving runs with the collector off the objects alive before
        if calls["n"] == 5:
            raise error
        return original(self, batch, mode)

    monkeypatch.setattr(ttt.TestTimeTrainer, "step", failing_step)
    cfg = make_cfg(tmp_path, cache_dir, "stress=matmul", "tracking.plots=false")
    with pytest.raises(type(error)):
        experiment.run(cfg)
    assert calls["frozen"] > 0 and gc.get_freeze_count() == 0  # and off again, however serving ended
    (run,) = runs(tmp_path)[1]
    assert run.info.status == status
    if status == "FAILED":
        assert run.data.tags["error"] == "RuntimeError: boom"
    import threading

    alive = [t.name for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive()]
    assert not any("telemetry" in n.lower() or "stress" in n.lower() or "mlflow" in n for n in alive), alive


@pytest.mark.slow
def test_cli_bad_value_exits_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "targets.power_w=-5",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: targets.power_w=-5: must be > 0"
    assert not (tmp_path / "outputs" / "mlflow.db").exists()


@pytest.mark.slow
def test_sigterm_marks_the_run_killed(tmp_path, cache_dir):
    """A real process receives SIGTERM mid-run: its MLflow run ends KILLED, its process exits."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), "experiment=smoke_cpu", f"pretrain.cache_dir={cache_dir}",
         "test.n_batches=100000", "tracking.flush_every_s=0.2", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        log = tmp_path / "run" / "train.log"
        while time.time() < deadline:
            # the run logs its MLflow URI once the database exists: opening it earlier races its creation
            if log.exists() and "MLflow:" in log.read_text():
                found = runs(tmp_path / "outputs")[1]
                if found and "telemetry/power_w" in found[0].data.metrics:
                    break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    (run,) = runs(tmp_path / "outputs")[1]
    assert run.info.status == "KILLED"
    assert proc.returncode != 0
