"""MLflow side of a sweep, on ttha.tracking: one parent run per study (kept across resumes), the overrides
that make each trial's run its child, and the fix-ups a trial cannot do itself (NaN results, failures
before the trial's run started, killed sweeps).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable

from ttha import tracking

log = logging.getLogger(__name__)
PARENT_ATTR = "mlflow_parent_run_id"  # study user attr: resuming the study reuses its parent run


def quote(text: str) -> str:
    """A string value for a Hydra override that Hydra never reads as a number or an expression."""
    return "'" + str(text).replace("\\", "\\\\").replace("'", "\\'") + "'"


class SweepTracking:
    def __init__(self, uri: str, experiment: str, study: Any, tags: dict[str, Any]):
        self.study_name = study.study_name
        self.run = tracking.Tracker(uri, experiment)
        if self.run.resume(study.user_attrs.get(PARENT_ATTR)):
            self.run.set_tags(tags)
        else:
            study.set_user_attr(PARENT_ATTR, self.run.start(self.study_name, tags))
        self.parent_id: str = self.run.run_id
        log.info("MLflow parent run %s (experiment %s, %s)", self.parent_id, experiment, uri)

    def trial_overrides(self, number: int) -> list[str]:
        """The contract with the task's tracking (conf/tracking): its run becomes this trial's child run."""
        return [f"++tracking.parent_run_id={quote(self.parent_id)}",
                f"++tracking.tags.trial_number={number}",
                f"++tracking.tags.study_name={quote(self.study_name)}"]

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
