"""The sweeper across runs of one study: a resumed sweep continues the sampler's sequence and never repeats a
parameter set, a killed trial is FAIL and its parameters run once more, two sweeps of one study at once end
at exactly n_trials COMPLETE, and custom_search_space imports only the sweeps' own code."""
import os
import socket
import subprocess
import sys

import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial
from sweep_app.harness import (app_command, app_env, children, mlflow_runs, param_sets, parents, run_app,
                               run_subprocess, study)

from hydra_plugins.ttha_sweeper import _impl, _trials
from ttha import tracking

optuna.logging.set_verbosity(optuna.logging.WARNING)
SPACE = {"x": FloatDistribution(0.0, 1.0), "y": IntDistribution(0, 2)}


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory):
    """One MLflow store for the module, created before any sweep (so concurrent sweeps find it ready)."""
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    tracking.Tracker(f"sqlite:///{db}", "sweep_app").start("init", {})
    return db


def complete(st):
    return [t for t in st.trials if t.state == TrialState.COMPLETE]


# -- resume: the sampler goes on where the study is ------------------------------------------------------

def test_resumed_sweep_draws_new_values_the_same_as_one_uninterrupted(monkeypatch, tmp_path, mlflow_db):
    args = ["hydra.sweeper.study_name=r", "x=interval(-1, 2)", "y=range(0, 3)"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert run_app(monkeypatch, tmp_path / "a", mlflow_db, "hydra.sweeper.n_trials=2", *args) == 0
    assert run_app(monkeypatch, tmp_path / "a", mlflow_db, "hydra.sweeper.n_trials=4", *args) == 0
    resumed = study(tmp_path / "a", "r").trials
    assert [t.state for t in resumed] == [TrialState.COMPLETE] * 4
    assert len(set(param_sets(resumed))) == 4  # trials 2 and 3 do not replay trials 0 and 1
    assert run_app(monkeypatch, tmp_path / "b", mlflow_db, "hydra.sweeper.n_trials=4", *args) == 0
    assert param_sets(study(tmp_path / "b", "r").trials) == param_sets(resumed)  # trial k: seed (0, k)


def test_a_finite_space_runs_each_parameter_set_once(monkeypatch, tmp_path, mlflow_db):
    assert run_app(monkeypatch, tmp_path, mlflow_db, "hydra.sweeper.study_name=fin", "hydra.sweeper.n_trials=5",
                   "y=range(0, 3)", "kind=choice(a, b)") == 0
    st = study(tmp_path, "fin")
    done = complete(st)
    assert len(done) == 5 and len(set(param_sets(done))) == 5  # 5 of the 6 sets, none twice
    for t in st.trials:  # the rest were asked, found repeated, and never run
        assert t.state == TrialState.COMPLETE or t.user_attrs["skipped"].startswith("repeats the parameters")
    runs = mlflow_runs(mlflow_db)
    assert sorted(children(runs, parents(runs, "fin")[0])) == sorted(t.number for t in done)
    results = yaml.safe_load((tmp_path / "multirun" / "optimization_results.yaml").read_text())
    assert results["n_complete"] == 5 and results["n_skipped"] == len(st.trials) - 5


def test_a_space_smaller_than_n_trials_runs_it_once(monkeypatch, tmp_path, mlflow_db):
    assert run_app(monkeypatch, tmp_path, mlflow_db, "hydra.sweeper.study_name=small", "hydra.sweeper.n_trials=5",
                   "y=range(0, 3)") == 0
    assert sorted(t.params["y"] for t in complete(study(tmp_path, "small"))) == [0, 1, 2]


def test_only_repeats_stop_the_sweep_with_one_line(monkeypatch, tmp_path, mlflow_db, capsys):
    monkeypatch.setattr(_impl, "MAX_SKIPS", 3)
    monkeypatch.syspath_prepend(str(tmp_path / "plugins"))
    (tmp_path / "plugins" / "hydra_plugins").mkdir(parents=True)
    (tmp_path / "plugins" / "hydra_plugins" / "ttha_test_space.py").write_text(
        "def one_kind(cfg, trial):\n    trial.suggest_categorical('kind', ['b'])\n")
    rc = run_app(monkeypatch, tmp_path, mlflow_db, "hydra.sweeper.study_name=rep", "hydra.sweeper.n_trials=3",
                 "hydra.sweeper.custom_search_space=hydra_plugins.ttha_test_space.one_kind")
    assert rc == 1
    st = study(tmp_path, "rep")
    assert [t.state for t in st.trials] == [TrialState.COMPLETE] + [TrialState.PRUNED] * 3
    assert st.trials[0].params == {"kind": "b"}  # the function's parameter reached the trial
    runs = mlflow_runs(mlflow_db)
    assert children(runs, parents(runs, "rep")[0])[0]["params"]["kind"] == "b"
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "HYDRA_FULL_ERROR" not in ln]
    assert err[-1].startswith("hydra.sweeper.params: 3 trials in a row repeated a parameter set")


def test_custom_search_space_outside_the_sweeps_code_is_never_imported(monkeypatch, tmp_path, mlflow_db, capsys):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "evil_space.py").write_text("open('imported.marker', 'w').close()\ndef fn(cfg, trial): pass\n")
    rc = run_app(monkeypatch, tmp_path, mlflow_db, "hydra.sweeper.study_name=evil", "x=interval(0, 1)",
                 "hydra.sweeper.custom_search_space=evil_space.fn")
    assert rc == 1 and not (tmp_path / "imported.marker").exists() and "evil_space" not in sys.modules
    assert "must name a function f(cfg, trial) of a module under" in capsys.readouterr().err


# -- killed trials ---------------------------------------------------------------------------------------

def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_an_orphaned_trial_is_fail_and_retried_once():
    st = optuna.create_study()
    host, dead = socket.gethostname(), _dead_pid()
    st.add_trial(create_trial(params={"x": 0.5, "y": 1}, distributions=SPACE, value=1.0))
    live = st.ask(SPACE)
    live.set_user_attr(_trials.OWNER_ATTR, f"{host}:{os.getpid()}")
    remote = st.ask(SPACE)
    remote.set_user_attr(_trials.OWNER_ATTR, f"another-host:{dead}")
    young = st.ask(SPACE)  # just asked by a sweep that has not named itself yet
    killed = st.ask(SPACE)
    killed.set_user_attr(_trials.OWNER_ATTR, f"{host}:{dead}")
    assert _trials.fail_orphans(st, SPACE) == [killed.number]
    by_number = {t.number: t for t in st.trials}
    assert {n: by_number[n].state for n in (live.number, remote.number, young.number)} == {
        live.number: TrialState.RUNNING, remote.number: TrialState.RUNNING, young.number: TrialState.RUNNING}
    assert by_number[killed.number].state == TrialState.FAIL
    [retry] = st.get_trials(states=(TrialState.WAITING,))
    assert retry.params == killed.params and retry.user_attrs == {_trials.RETRY_ATTR: killed.number}
    popped = st.ask(SPACE)  # the next ask runs the killed trial's parameters
    assert popped.number == retry.number and popped.params == killed.params
    popped.set_user_attr(_trials.OWNER_ATTR, f"{host}:{dead}")  # ... and is killed too: not retried again
    assert _trials.fail_orphans(st, SPACE) == [popped.number]
    assert not st.get_trials(states=(TrialState.WAITING,))


def test_the_trials_asked_past_n_trials_or_repeating_a_set_are_skipped():
    st = optuna.create_study()
    for i in range(4):
        st.add_trial(create_trial(params={"x": i / 10, "y": 0}, distributions=SPACE, value=float(i)))
    first, second = st.ask(SPACE), st.ask(SPACE)  # two sweeps ask at once for the 5th of 5 trials
    assert _trials.skip_reason(st, first, 5) is None
    assert _trials.skip_reason(st, second, 5).startswith("n_trials=5 reached: 4 COMPLETE and 1 running")
    st.enqueue_trial({"x": 0.2, "y": 0})
    again = st.ask(SPACE)
    assert _trials.skip_reason(st, again, 10) == "repeats the parameters of trial 2 (COMPLETE)"


@pytest.mark.slow
def test_killed_sweep_resumes_retries_the_killed_trial_and_repeats_nothing(tmp_path, mlflow_db):
    args = ["hydra.sweeper.study_name=k", "hydra.sweeper.n_trials=4", "x=interval(0, 1)", "kill_trial=2"]
    first = run_subprocess(tmp_path, mlflow_db, *args)
    assert first.returncode == -9, first.stderr[-2000:]
    assert [t.state.name for t in study(tmp_path, "k").trials] == ["COMPLETE", "COMPLETE", "RUNNING"]
    second = run_subprocess(tmp_path, mlflow_db, *args)
    assert second.returncode == 0, second.stderr[-2000:]
    trials = study(tmp_path, "k").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert trials[3].params == trials[2].params and trials[3].user_attrs[_trials.RETRY_ATTR] == 2
    assert len(set(param_sets(complete(study(tmp_path, "k"))))) == 4
    runs = mlflow_runs(mlflow_db)
    [parent] = parents(runs, "k")
    kids = children(runs, parent)
    assert kids[2]["status"] == "KILLED" and runs[parent]["status"] == "FINISHED"
    assert [kids[n]["status"] for n in (0, 1, 3, 4)] == ["FINISHED"] * 4


# -- two sweeps of one study at once ----------------------------------------------------------------------

@pytest.mark.slow
def test_two_sweeps_of_one_study_at_once_end_at_n_trials_without_repeats(tmp_path, mlflow_db):
    args = ["hydra.sweeper.study_name=two", "hydra.sweeper.n_trials=6", "x=interval(0, 1)", "sleep_s=0.3"]
    procs = [subprocess.Popen(app_command(mlflow_db, *args), cwd=tmp_path, env=app_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    st = study(tmp_path, "two")
    assert len(complete(st)) == 6
    ran = [t for t in st.trials if "skipped" not in t.user_attrs]
    assert len(set(param_sets(ran))) == len(ran)  # no parameter set ran twice
    assert all(t.state == TrialState.PRUNED for t in st.trials if "skipped" in t.user_attrs)
