"""workload=decode on CPU (sim telemetry): the stream served one token per stream per step through the KV-cache
decoder, with the router, TTT and the simulated GPU reading the activated experts."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import runs
from ttha import config, experiment, serving_decode
from ttha.config import ConfigError

MIXTRAL_EXPERT = 2 * 4096 * 14336  # the H200 decode file's expert: the sim reads these bytes per activation
SHORT = ["test.n_batches=3", "test.seq_len=32", "test.warmup_batches=1", "tracking.plots=none"]


def steps_csv(client, run, tmp: Path) -> list[dict]:
    with open(client.download_artifacts(run.info.run_id, "steps.csv", str(tmp))) as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_decode_serves_the_same_bytes_as_the_batch_workload(tmp_path, cache_dir, monkeypatch, make_cfg):
    """Teacher-forced decode through the KV cache scores each byte as the batch forward does: the same prequential
    perplexity (static routing, no TTT); one record per decode step, p50 <= p99 latency. Four steps a replay
    score and route the same, and a replay waits for its last step's arrival: its first step queues 3 ms more."""
    monkeypatch.chdir(tmp_path)
    got = {}
    for name, workload in (("saturated", ["workload=saturated"]), ("decode", ["workload=decode"]),
                           ("decode4", ["workload=decode", "workload.steps_per_graph=4"])):
        (tmp_path / name).mkdir()
        experiment.run(make_cfg(tmp_path / name, cache_dir, *workload, "router=static", "ttt=never", *SHORT))
        client, (run,) = runs(tmp_path / name)
        got[name] = run.data.metrics, steps_csv(client, run, tmp_path / name)
    batch, (decode, rows), (decode4, rows4) = got["saturated"][0], got["decode"], got["decode4"]
    assert decode["eval/perplexity"] == pytest.approx(batch["eval/perplexity"], rel=1e-4)
    assert decode4["eval/perplexity"] == pytest.approx(decode["eval/perplexity"], rel=1e-6)
    for key in ("eval/batch_loss", "experts/activated_16bit", "experts/activated_4bit"):
        assert [float(r[key]) for r in rows4] == pytest.approx([float(r[key]) for r in rows], rel=1e-5), key
    lat = np.array([float(r["latency_ms"]) for r in rows4]).reshape(-1, 4)  # a replay a row
    assert lat[:, 0] == pytest.approx(lat[:, 3] + 3.0, rel=1e-6) and (lat[:, 3] > 0).all()
    assert batch["eval/perplexity"] < 64  # a trained model, not a uniform one that any order scores alike
    assert len(rows) == 3 * 32 and [int(r["step"]) for r in rows] == list(range(96))
    assert 0 < decode["eval/p50_latency_ms"] <= decode["eval/p99_latency_ms"]
    assert decode["eval/tokens_per_s"] == pytest.approx(4 * 1000.0, rel=0.02)  # paced: 1000 steps/s x 4 streams
    assert float(rows[-1]["eval/energy_j"]) == pytest.approx(decode["eval/energy_per_token_j"] * 96 * 4, rel=1e-9)
    # the second half's figures: its 48 steps x 4 streams, and the energy the run spent over them
    late = rows[48:]
    assert decode["eval/late_perplexity"] == pytest.approx(
        math.exp(np.mean([float(r["eval/batch_loss"]) for r in late])), rel=1e-9)
    assert decode["eval/late_mean_power_w"] == pytest.approx(np.mean([float(r["telemetry/power_w"]) for r in late]))
    grown = float(rows[-1]["eval/energy_j"]) - float(rows[47]["eval/energy_j"])
    assert grown > 0 and decode["eval/late_energy_per_token_j"] == pytest.approx(grown / (48 * 4), rel=1e-9)
    # MLflow gets one point per 16 decode steps (the window's mean, at its last step); steps.csv keeps every step
    client, (run,) = runs(tmp_path / "decode")
    history = sorted(client.get_metric_history(run.info.run_id, "telemetry/power_w"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(15, 96, 16))
    assert history[0].value == pytest.approx(sum(float(r["telemetry/power_w"]) for r in rows[:16]) / 16, rel=1e-9)


@pytest.mark.slow
def test_decode_trains_at_each_sequence_end_and_ttha_reads_fewer_16bit_experts(tmp_path, cache_dir, monkeypatch,
                                                                              make_cfg):
    """Over its power target, the TTHA router activates the 16-bit experts in fewer steps than static routing,
    and the simulated GPU (reading Mixtral-sized experts per activation) spends less energy per token, at a
    small perplexity cost; TTT decides once per finished sequence; one seed gives identical runs. Four steps a
    replay: the adapter learns from each replay while the next runs."""
    monkeypatch.chdir(tmp_path)
    common = ["ttt=always", "targets.power_w=150", "workload.steps_per_graph=4",
              f"telemetry.sim.decode_expert_params={MIXTRAL_EXPERT}", "test.n_batches=12", "test.seq_len=64",
              "test.warmup_batches=1", "tracking.plots=none"]
    got = {}
    for name, router in (("static", "static"), ("ttha", "ttha"), ("again", "ttha")):
        (tmp_path / name).mkdir()
        experiment.run(make_cfg(tmp_path / name, cache_dir, "workload=decode", f"router={router}", *common))
        client, (run,) = runs(tmp_path / name)
        rows = steps_csv(client, run, tmp_path / name)
        got[name] = {k: v for k, v in run.data.metrics.items() if not k.startswith(("overhead/", "pretrain/"))
                     and k != "eval/wall_tokens_per_s"}, rows
    (static, rows), (ttha, ttha_rows), (again, _) = got["static"], got["ttha"], got["again"]
    assert again == ttha  # the simulated clock: the same seed, the same metrics
    assert "router/bias_0" not in rows[0] and {"router/bias_5", "router/guard_scale"} <= set(ttha_rows[0])
    decided = [r for r in rows if r["ttt/mode"] != ""]
    assert [int(r["step"]) for r in decided] == [64 * i + 63 for i in range(12)]
    assert {r["ttt/mode"] for r in decided} == {"2"}  # ttt=always: full at every sequence end
    assert static["eval/time_over_power_target_frac"] > 0.5  # strain to adapt to
    assert ttha["experts/mean_activated_16bit"] < static["experts/mean_activated_16bit"] - 0.05
    assert ttha["eval/energy_per_token_j"] < 0.97 * static["eval/energy_per_token_j"]
    assert ttha["eval/perplexity"] < 1.02 * static["eval/perplexity"]


def test_activation_rates_count_experts_with_a_token_per_precision():
    counts = np.array([[0, 3, 1, 0, 0, 4], [2, 0, 0, 0, 1, 5]])  # [layers, experts]
    rates = serving_decode.activation_rates(counts, [16, 4, 2, 16, 4, 2])
    assert rates == {"experts/activated_16bit": 0.25, "experts/activated_4bit": 0.5, "experts/activated_2bit": 0.75}
    replay = np.stack([counts, np.zeros_like(counts), np.ones_like(counts)])  # [steps, layers, experts]
    by_step = serving_decode.activation_rates(replay, [16, 4, 2, 16, 4, 2])
    for key, value in rates.items():
        np.testing.assert_array_equal(by_step[key], [value, 0.0, 1.0])


def test_decode_pacing_and_expert_size_come_from_the_config(compose_cfg):
    cfg = compose_cfg("workload=decode", "workload.steps_per_s=250")
    assert serving_decode.step_interval(cfg.workload) == 0.004
    assert serving_decode.step_interval(compose_cfg("workload=decode", "workload.steps_per_s=null").workload) == 0.0
    assert serving_decode.expert_params(cfg) == 2 * cfg.model.d_model * cfg.model.d_ff
    cfg = compose_cfg("workload=decode", f"telemetry.sim.decode_expert_params={MIXTRAL_EXPERT}")
    assert serving_decode.expert_params(cfg) == MIXTRAL_EXPERT


@pytest.mark.parametrize("override, key", [
    ("workload.steps_per_s=0", "workload.steps_per_s"),
    ("workload.steps_per_s=-3", "workload.steps_per_s"),
    ("workload.steps_per_s=nan", "workload.steps_per_s"),
    ("workload.steps_per_s=inf", "workload.steps_per_s"),
    ("test.seq_len=129", "test.seq_len"),  # tiny model: max_seq_len 128
    ("test.batch_size=100000000", "test.batch_size"),  # a KV cache larger than any machine's memory
    ("telemetry.sim.decode_expert_params=0", "telemetry.sim.decode_expert_params"),
    ("tracking.log_every=0", "tracking.log_every"),
    ("tracking.log_every=2.5", "tracking.log_every"),
    ("workload.steps_per_graph=0", "workload.steps_per_graph"),
    ("workload.steps_per_graph=3", "workload.steps_per_graph"),  # test.seq_len 64 is not whole replays of 3
    ("workload.steps_per_graph=1.5", "workload.steps_per_graph"),
])
def test_bad_decode_values_name_their_key(compose_cfg, override, key):
    cfg = compose_cfg("workload=decode", "device=cpu", override)
    with pytest.raises(ConfigError) as err:
        config.validate(cfg)
    assert err.value.key == key and "\n" not in str(err.value)


def test_the_kv_cache_error_says_how_much_it_needs(compose_cfg):
    cfg = compose_cfg("workload=decode", "device=cpu", "test.batch_size=100000000")
    with pytest.raises(ConfigError, match=r"KV cache needs (\d|\.)+ (GB|TB)") as err:
        config.validate(cfg)
    m = cfg.model
    need = 2 * m.n_layers * 100000000 * cfg.test.seq_len * m.d_model * 4  # fp32 on a CPU
    assert f"{need / 1e12:.3g} TB" in str(err.value) and math.isfinite(need)


def test_each_replays_bias_is_computed_while_the_replay_before_runs(tmp_path, cache_dir, monkeypatch, make_cfg):
    """Host work hidden behind the GPU: the TTHA bias of replay r+1 is computed after replay r is launched, from
    the mean latency of replay r-1 (the last one synced), and replay r+1 is routed by it."""
    from ttha import decode, routing
    events = []
    run, prepare = decode.Decoder.run, routing.AdaptiveRouter.prepare_bias
    monkeypatch.setattr(decode.Decoder, "run", lambda self, *a: events.append(("run", None)) or run(self, *a))
    monkeypatch.setattr(routing.AdaptiveRouter, "prepare_bias",
                        lambda self, s, ms: events.append(("prepare", ms)) or prepare(self, s, ms))
    monkeypatch.chdir(tmp_path)
    experiment.run(make_cfg(tmp_path, cache_dir, "workload=decode", "router=ttha", "ttt=never",
                            "workload.steps_per_graph=4", *SHORT))
    client, (run_,) = runs(tmp_path)
    latency = np.array([float(r["latency_ms"]) for r in steps_csv(client, run_, tmp_path)]).reshape(-1, 4).mean(1)
    warm, replays = 32 // 4, 4 * 32 // 4  # replays of the warm-up batch; of all four batches
    assert [kind for kind, _ in events] == ["prepare"] + ["run", "prepare"] * replays  # the first in begin_step
    prepared = [ms for kind, ms in events if kind == "prepare"][1:]  # prepared[r]: during replay r, for r + 1
    assert prepared[warm + 1:] == pytest.approx(latency[:-1].tolist(), rel=1e-9)
    assert len(set(np.round(latency, 6))) > 1  # latencies that differ: a lag of one replay would show
