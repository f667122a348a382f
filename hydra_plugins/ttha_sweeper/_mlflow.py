"""MLflow side of a sweep, on ttha.tracking: one parent run per study (kept across resumes), the overrides
that make each trial's run its child, and the fix-ups a trial cannot do itself (NaN results, failures
before the trial's run started, killed sweeps).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterable

from ttha import run_info, tracking

log = logging.getLogger(__name__)
PARENT_ATTR = "mlflow_parent_run_id"  # study user attr: resuming the study reuses its parent run


def quote(text: str) -> str:
    """A string value for a Hydra override that Hydra never reads as a number or an expression."""
    return "'" + str(text).replace("\\", "\\\\").replace("'", "\\'") + "'"


def retry_name(run: tracking.Tracker) -> str:
    """The parent run's name (a resumed sweep keeps the one it was given)."""
    return tracking.retry(run.client.get_run, run.run_id).info.run_name


class SweepTracking:
    def __init__(self, uri: str, experiment: str, study: Any, tags: dict[str, Any]):
        self.study_name, self.study = study.study_name, study
        self.run = tracking.Tracker(uri, experiment)
        if self.run.resume(study.user_attrs.get(PARENT_ATTR)):
            self.run.set_tags(tags)
        else:  # the start time tells apart sweeps of studies that share a name (other storages)
            name = f"{self.study_name} {time.strftime('%Y-%m-%d %H:%M:%S')}"
            study.set_user_attr(PARENT_ATTR, self.run.start(name, {**tags, "sweep": name}))
            self.run.set_note(f"**Sweep {name}** (study `{self.study_name}`, objectives "
                              f"{tags.get('objectives', '')}): one child run per trial; the Pareto front or "
                              f"optimisation history is the artifact plot.")
        self.parent_id: str = self.run.run_id
        self.sweep_name = retry_name(self.run)
        log.info("MLflow parent run %s (experiment %s, %s)", self.parent_id, experiment, uri)

    def trial_overrides(self, number: int, params: dict[str, Any] | None = None) -> list[str]:
        """The contract with the task's tracking (conf/tracking): its run becomes this trial's child run, named
        after the sweep, the trial number and its searched values (read from the study when not given)."""
        if params is None:
            params = self._asked_params(number)
        return [f"++tracking.parent_run_id={quote(self.parent_id)}",
                f"++tracking.tags.trial_number={number}",
                f"++tracking.tags.study_name={quote(self.study_name)}",
                f"++tracking.tags.sweep={quote(self.sweep_name)}",
                f"++tracking.tags.trial_params={quote(run_info.trial_params(params))}"]

    def _asked_params(self, number: int) -> dict[str, Any]:
        for trial in self.study.get_trials(deepcopy=False):
            if trial.number == number:
                return dict(trial.params)
        return {}

    def children(self, numbers: Iterable[int] | None = None) -> dict[int, Any]:
        """Child runs by trial number (the newest when a number has several)."""
        wanted = None if numbers is None else set(numbers)
        found: dict[int, Any] = {}
        for run in self.run.children():
            n = run.data.tags.get("trial_number")
            if n is not None and n.isdigit() and (wanted is None or int(n) in wanted):
                found[int(n)] = run
        return found

    def trial_failed(self, number: int, error: str, params: dict[str, Any], child: Any | None) -> None:
        """Mark the trial's child run FAILED with the error's last line (creating it when the task failed
        before its run started)."""
        run_id = child.info.run_id if child is not None else self.run.start_child(
            f"trial-{number}", {"trial_number": number, "study_name": self.study_name}, params)
        self.run.end_child(run_id, "FAILED", error)

    def trials_killed(self, numbers: list[int]) -> None:
        for run in self.children(numbers).values():
            if run.info.status == "RUNNING":
                self.run.end_child(run.info.run_id, "KILLED", "the sweep was killed while this trial ran")

    def log_metrics(self, metrics: list[tuple[str, float, int]]) -> None:
        for key, value, step in metrics:
            self.run.log_step(step, {key: value})
        self.run.flush()

    def log_artifacts(self, paths: Iterable[Path]) -> None:
        self.run.log_artifacts(paths)

    def end(self, status: str) -> None:
        self.run.end(status)
