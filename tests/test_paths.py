"""Run folders: each process gets its own, so runs started in the same second keep their own artifacts."""
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
# train.py with Hydra's ${now:} frozen: runs started at once then share the same second and microsecond.
FROZEN_TRAIN = textwrap.dedent("""
    import datetime, runpy, sys
    import hydra.core.utils as hydra_utils

    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 1, 2, 3, 4, 5, 678901)

    hydra_utils.datetime = Frozen
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")
SMALL = ["experiment=smoke_cpu", "model.d_model=64", "model.n_layers=1", "model.n_heads=2", "model.d_ff=64",
         "model.n_experts=3", "model.top_k=1", "model.max_seq_len=32", "pretrain.steps=2", "pretrain.warmup_steps=1",
         "pretrain.batch_size=2", "pretrain.seq_len=16", "pretrain.eval_batches=1", "test.n_batches=4",
         "test.warmup_batches=1", "test.batch_size=2", "test.seq_len=16", "tracking.plots=false", "pretrain.seed=0"]


def test_run_and_sweep_dirs_are_per_process_and_keep_date_and_time(compose_cfg):
    cfgs = [compose_cfg(hydra=True) for _ in range(2)]
    stamp = rf"\d{{4}}-\d\d-\d\d/\d\d-\d\d-\d\d-\d{{6}}-{os.getpid()}"
    for c in cfgs:
        assert re.fullmatch(rf"outputs/runs/{stamp}", c.hydra.run.dir), c.hydra.run.dir
        assert re.fullmatch(rf"outputs/multirun/{stamp}", c.hydra.sweep.dir), c.hydra.sweep.dir
        assert c.hydra.run.dir == c.hydra.run.dir  # resolved once per config, like ${now:}
    assert cfgs[0].hydra.run.dir != cfgs[1].hydra.run.dir  # two runs of one process differ by the microsecond


@pytest.mark.slow
def test_runs_started_in_the_same_second_keep_their_own_folders_and_artifacts(tmp_path):
    for pkg in ("a", "b", "c"):
        (tmp_path / "texts" / pkg).mkdir(parents=True)
        (tmp_path / "texts" / pkg / "m.txt").write_text(f"{pkg} = {pkg!r} * 3\n" * 200)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = {seed: subprocess.Popen(
        [sys.executable, "-c", FROZEN_TRAIN, str(ROOT / "train.py"), *SMALL, f"seed={seed}",
         f"data.corpus_dir={tmp_path / 'texts'}", f"tracking.uri=sqlite:///{tmp_path / f'store{seed}' / 'mlflow.db'}"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for seed in (1, 2)}
    for seed, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
    run_dirs = sorted((tmp_path / "outputs" / "runs" / "2026-01-02").iterdir())
    assert len(run_dirs) == 2 and all(d.name.startswith("03-04-05-678901-") for d in run_dirs), run_dirs
    seeds = {int(OmegaConf.load(d / "config.yaml").seed): d for d in run_dirs}
    assert set(seeds) == {1, 2}  # each folder holds its own run's config
    assert (seeds[1] / "steps.csv").read_text() != (seeds[2] / "steps.csv").read_text()
    pretrained = []
    for seed in (1, 2):  # and each MLflow run logged its own files
        (logged,) = (tmp_path / f"store{seed}").rglob("artifacts/config.yaml")
        assert int(OmegaConf.load(logged).seed) == seed
        assert (logged.parent / "steps.csv").read_text() == (seeds[seed] / "steps.csv").read_text()
        client = MlflowClient(f"sqlite:///{tmp_path / f'store{seed}' / 'mlflow.db'}")
        (run,) = client.search_runs([client.get_experiment_by_name("ttha").experiment_id])
        pretrained.append(run.data.metrics["pretrain/cached"])
    assert sorted(pretrained) == [0.0, 1.0]  # one key (pretrain.seed is fixed): one pretrained, the other loaded
