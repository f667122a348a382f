"""MLflow side of a sweep: one parent run per study, the overrides that make each trial's run its child,
and the fix-ups the trial cannot do itself (NaN results, failures before the trial's run started, killed
sweeps). All writes are batched (log_batch); sqlite 'database is locked' is retried.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterable

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

log = logging.getLogger(__name__)
PARENT_ATTR = "mlflow_parent_run_id"  # study user attr: resuming the study reuses its parent run


def _retry(fn, *args, attempts: int = 8, **kwargs):
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # mlflow wraps sqlalchemy's OperationalError
            if "locked" not in str(err).lower() or i == attempts - 1:
                raise
            time.sleep(0.05 * 2**i)


def quote(text: str) -> str:
    """A string value for a Hydra override that Hydra never reads as a number or an expression."""
    return "'" + str(text).replace("\\", "\\\\").replace("'", "\\'") + "'"


def default_uri(launch_dir: Path) -> str:
    path = (Path(launch_dir) / "outputs" / "mlflow.db").resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


class SweepTracking:
    def __init__(self, uri: str, experiment: str, study: Any, tags: dict[str, Any]):
        self.uri, self.study_name = uri, study.study_name
        self.client = MlflowClient(tracking_uri=uri)
        exp = _retry(self.client.get_experiment_by_name, experiment)
        self.experiment_id = exp.experiment_id if exp else _retry(self.client.create_experiment, experiment)
        self.parent_id = self._reuse_parent(study.user_attrs.get(PARENT_ATTR))
        if self.parent_id is None:
            run = _retry(self.client.create_run, self.experiment_id, run_name=self.study_name,
                         tags={k: str(v) for k, v in tags.items()})
            self.parent_id = run.info.run_id
            study.set_user_attr(PARENT_ATTR, self.parent_id)
        else:
            self.set_tags(tags)
        log.info("MLflow parent run %s (experiment %s, %s)", self.parent_id, experiment, uri)

    def _reuse_parent(self, run_id: str | None) -> str | None:
        if not run_id:
            return None
        try:
            run = _retry(self.client.get_run, run_id)
        except Exception:  # another tracking URI, or the run was purged
            return None
        if run.info.lifecycle_stage != "active" or run.info.experiment_id != self.experiment_id:
            return None
        _retry(self.client.update_run, run_id, status="RUNNING")
        return run_id

    def trial_overrides(self, number: int) -> list[str]:
        """The contract with the task's tracking (conf/tracking): its run becomes this trial's child run."""
        return [f"++tracking.parent_run_id={quote(self.parent_id)}",
                f"++tracking.tags.trial_number={number}",
                f"++tracking.tags.study_name={quote(self.study_name)}"]

    def set_tags(self, tags: dict[str, Any], run_id: str | None = None) -> None:
        _retry(self.client.log_batch, run_id or self.parent_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def children(self, numbers: Iterable[int] | None = None) -> dict[int, Any]:
        """Child runs by trial number (the newest when a number has several)."""
        runs = _retry(self.client.search_runs, [self.experiment_id],
                      filter_string=f"tags.{MLFLOW_PARENT_RUN_ID} = '{self.parent_id}'", max_results=50000)
        wanted = None if numbers is None else set(numbers)
        found: dict[int, Any] = {}
        for run in sorted(runs, key=lambda r: r.info.start_time or 0):
            n = run.data.tags.get("trial_number")
            if n is not None and n.isdigit() and (wanted is None or int(n) in wanted):
                found[int(n)] = run
        return found

    def trial_failed(self, number: int, error: str, params: dict[str, Any], child: Any | None) -> None:
        """Mark the trial's child run FAILED with the error's last line (creating it when the task failed
        before its run started)."""
        if child is None:
            tags = {MLFLOW_PARENT_RUN_ID: self.parent_id, MLFLOW_RUN_NAME: f"trial-{number}",
                    "trial_number": number, "study_name": self.study_name}
            child = _retry(self.client.create_run, self.experiment_id, run_name=f"trial-{number}",
                           tags={k: str(v) for k, v in tags.items()})
            _retry(self.client.log_batch, child.info.run_id,
                   params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        self.set_tags({"error": error}, child.info.run_id)
        if child.info.status != "FAILED":
            _retry(self.client.set_terminated, child.info.run_id, status="FAILED")

    def trials_killed(self, numbers: list[int]) -> None:
        for run in self.children(numbers).values():
            if run.info.status == "RUNNING":
                self.set_tags({"error": "the sweep was killed while this trial ran"}, run.info.run_id)
                _retry(self.client.set_terminated, run.info.run_id, status="KILLED")

    def log_metrics(self, metrics: list[tuple[str, float, int]]) -> None:
        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v, step in metrics]
        for i in range(0, len(items), 1000):
            _retry(self.client.log_batch, self.parent_id, metrics=items[i:i + 1000])

    def log_artifacts(self, paths: Iterable[Path]) -> None:
        for p in paths:
            _retry(self.client.log_artifact, self.parent_id, str(p))

    def end(self, status: str) -> None:
        _retry(self.client.set_terminated, self.parent_id, status=status)
