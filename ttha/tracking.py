"""MLflow tracking: the only module that imports mlflow (runs, sweeps and reports all go through it).

Step metrics are buffered and written by a background thread with MlflowClient.log_batch, so the serving
loop only appends to a list (a synchronous log_metric per value would stall it). A run ends FINISHED,
FAILED (exception, last line of the error as tag `error`) or KILLED (Ctrl-C / SIGTERM), never left RUNNING.
Parallel trials share one sqlite file, so every write retries while the file is locked, and a file lock beside
it serialises the store's creation and schema migration. A run records its owner (host:pid); a run whose owner
on this host is gone (SIGKILL) is marked KILLED when the next run of its experiment starts.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from filelock import FileLock
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME, MLFLOW_RUN_NOTE

from ttha import paths
from ttha.config import plots_mode

log = logging.getLogger(__name__)

MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limits
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_LEN = 6000
# MLflow's experiment kind tag; its value for a model-development (not GenAI) experiment
EXPERIMENT_KIND, MODEL_DEVELOPMENT = "mlflow.experimentKind", "custom_model_development"
OWNER_TAG = "owner"  # host:pid of the process writing the run
NONFINITE_TAG = "nonfinite_metrics"  # metrics that were NaN or infinite (logged as such, never dropped)


def default_uri() -> str:
    """sqlite file mlflow.db under the outputs root, absolute so every process of a sweep shares it."""
    path = paths.outputs_root().resolve() / "mlflow.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: next to a local sqlite store (<outputs>/mlartifacts for
    the default one), never MLflow's ./mlruns under whatever directory the process runs in. None for a
    tracking server, which keeps its own."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()


def retry(fn: Callable, *args: Any, attempts: int = 8, **kwargs: Any) -> Any:
    """fn(*args, **kwargs), retried briefly while a shared sqlite file is locked."""
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # mlflow wraps sqlalchemy's OperationalError in MlflowException
            if "locked" not in str(err).lower() or i == attempts - 1:
                raise
            time.sleep(0.05 * 2**i)


def failure_line(err: BaseException) -> str:
    """The last non-empty line of an error's message: what a failed run's `error` tag and a trial record."""
    text = f"{type(err).__name__}: {err}".strip()
    return [ln for ln in text.splitlines() if ln.strip()][-1][:500]


def is_folder_store(uri: str) -> bool:
    """A tracking URI that is a local folder (a path, or file:...): MLflow's file store, still supported here."""
    return "://" not in uri or uri.startswith("file:")


def store_lock(uri: str) -> FileLock | None:
    """A lock file beside a local sqlite store: concurrent first runs would otherwise all create and migrate
    its schema at once and fail. None for other stores."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(db) + ".lock", timeout=600)


def owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _owner_gone(tag: str | None) -> bool:
    """True when the owner tag names a process of this host that no longer exists."""
    host, _, pid = str(tag or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _tags(tags: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in tags.items()}


class Tracker:
    """One MLflow run: params, buffered step metrics, summary metrics, artifacts, status; and, for a sweep's
    parent run, its child runs."""

    def __init__(self, uri: str, experiment: str, flush_every_s: float = 2.0, log_every: int = 1):
        self.uri = uri
        if is_folder_store(uri):  # MLflow 3 refuses them unless told (its file store is in maintenance mode)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        with store_lock(uri) or contextlib.nullcontext():  # the client creates (and migrates) the store
            self.client = MlflowClient(tracking_uri=uri)
            self.experiment_id = self._experiment_id(experiment)
        self.flush_every_s, self.log_every = flush_every_s, int(log_every)
        self._window: dict[str, list[float]] = {}  # key -> [sum, count] of the steps not yet logged
        self._window_steps, self._last_step = 0, None
        self.run_id: str | None = None
        self._buffer: list[Metric] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.flush_seconds = 0.0  # time spent writing, for the overhead report
        self.nonfinite: set[str] = set()

    def _experiment_id(self, name: str) -> str:
        exp = retry(self.client.get_experiment_by_name, name)
        if exp is not None:
            if exp.tags.get(EXPERIMENT_KIND) is None:  # created before the kind was set
                retry(self.client.set_experiment_tag, exp.experiment_id, EXPERIMENT_KIND, MODEL_DEVELOPMENT)
            return exp.experiment_id
        try:
            return retry(self.client.create_experiment, name, artifact_location=artifact_location(self.uri),
                         tags={EXPERIMENT_KIND: MODEL_DEVELOPMENT})
        except Exception:  # a parallel trial created it first
            return retry(self.client.get_experiment_by_name, name).experiment_id

    def mark_orphans_killed(self, keep: str | None = None) -> list[str]:
        """RUNNING runs of this experiment whose owner process on this host is gone (SIGKILL) -> KILLED; `keep`
        is a run this process takes over (a resumed sweep's parent)."""
        running = retry(self.client.search_runs, [self.experiment_id],
                        filter_string="attributes.status = 'RUNNING'", max_results=50_000)
        killed = [r.info.run_id for r in running
                  if r.info.run_id != keep and _owner_gone(r.data.tags.get(OWNER_TAG))]
        for run_id in killed:
            self.set_tags({"error": "its process ended without closing the run (killed)"}, run_id)
            retry(self.client.set_terminated, run_id, status="KILLED")
        if killed:
            log.warning("marked %d MLflow run(s) left RUNNING by a killed process as KILLED: %s",
                        len(killed), killed)
        return killed

    # -- run lifecycle -------------------------------------------------------------------
    def start(self, run_name: str | None, tags: dict[str, Any] | None = None,
              parent_run_id: str | None = None) -> str:
        self.mark_orphans_killed()
        tags = {**_tags(tags or {}), OWNER_TAG: owner()}
        if parent_run_id:
            tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        if run_name:
            tags[MLFLOW_RUN_NAME] = run_name
        run = retry(self.client.create_run, self.experiment_id, tags=tags, run_name=run_name)
        self._begin(run.info.run_id)
        return run.info.run_id

    def resume(self, run_id: str | None) -> bool:
        """Continue an existing run of this experiment (a resumed sweep's parent run); False when there is
        none to continue (no id, another tracking URI, a deleted run)."""
        if not run_id:
            return False
        try:
            run = retry(self.client.get_run, run_id)
        except Exception:  # another tracking URI, or the run was purged
            return False
        if run.info.lifecycle_stage != "active" or run.info.experiment_id != self.experiment_id:
            return False
        self.mark_orphans_killed(keep=run_id)
        retry(self.client.update_run, run_id, status="RUNNING")
        self.set_tags({OWNER_TAG: owner()}, run_id)
        self._begin(run_id)
        return True

    def _begin(self, run_id: str) -> None:
        self.run_id = run_id
        self._stop.clear()
        self._thread = threading.Thread(target=self._flush_loop, name="mlflow-flush", daemon=True)
        self._thread.start()

    def end(self, status: str = "FINISHED", error: BaseException | None = None) -> None:
        """Flush everything and set the final status (FINISHED, FAILED or KILLED)."""
        if self.run_id is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._log_window(self._last_step)  # a last, partial window
        try:
            self.flush()
        except Exception as flush_err:  # the status must still be written
            log.warning("could not flush metrics: %s", flush_err)
        if error is not None:
            self.set_tags({"error": failure_line(error)})
        retry(self.client.set_terminated, self.run_id, status=status)
        log.info("MLflow run %s %s (%s)", self.run_id, status, self.uri)
        self.run_id = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            self.end("FINISHED")
        elif isinstance(exc, KeyboardInterrupt):
            exc.run_id = self.run_id  # train.py names the killed run in its one-line message
            self.end("KILLED", exc)
        else:
            self.end("FAILED", exc)
        return False

    # -- logging -------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any], run_id: str | None = None) -> None:
        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            retry(self.client.log_batch, run_id or self.run_id, params=items[i:i + MAX_PARAMS_PER_BATCH])

    def set_tags(self, tags: dict[str, Any], run_id: str | None = None) -> None:
        retry(self.client.log_batch, run_id or self.run_id, tags=[RunTag(k, v) for k, v in _tags(tags).items()])

    def set_note(self, markdown: str, run_id: str | None = None) -> None:
        """The run's description (what the MLflow UI shows on the run's page)."""
        self.set_tags({MLFLOW_RUN_NOTE: markdown}, run_id)

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        """Buffer one step's metrics (cheap: the background thread writes them). With log_every > 1 a point is
        the mean of each key over the last log_every steps, logged at the last of them: decode serves hundreds
        of steps a second, more metrics than MLflow writes, and its writes hold the GIL the serving loop needs."""
        if self.log_every > 1:
            for k, v in metrics.items():
                if v is not None:
                    acc = self._window.setdefault(k, [0.0, 0])
                    acc[0], acc[1] = acc[0] + float(v), acc[1] + 1
            self._window_steps, self._last_step = self._window_steps + 1, step
            if self._window_steps >= self.log_every:
                self._log_window(step)
            return
        self._buffer_metrics(step, metrics)

    def _log_window(self, step: int | None) -> None:
        window, self._window, self._window_steps = self._window, {}, 0
        if window:
            self._buffer_metrics(step, {k: total / n for k, (total, n) in window.items()})

    def _buffer_metrics(self, step: int, metrics: dict[str, float]) -> None:
        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None]
        bad = {m.key for m in batch if not math.isfinite(m.value)} - self.nonfinite
        with self._lock:
            self._buffer.extend(batch)
        if bad:
            self._record_nonfinite(bad, step)

    def _record_nonfinite(self, keys: set[str], step: int) -> None:
        """A NaN/inf metric is logged as such (MLflow keeps NaN), warned about once per key and named in a tag."""
        self.nonfinite |= keys
        for key in sorted(keys):
            log.warning("metric %s is not finite at step %d (logged as is)", key, step)
        if self.run_id is not None:
            self.set_tags({NONFINITE_TAG: ",".join(sorted(self.nonfinite))})

    def log_summary(self, metrics: dict[str, float]) -> None:
        self._buffer_metrics(0, metrics)
        self.flush()

    def flush(self) -> None:
        with self._lock:
            pending, self._buffer = self._buffer, []
        t0 = time.perf_counter()
        for i in range(0, len(pending), MAX_METRICS_PER_BATCH):
            retry(self.client.log_batch, self.run_id, metrics=pending[i:i + MAX_METRICS_PER_BATCH])
        self.flush_seconds += time.perf_counter() - t0

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.flush_every_s):
            try:
                self.flush()
            except Exception as err:  # never kill the run for a logging hiccup; end() retries
                log.warning("background metric flush failed: %s", err)

    def log_artifacts(self, paths: Iterable[Path], artifact_path: str | None = None) -> None:
        for p in paths:
            retry(self.client.log_artifact, self.run_id, str(p), artifact_path)

    # -- child runs (a sweep's trials) ------------------------------------------------------
    def children(self) -> list[Run]:
        """This run's child runs, oldest first."""
        runs = retry(self.client.search_runs, [self.experiment_id],
                     filter_string=f"tags.{MLFLOW_PARENT_RUN_ID} = '{self.run_id}'", max_results=50_000)
        return sorted(runs, key=lambda r: r.info.start_time or 0)

    def start_child(self, run_name: str, tags: dict[str, Any], params: dict[str, Any]) -> str:
        """A child run created on behalf of a child that failed before it could start its own."""
        tags = {**_tags(tags), MLFLOW_PARENT_RUN_ID: self.run_id, MLFLOW_RUN_NAME: run_name, OWNER_TAG: owner()}
        run_id = retry(self.client.create_run, self.experiment_id, run_name=run_name, tags=tags).info.run_id
        self.log_params(params, run_id)
        return run_id

    def end_child(self, run_id: str, status: str, error: str) -> None:
        """Give a child run its final status (keeping the end time of one already there) and the error line."""
        self.set_tags({"error": error}, run_id)
        if retry(self.client.get_run, run_id).info.status != status:
            retry(self.client.set_terminated, run_id, status=status)


def tracker_from_config(tracking_cfg, default_log_every: int = 1) -> Tracker:
    """The run's Tracker from its `tracking` config group (conf/tracking); default_log_every where
    tracking.log_every is null."""
    plots_mode(tracking_cfg.get("plots", True))  # again: the profiler's runs come here without config.validate
    uri = tracking_cfg.uri or default_uri()
    return Tracker(uri, tracking_cfg.experiment, float(tracking_cfg.flush_every_s),
                   tracking_cfg.get("log_every") or default_log_every)


def finished_runs(uri: str, experiment: str) -> list[dict[str, Any]]:
    """Every FINISHED run of an experiment as {run_id, name, params, metrics (latest values), tags}."""
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"experiment={experiment!r}: not in {uri}")
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                              max_results=50_000)
    return [{"run_id": r.info.run_id, "name": r.info.run_name, "params": dict(r.data.params),
             "metrics": dict(r.data.metrics), "tags": dict(r.data.tags)} for r in runs]
