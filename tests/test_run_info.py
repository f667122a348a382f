"""Run names, factor tags and notes (ttha.run_info), the plots a run draws, and the names a sweep gives its
parent and children runs."""
import optuna
import pytest
from omegaconf import open_dict

from hydra_plugins.ttha_sweeper import _mlflow
from ttha import plots, run_info, tracking


def test_grid_runs_get_distinct_names_that_carry_their_factors(compose_cfg):
    grid = [compose_cfg(f"experts={e}", f"router={r}", f"seed={s}")
            for e in ("fp16", "int2") for r in ("static", "ttha") for s in (0, 1)]
    names = [run_info.run_name(c) for c in grid]
    assert len(set(names)) == len(names)
    assert names[0] == "fp16-static-saturated-s0"
    assert run_info.run_name(compose_cfg("stress=bursty", "workload=paced")) == "mixed-ttha-paced-bursty-s0"
    assert run_info.run_name(compose_cfg("tracking.run_name=mine")) == "mine"
    assert run_info.factors(grid[-1]) == {"experts": "int2", "router": "ttha", "workload": "saturated",
                                          "stress": "none", "seed": 1}


def test_a_trial_is_named_after_its_sweep_number_and_searched_values(compose_cfg):
    params = run_info.trial_params({"targets.power_w": 312.456, "objective.latency_weight": 0.5, "a.x": 1, "b.x": 2})
    assert params == "power_w=312 latency_weight=0.5 a.x=1 b.x=2"
    cfg = compose_cfg("++tracking.tags.trial_number=3", "++tracking.tags.study_name=smoke",
                      "++tracking.tags.sweep='smoke 2026-12-05 19:00:00'", f"++tracking.tags.trial_params='{params}'")
    assert run_info.run_name(cfg) == f"smoke#3 {params}"
    assert run_info.factors(cfg)["trial"] == 3 and run_info.factors(cfg)["sweep"] == "smoke 2026-12-05 19:00:00"


def test_note_carries_the_key_results(cfg):
    assert "mixed experts" in run_info.note(cfg) and "|" not in run_info.note(cfg)
    note = run_info.note(cfg, {"eval/perplexity": float("nan"), "eval/mean_power_w": 471.66,
                               "eval/energy_per_token_j": 0.788, "eval/tokens_per_s": 598.5,
                               "eval/time_over_power_target_frac": 1.0, "eval/time_over_temp_target_frac": 0.0})
    assert "| mean power | 471.7 W |" in note and "| time over power target | 100% |" in note
    assert "| perplexity | **nan** (not finite) |" in note


@pytest.mark.parametrize("which, names", [("all", ["telemetry.png", "expert_usage.png", "loss_terms.png"]),
                                          ("timeline", ["telemetry.png"]), (False, [])])
def test_plots_draw_what_tracking_plots_asks(tmp_path, which, names):
    rows = [{"step": i, "telemetry/power_w": 300.0 + i, "telemetry/temp_c": 60.0, "ttt/mode": 0,
             "experts/usage_0": 1.0} for i in range(4)]
    paths = plots.draw(which, rows, {"power_w": 350.0, "temp_c": 80.0}, [16], tmp_path)
    assert [p.name for p in paths] == names and all(p.stat().st_size > 0 for p in paths)


def test_sweep_parent_and_children_names(tmp_path):
    study = optuna.create_study(study_name="smoke")
    trial = study.ask({"targets.power_w": optuna.distributions.FloatDistribution(150, 450)})
    sweep = _mlflow.SweepTracking(f"sqlite:///{tmp_path / 'mlflow.db'}", "e", study, {"objectives": "x"})
    parent = sweep.run.client.get_run(sweep.parent_id)
    assert parent.info.run_name.startswith("smoke 20") and parent.data.tags["sweep"] == parent.info.run_name
    assert "Sweep smoke" in parent.data.tags["mlflow.note.content"]
    overrides = sweep.trial_overrides(trial.number)
    assert f"++tracking.tags.sweep='{parent.info.run_name}'" in overrides
    assert f"++tracking.tags.trial_params='power_w={trial.params['targets.power_w']:.3g}'" in overrides
    sweep.end("FINISHED")
