"""Optuna sweeper plugin (hydra_plugins/ttha_sweeper) against the small app in tests/sweep_app.

Sweeps run in-process (basic launcher) to share one set of imports; the parallel (joblib) test runs in a
subprocess. MLflow results are read straight from its sqlite file. Resumed, killed and concurrent sweeps:
test_sweeper_resume.py.
"""
import math
import sqlite3

import optuna
import pytest
import yaml
from hydra.errors import CompactHydraException
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from sweep_app.harness import (APP_DIR, children, mlflow_runs, parents, run_app, run_subprocess, states,
                               study)

from hydra_plugins.ttha_sweeper import _space
from hydra_plugins.ttha_sweeper._errors import SweepConfigError
from hydra_plugins.ttha_sweeper.config import register_named_sweeps

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory):
    """One MLflow sqlite file for the module (each new one runs MLflow's migrations); tests tell runs apart by
    study."""
    return tmp_path_factory.mktemp("mlflow") / "mlflow.db"


def error_lines(capsys):
    """stderr without Hydra's standard hint about HYDRA_FULL_ERROR."""
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "HYDRA_FULL_ERROR" not in ln]


# -- grammar --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("expr, expected", [
    ("choice(1, 2.5, abc, true)", CategoricalDistribution([1, 2.5, "abc", True])),
    ("range(1, 5)", IntDistribution(1, 4, step=1)),              # half-open, as Hydra's range
    ("range(0, 10, 3)", IntDistribution(0, 9, step=3)),
    ("range(0, 1, 0.25)", FloatDistribution(0.0, 0.75, step=0.25)),
    ("interval(1, 5)", FloatDistribution(1.0, 5.0)),
    ("tag(log, interval(0.001, 1))", FloatDistribution(0.001, 1.0, log=True)),
    ("tag(int, interval(2, 64))", IntDistribution(2, 64)),
    ("tag(int, log, interval(2, 64))", IntDistribution(2, 64, log=True)),
])
def test_grammar_gives_optuna_distributions(expr, expected):
    space = _space.build({"a.b": expr}, [])
    assert space.distributions == {"a.b": expected}
    assert space.fixed == {}


def test_fixed_values_and_command_line_join_the_space():
    space = _space.build({"x": "interval(0, 1)", "kind": "a", "n": 3}, ["x=choice(0.5, 0.7)", "y=range(0, 3)"])
    assert space.distributions == {"x": CategoricalDistribution([0.5, 0.7]), "y": IntDistribution(0, 2)}
    assert space.fixed == {"kind": "a", "n": "3"}


@pytest.mark.parametrize("expr, problem", [
    ("interval(1,", "malformed search-space expression"),
    ("interval(5, 1)", "low < high"),
    ("tag(log, interval(0, 1))", "low > 0"),
    ("tag(foo, interval(0, 1))", "unknown tag 'foo'"),
    ("range(3, 3)", "range is empty"),
])
def test_grammar_errors_name_the_key(expr, problem):
    with pytest.raises(SweepConfigError) as err:
        _space.build({"targets.power_w": expr}, [])
    assert str(err.value).startswith("hydra.sweeper.params.targets.power_w=")
    assert problem in str(err.value) and "\n" not in str(err.value)


def test_sweep_config_error_is_the_plugins_own_one_line_error():
    err = SweepConfigError("hydra.sweeper.n_trials", 0, "must be an integer > 0")
    assert str(err) == "hydra.sweeper.n_trials=0: must be an integer > 0"
    assert isinstance(err, ValueError) and isinstance(err, CompactHydraException)
    assert not any(c.__module__.startswith("ttha") for c in type(err).__mro__)  # works for any Hydra app


@pytest.mark.parametrize("url", ["sqlite:///{file}/optuna.db", "journal:{file}/optuna.log",
                                 "sqlite:////proc/ttha-sweep/optuna.db"])
def test_a_storage_folder_that_cannot_be_created_is_one_line(tmp_path, url):
    from hydra_plugins.ttha_sweeper._storage import make_storage

    (tmp_path / "file").write_text("")
    url = url.format(file=tmp_path / "file")
    with pytest.raises(SweepConfigError) as err:
        make_storage(url, tmp_path)
    assert str(err.value).startswith(f"hydra.sweeper.storage={url!r}: cannot create ")


# -- sweeps ---------------------------------------------------------------------------------------------

def test_sweep_resumes_up_to_n_trials_with_one_parent_run(monkeypatch, tmp_path, mlflow_db):
    args = ["hydra.sweeper.study_name=s", "x=interval(-1, 2)", "y=range(0, 3)", "kind=b"]
    assert run_app(monkeypatch, tmp_path, mlflow_db, "hydra.sweeper.n_trials=4", *args) == 0
    assert states(tmp_path, "s") == ["COMPLETE"] * 4
    runs = mlflow_runs(mlflow_db)
    [parent] = parents(runs, "s")
    kids = children(runs, parent)
    assert sorted(kids) == [0, 1, 2, 3]
    trials = {t.number: t for t in study(tmp_path, "s").trials}
    for n, run in kids.items():  # each child carries its trial's params and value
        assert run["status"] == "FINISHED" and run["tags"]["study_name"] == "s"
        assert float(run["params"]["x"]) == pytest.approx(trials[n].params["x"])
        assert int(run["params"]["y"]) == trials[n].params["y"] and run["params"]["kind"] == "b"
        assert trials[n].value == pytest.approx((trials[n].params["x"] - 1) ** 2 + 0.1 * trials[n].params["y"] + 0.5)
    results = yaml.safe_load((tmp_path / "multirun" / "optimization_results.yaml").read_text())
    best = min(trials.values(), key=lambda t: t.value)
    assert results["best_value"] == pytest.approx(best.value) and results["best_trial"] == best.number
    assert (tmp_path / "multirun" / "optimization_history.png").stat().st_size > 1000
    assert runs[parent]["status"] == "FINISHED" and runs[parent]["tags"]["study_name"] == "s"
    assert (mlflow_db.parent / "mlartifacts" / parent / "artifacts" / "optimization_results.yaml").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multirun", "outputs"]  # no ./mlruns

    assert run_app(monkeypatch, tmp_path, mlflow_db, "hydra.sweeper.n_trials=4", *args) == 0  # nothing left to do
    assert states(tmp_path, "s") == ["COMPLETE"] * 4
    assert run_app(monkeypatch, tmp_path, mlflow_db, "hydra.sweeper.n_trials=6", *args) == 0  # exactly 2 more
    assert states(tmp_path, "s") == ["COMPLETE"] * 6
    runs = mlflow_runs(mlflow_db)
    assert parents(runs, "s") == [parent] and sorted(children(runs, parent)) == list(range(6))


def test_failed_and_nan_trials_are_fail_and_the_sweep_goes_on(monkeypatch, tmp_path, mlflow_db):
    rc = run_app(monkeypatch, tmp_path, mlflow_db, "hydra.sweeper.study_name=f", "hydra.sweeper.n_trials=3",
                 "hydra.sweeper.max_failure_rate=0.7", "x=interval(0, 1)", "fail_trials=[1]", "nan_trials=[2]")
    assert rc == 0
    trials = study(tmp_path, "f").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "FAIL", "COMPLETE", "COMPLETE"]
    assert trials[1].user_attrs["error"] == "boom: last line"
    assert trials[2].user_attrs["error"] == "objective loss=nan is not finite"
    runs = mlflow_runs(mlflow_db)
    kids = children(runs, parents(runs, "f")[0])
    assert [kids[n]["status"] for n in range(5)] == ["FINISHED", "FAILED", "FAILED", "FINISHED", "FINISHED"]
    assert kids[1]["tags"]["error"] == "boom: last line"
    assert kids[2]["tags"]["error"] == "objective loss=nan is not finite"


def test_too_many_failures_stop_the_sweep_with_one_line(monkeypatch, tmp_path, mlflow_db, capsys):
    rc = run_app(monkeypatch, tmp_path, mlflow_db, "hydra.sweeper.study_name=g", "hydra.sweeper.n_trials=4",
                 "hydra.sweeper.max_failure_rate=0.25", "x=interval(0, 1)", "fail_trials=[0,2]")
    assert rc == 1
    assert states(tmp_path, "g") == ["COMPLETE", "FAIL", "FAIL"]
    line = error_lines(capsys)[-1]
    assert line.startswith("hydra.sweeper.max_failure_rate=0.25: 2 trial(s) failed")
    runs = mlflow_runs(mlflow_db)
    assert runs[parents(runs, "g")[0]]["status"] == "FAILED"


def test_named_multi_objective_sweep_writes_the_pareto_front(monkeypatch, tmp_path, mlflow_db):
    assert register_named_sweeps(APP_DIR / "sweeps") == ["app_pareto"]
    assert run_app(monkeypatch, tmp_path, mlflow_db, "sweep=app_pareto") == 0
    st = study(tmp_path, "app_pareto")
    assert len(st.trials) == 5 and len(st.directions) == 2
    results = yaml.safe_load((tmp_path / "multirun" / "optimization_results.yaml").read_text())
    front = {s["trial"]: s["values"] for s in results["solutions"]}
    assert sorted(front) == sorted(t.number for t in st.best_trials)
    for t in st.trials:  # no trial dominates a front point
        for v in front.values():
            assert not (t.values[0] < v["loss"] and t.values[1] < v["cost"])
    assert (tmp_path / "multirun" / "pareto_front.png").stat().st_size > 1000
    [parent] = parents(mlflow_runs(mlflow_db), "app_pareto")
    con = sqlite3.connect(mlflow_db)
    size = con.execute("select value from metrics where key='pareto/size' and run_uuid=?", (parent,)).fetchone()[0]
    assert size == len(front)


# -- bad input: one line naming the key, nothing written to the study ------------------------------------

@pytest.mark.parametrize("overrides, start", [
    (["+hydra.sweeper.params.y='interval(1,'"], "hydra.sweeper.params.y='interval(1,': malformed search-space expression"),
    (["+hydra.sweeper.params.y='interval(5, 1)'"], "hydra.sweeper.params.y='interval(5, 1)': interval needs low < high"),
    (["hydra.sweeper.sampler._target_=optuna.samplers.NoSuchSampler"], "hydra.sweeper.sampler._target_="),
    (["hydra.sweeper.sampler._target_=os.system"], "hydra.sweeper.sampler._target_='os.system': unknown sampler"),
    (["hydra.sweeper.direction=[minimize,maximize]"], "hydra.sweeper.direction=['minimize', 'maximize']: 2 direction(s) for 1 objective(s)"),
    (["hydra.sweeper.direction=up"], "hydra.sweeper.direction='up': must be minimize or maximize"),
    (["hydra.sweeper.n_trials=0"], "hydra.sweeper.n_trials=0: must be an integer > 0"),
    (["hydra.sweeper.max_failure_rate=2"], "hydra.sweeper.max_failure_rate=2"),
    (["nosuchkey=interval(0, 1)"], "hydra.sweeper.params="),
    (["hydra.sweeper.custom_search_space=hydra_plugins.nowhere.fn"],
     "hydra.sweeper.custom_search_space='hydra_plugins.nowhere.fn': cannot import"),
    (["hydra.sweeper.custom_search_space=os.system"],  # only the sweeps' own code is imported
     "hydra.sweeper.custom_search_space='os.system': must name a function f(cfg, trial) of a module under "
     "ttha.sweeps or hydra_plugins"),
    (["hydra.sweeper.custom_search_space=hydra_plugins.ttha_sweeper.config.dataclass"],  # lent, not defined there
     "hydra.sweeper.custom_search_space='hydra_plugins.ttha_sweeper.config.dataclass': is not a function defined"),
])
def test_bad_input_is_one_line_before_any_trial(monkeypatch, tmp_path, mlflow_db, capsys, overrides, start):
    rc = run_app(monkeypatch, tmp_path, mlflow_db, "hydra.sweeper.study_name=bad", "x=interval(0, 1)", *overrides)
    err = error_lines(capsys)
    assert rc == 1 and len(err) == 1 and err[0].startswith(start), err
    assert not (tmp_path / "outputs").exists()  # no study, no trial
    assert not mlflow_db.exists() or not parents(mlflow_runs(mlflow_db), "bad")  # no MLflow run


def test_unknown_sampler_group_is_rejected(monkeypatch, tmp_path, mlflow_db, capsys):
    assert run_app(monkeypatch, tmp_path, mlflow_db, "hydra/sweeper/sampler=nosuch") == 1
    assert "hydra/sweeper/sampler/nosuch" in error_lines(capsys)[0]
    assert not (tmp_path / "outputs").exists()


# -- parallel trials (a subprocess) ---------------------------------------------------------------------

@pytest.mark.slow
def test_two_parallel_jobs_on_sqlite_record_every_trial(tmp_path, mlflow_db):
    proc = run_subprocess(tmp_path, mlflow_db, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2",
                       "hydra.sweeper.study_name=p", "hydra.sweeper.n_trials=4", "x=interval(0, 1)", "sleep_s=0.2",
                       "hydra.sweeper.devices=[cuda:0,cuda:1]")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert states(tmp_path, "p") == ["COMPLETE"] * 4
    runs = mlflow_runs(mlflow_db)
    kids = children(runs, parents(runs, "p")[0])
    assert sorted(kids) == [0, 1, 2, 3] and all(k["status"] == "FINISHED" for k in kids.values())
    assert [kids[n]["params"]["device"] for n in range(4)] == ["cuda:0", "cuda:1"] * 2  # one GPU per job
    values = {t.number: t.value for t in study(tmp_path, "p").trials}
    con = sqlite3.connect(mlflow_db)
    for n, run in kids.items():  # the summary metric the child logged is the trial's value
        run_id = [rid for rid, r in runs.items() if r is run][0]
        loss = con.execute("select value from metrics where run_uuid=? and key='loss'", (run_id,)).fetchone()[0]
        assert math.isclose(loss, values[n], rel_tol=1e-9)
