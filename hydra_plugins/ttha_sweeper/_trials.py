"""The trials of a study shared by every sweep that runs it (a resumed one, or several at once).

- A RUNNING trial whose sweep process is gone (killed) becomes FAIL, and its parameters are queued once
  more (WAITING, Optuna's retry convention: system attrs `failed_trial`, `retry_history`); a retry that is
  killed in turn is not retried again.
- An asked trial is skipped (told PRUNED, user attr `skipped` says why, never run) when its parameter set
  is already COMPLETE, RUNNING or queued, or when the COMPLETE trials and the RUNNING or queued ones asked
  before it already make n_trials: two sweeps that ask at the same moment cannot both run the last trial.
"""
from __future__ import annotations

import datetime
import logging
import os
import socket
from typing import Any, Sequence

import optuna
from optuna.distributions import BaseDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger(__name__)
OWNER_ATTR = "sweeper_owner"  # host:pid of the sweep that asked the trial
SKIP_ATTR = "skipped"         # why a trial was told PRUNED without running
RETRY_ATTR = "retry_of"       # the killed trial whose parameters this one runs again
# A sweep names itself the owner right after asking: a trial without an owner for longer lost its sweep.
OWNERLESS_GRACE_S = 10.0
IN_FLIGHT = (TrialState.RUNNING, TrialState.WAITING)


def owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def finish(study: optuna.Study, trial: Any, state: TrialState | None = None,
           values: Sequence[float] | None = None) -> bool:
    """Tell a trial's end; False when another sweep finished it first."""
    try:
        study.tell(trial, values=values, state=state)
    except UpdateFinishedTrialError:
        return False
    except ValueError as err:
        if "Cannot tell a" not in str(err):
            raise
        return False
    except RuntimeError as err:  # GridSampler calls study.stop() when the grid is done: harmless here
        if "Study.stop" not in str(err):
            raise
    return True


def orphaned(trial: FrozenTrial, host: str) -> bool:
    """A RUNNING trial whose sweep is gone: a dead process on this host, or no owner for too long. Trials of
    sweeps on other hosts are left alone: their process cannot be checked from here."""
    owner_host, _, pid = str(trial.user_attrs.get(OWNER_ATTR, "")).rpartition(":")
    if not owner_host:
        start = trial.datetime_start
        return start is None or (datetime.datetime.now() - start).total_seconds() > OWNERLESS_GRACE_S
    return owner_host == host and pid.isdigit() and not _pid_alive(int(pid))


def fail_orphans(study: optuna.Study, distributions: dict[str, BaseDistribution]) -> list[int]:
    """Orphaned RUNNING trials → FAIL, each queued once for a retry; their numbers."""
    host, killed = socket.gethostname(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not orphaned(t, host):
            continue
        try:  # the note goes first: a finished trial takes no more attributes
            study._storage.set_trial_user_attr(t._trial_id, "error", "killed: its sweep process was gone")
        except UpdateFinishedTrialError:
            continue
        # The retry before the FAIL: killed in between, the next sweep queues it again, and the second copy
        # is skipped as a repeat; the other order could lose the retry.
        _retry(study, t, distributions)
        if finish(study, t.number, TrialState.FAIL):
            killed.append(t.number)
    if killed:
        log.warning("marked %d trial(s) left RUNNING by a killed sweep as FAIL: %s", len(killed), killed)
    return killed


def _retry(study: optuna.Study, trial: FrozenTrial, distributions: dict[str, BaseDistribution]) -> None:
    if trial.system_attrs.get("failed_trial") is not None:
        log.warning("trial %d, itself a retry, was killed too: not retried again", trial.number)
        return
    if any(trial.distributions.get(k, d) != d for k, d in distributions.items()):
        log.warning("trial %d is not retried: its parameters come from another search space", trial.number)
        return
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs={RETRY_ATTR: trial.number},
        system_attrs={**trial.system_attrs, "failed_trial": trial.number, "retry_history": [trial.number]}))
    log.info("trial %d's parameters are queued to run again", trial.number)


def counts(study: optuna.Study) -> tuple[int, int]:
    """(COMPLETE trials, RUNNING trials) in the storage now."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
    complete = sum(t.state == TrialState.COMPLETE for t in trials)
    return complete, len(trials) - complete


def ownerless_running(study: optuna.Study) -> bool:
    return any(not t.user_attrs.get(OWNER_ATTR) for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def skip_reason(study: optuna.Study, trial: optuna.Trial, n_trials: int) -> str | None:
    """Why this freshly asked trial must not run, or None."""
    others = [t for t in study.get_trials(deepcopy=False) if t.number != trial.number]
    for t in others:
        if t.state in (TrialState.COMPLETE, *IN_FLIGHT) and t.params == trial.params:
            return f"repeats the parameters of trial {t.number} ({t.state.name})"
    complete = sum(t.state == TrialState.COMPLETE for t in others)
    ahead = sum(t.state in IN_FLIGHT and t.number < trial.number for t in others)
    if complete + ahead >= n_trials:
        return f"n_trials={n_trials} reached: {complete} COMPLETE and {ahead} running or queued before it"
    return None


def skip(study: optuna.Study, trial: optuna.Trial, reason: str) -> None:
    trial.set_user_attr(SKIP_ATTR, reason)
    finish(study, trial, TrialState.PRUNED)
    log.info("trial %d skipped: %s", trial.number, reason)
