"""The sweep: validate, open (or resume) the study, ask → launch → tell in batches of n_jobs, report."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import optuna
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.errors import HydraException
from hydra.types import HydraContext, TaskFunction
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from ttha import paths
from ttha.tracking import default_uri, failure_line

from . import _results, _space
from ._errors import SweepConfigError, SweepStopped
from ._mlflow import SweepTracking

log = logging.getLogger(__name__)
DIRECTIONS = ("minimize", "maximize")
OWNER_ATTR = "sweeper_owner"  # host:pid of the sweep that asked the trial (stale RUNNING trials on resume)
K = "hydra.sweeper."


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def make_storage(url: str, launch_dir: Path) -> tuple[Any, str]:
    """(Optuna storage, absolute URL). sqlite waits up to 60 s on a lock: parallel sweeps share one file."""
    if url.startswith("journal:") or url.endswith((".log", ".journal")):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        path = Path(url.removeprefix("journal:"))
        path = path if path.is_absolute() else launch_dir / path
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path))), f"journal:{path}"
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        path = path if path.is_absolute() else launch_dir / path
        path.parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{path}"
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}}), url
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True}), url
    except Exception as err:  # an unknown dialect, a missing driver, a server that does not answer
        raise SweepConfigError(K + "storage", _masked(url), str(err).splitlines()[0]) from None


def _masked(url: str) -> str:
    """The storage URL without a password, for tags and logs."""
    if "://" in url and "@" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return url


def _grid_values(key: str, dist: Any) -> list[Any]:
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    if isinstance(dist, IntDistribution) and not dist.log:
        return list(range(dist.low, dist.high + 1, dist.step))
    if isinstance(dist, FloatDistribution) and dist.step is not None:
        n = int(round((dist.high - dist.low) / dist.step)) + 1
        return [round(dist.low + i * dist.step, 12) for i in range(n)]
    raise SweepConfigError(key, dist, "the grid sampler needs discrete values (choice or range)")


class SweepRunner:
    def __init__(self, settings: dict[str, Any], *, hydra_context: HydraContext, task_function: TaskFunction,
                 config: DictConfig):
        self.settings = settings
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config
        self.launch_dir = Path(config.hydra.runtime.cwd)
        self.sweep_dir = Path(config.hydra.sweep.dir)
        if not self.sweep_dir.is_absolute():
            self.sweep_dir = self.launch_dir / self.sweep_dir
        self.job_idx = 0

    # -- validation (before anything is written) ------------------------------------------------
    def _setting(self, name: str) -> Any:
        value = self.settings.get(name)
        return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value

    def objectives(self) -> list[str] | None:
        objs = self.config.get("objectives")
        if objs is None:
            return None
        return [str(o) for o in (objs if isinstance(objs, (list, ListConfig)) else [objs])]

    def validate(self) -> dict[str, Any]:
        s = {k: self._setting(k) for k in ("direction", "n_trials", "n_jobs", "max_failure_rate", "storage",
                                           "study_name", "custom_search_space", "mlflow", "devices",
                                           "importance_min_trials")}
        for key in ("n_trials", "n_jobs"):
            if isinstance(s[key], bool) or not isinstance(s[key], int) or s[key] <= 0:
                raise SweepConfigError(K + key, s[key], "must be an integer > 0")
        rate = s["max_failure_rate"]
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
            raise SweepConfigError(K + "max_failure_rate", rate, "must be a number in [0, 1]")
        directions = s["direction"] if isinstance(s["direction"], list) else [s["direction"]]
        directions = [d.name if hasattr(d, "name") else d for d in directions]  # Direction enums
        for d in directions:
            if d not in DIRECTIONS:
                raise SweepConfigError(K + "direction", s["direction"], "must be minimize or maximize (or a list)")
        objectives = self.objectives()
        if objectives is not None and len(objectives) != len(directions):
            raise SweepConfigError(K + "direction", s["direction"],
                                   f"{len(directions)} direction(s) for {len(objectives)} objective(s) "
                                   f"(objectives={objectives})")
        s["directions"] = directions
        s["objective_names"] = objectives or [f"value_{i}" for i in range(len(directions))]
        s["extender"] = None
        if s["custom_search_space"]:
            try:
                s["extender"] = get_method(s["custom_search_space"])
            except Exception as err:
                raise SweepConfigError(K + "custom_search_space", s["custom_search_space"],
                                       f"cannot import it ({failure_line(err)})") from None
        return s

    def make_sampler(self, space: _space.SearchSpace) -> tuple[Any, int | None]:
        """(sampler, grid size or None)."""
        conf = self.settings.get("sampler")
        conf = OmegaConf.to_container(conf, resolve=True) if isinstance(conf, DictConfig) else dict(conf or {})
        target = conf.get("_target_", "")
        grid = None
        if target == "optuna.samplers.GridSampler":
            values = {k: _grid_values(f"{K}params.{k}", d) for k, d in space.distributions.items()}
            conf["search_space"] = values
            grid = math.prod(len(v) for v in values.values())
        if not str(target).startswith("optuna.samplers."):
            raise SweepConfigError(K + "sampler._target_", target, "unknown sampler (expected optuna.samplers.*)")
        try:
            return instantiate(conf, _convert_="all"), grid
        except Exception as err:
            cause = err.__cause__ or err
            raise SweepConfigError(K + "sampler._target_", target,
                                   f"cannot build the sampler ({failure_line(cause)})") from None

    def dry_compose(self, space: _space.SearchSpace) -> None:
        """Compose one trial's config: an unknown key fails here in one line, not in every trial."""
        overrides = [f"{k}={_space.as_override_value(_space.representative(d))}"
                     for k, d in space.distributions.items()]
        overrides += [f"{k}={v}" for k, v in space.fixed.items()] + space.deletions
        try:
            self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        except HydraException as err:
            lines = [ln for ln in str(err).splitlines() if ln.strip()]
            raise SweepConfigError(K + "params", " ".join(overrides), lines[0] if lines else str(err)) from None

    def study_name(self, s: dict[str, Any], space: _space.SearchSpace) -> str:
        if s["study_name"]:
            return str(s["study_name"])
        key = json.dumps({"space": {k: repr(d) for k, d in sorted(space.distributions.items())},
                          "fixed": sorted(space.fixed.items()), "directions": s["directions"]}, sort_keys=True)
        return f"{self.config.hydra.job.name}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"

    # -- the sweep ----------------------------------------------------------------------------------------
    def sweep(self, arguments: list[str]) -> Any:
        s = self.validate()
        space = _space.build(self._setting("params"), list(arguments))
        sampler, grid = self.make_sampler(space)
        n_trials = min(s["n_trials"], grid) if grid else s["n_trials"]
        self.dry_compose(space)
        url = s["storage"] or f"sqlite:///{paths.outputs_root() / 'optuna.db'}"
        storage, url = make_storage(str(url), self.launch_dir)
        name = self.study_name(s, space)
        try:
            existing = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            existing = None
        if existing is not None and [d.name.lower() for d in existing.directions] != s["directions"]:
            raise SweepConfigError(K + "direction", s["directions"], f"study {name!r} in {_masked(url)} was "
                                   f"created with {[d.name.lower() for d in existing.directions]}")
        study = optuna.create_study(study_name=name, storage=storage, sampler=sampler,
                                    directions=s["directions"], load_if_exists=True)
        stale = self.fail_stale_trials(study)
        tracking = self.open_tracking(s, study, url, sampler) if s["mlflow"] else None
        if tracking and stale:
            tracking.trials_killed(stale)
        done = self.n_finished(study)
        log.info("Study %s in %s: %d/%d trials complete; sampler %s; directions %s; objectives %s",
                 name, _masked(url), done, n_trials, type(sampler).__name__, s["directions"], s["objective_names"])
        self.launcher = Plugins.instance().instantiate_launcher(
            config=self.config, hydra_context=self.hydra_context, task_function=self.task_function)
        status, stop = "FINISHED", None
        try:
            stop = self.run_trials(study, space, s, n_trials, tracking)
        except BaseException:
            status = "KILLED"
            raise
        finally:
            if status == "FINISHED" and stop is not None:
                status = "FAILED"
            summary = self.report(study, s, url, tracking)
            if tracking:
                tracking.end(status)
        if stop is not None:
            raise SweepStopped(stop)
        return summary

    @staticmethod
    def n_finished(study: optuna.Study) -> int:
        return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))

    def fail_stale_trials(self, study: optuna.Study) -> list[int]:
        """RUNNING trials whose sweep process on this host is gone (killed) → FAIL. Trials of live sweeps
        (other hosts or processes sharing the study) are left alone."""
        host = socket.gethostname()
        stale = []
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            owner_host, _, pid = str(t.user_attrs.get(OWNER_ATTR, "")).rpartition(":")
            if owner_host == host and pid.isdigit() and not _pid_alive(int(pid)) or not t.user_attrs.get(OWNER_ATTR):
                study.tell(t.number, state=TrialState.FAIL)
                stale.append(t.number)
        if stale:
            log.warning("marked %d trial(s) left RUNNING by a killed sweep as FAIL: %s", len(stale), stale)
        return stale

    def open_tracking(self, s: dict[str, Any], study: optuna.Study, url: str,
                      sampler: Any) -> SweepTracking | None:
        tracking_cfg = self.config.get("tracking")
        if tracking_cfg is None or "parent_run_id" not in tracking_cfg:
            log.info("no tracking.parent_run_id in the task config: no MLflow parent run")
            return None
        uri = tracking_cfg.get("uri") or default_uri()
        choices = self.config.hydra.runtime.get("choices", {})
        tags = {"study_name": study.study_name, "storage": _masked(url), "sampler": type(sampler).__name__,
                "directions": ",".join(s["directions"]), "objectives": ",".join(s["objective_names"]),
                "sweep": choices.get("sweep") or "", "sweep_dir": str(self.sweep_dir)}
        return SweepTracking(uri, tracking_cfg.get("experiment") or "Default", study, tags)

    def trial_overrides(self, trial: optuna.Trial, space: _space.SearchSpace, slot: int,
                        s: dict[str, Any], tracking: SweepTracking | None) -> list[str]:
        items = [f"{k}={_space.as_override_value(v)}" for k, v in trial.params.items()]
        items += [f"{k}={v}" for k, v in space.fixed.items() if k not in trial.params] + space.deletions
        if tracking:
            items += tracking.trial_overrides(trial.number)
        devices = self.devices(s)
        if devices:
            items.append(f"device={devices[slot % len(devices)]}")
        return items

    def devices(self, s: dict[str, Any]) -> list[str]:
        """Parallel trials on a multi-GPU machine: trial k of a batch gets its own GPU (device=cuda:k)."""
        dev = s["devices"]
        if dev in (None, "none") or s["n_jobs"] < 2 or "device" not in self.config:
            return []
        if dev == "auto":
            if str(self.config.device) not in ("auto", "cuda"):
                return []
            try:
                import pynvml
                pynvml.nvmlInit()
                n = pynvml.nvmlDeviceGetCount()
            except Exception:
                return []
            return [f"cuda:{i}" for i in range(n)] if n > 1 else []
        return [str(d) for d in dev]

    def values(self, ret: Any, s: dict[str, Any]) -> tuple[list[float] | None, str | None]:
        """(values, None) or (None, error line) from a JobReturn."""
        if ret.status == JobStatus.FAILED:
            return None, failure_line(ret._return_value)
        value, names = ret.return_value, s["objective_names"]
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
            value = [value]
        try:
            values = [float(v) for v in value]
        except (TypeError, ValueError):
            return None, f"the task returned {ret.return_value!r}: expected {len(names)} number(s)"
        if len(values) != len(names):
            return None, f"the task returned {len(values)} value(s) for {len(names)} direction(s)"
        bad = [f"{n}={v}" for n, v in zip(names, values) if not math.isfinite(v)]
        if bad:
            return None, f"objective {', '.join(bad)} is not finite"
        return values, None

    def run_trials(self, study: optuna.Study, space: _space.SearchSpace, s: dict[str, Any], n_trials: int,
                   tracking: SweepTracking | None) -> str | None:
        """Ask/launch/tell until n_trials trials are COMPLETE; a stop message when too many fail."""
        failures: list[str] = []
        extender: Callable | None = s["extender"]
        while (to_go := n_trials - self.n_finished(study)) > 0:
            trials = [study.ask(space.distributions) for _ in range(min(s["n_jobs"], to_go))]
            try:
                overrides = []
                for slot, trial in enumerate(trials):
                    trial.set_user_attr(OWNER_ATTR, _owner())
                    if extender is not None:
                        extender(self.config, trial)
                    overrides.append(self.trial_overrides(trial, space, slot, s, tracking))
                t0 = time.perf_counter()
                returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
                wall = time.perf_counter() - t0
            except BaseException as err:
                for trial in trials:
                    study.tell(trial, state=TrialState.FAIL)
                    if tracking and not isinstance(err, KeyboardInterrupt):
                        tracking.trial_failed(trial.number, failure_line(err), trial.params, None)
                raise
            self.job_idx += len(returns)
            failed = []
            for trial, ret in zip(trials, returns):
                values, error = self.values(ret, s)
                trial.set_user_attr("launch_wall_s", round(wall, 4))
                if error is None:
                    self._tell(study, trial, values)
                    continue
                trial.set_user_attr("error", error)
                study.tell(trial, state=TrialState.FAIL)
                log.warning("trial %d failed: %s", trial.number, error)
                failures.append(error)
                failed.append(trial)
            if tracking and failed:
                children = tracking.children([t.number for t in failed])
                for trial in failed:
                    tracking.trial_failed(trial.number, trial.user_attrs["error"], trial.params,
                                          children.get(trial.number))
            if len(failures) > s["max_failure_rate"] * s["n_trials"]:
                return (f"{K}max_failure_rate={s['max_failure_rate']}: {len(failures)} trial(s) failed, more than "
                        f"{s['max_failure_rate']} x n_trials={s['n_trials']} allow; stopping (last: {failures[-1]})")
        return None

    @staticmethod
    def _tell(study: optuna.Study, trial: optuna.Trial, values: Sequence[float]) -> None:
        try:
            study.tell(trial, values=values)
        except RuntimeError as err:  # GridSampler calls study.stop() when the grid is done: harmless here
            if "Study.stop" not in str(err):
                raise

    def report(self, study: optuna.Study, s: dict[str, Any], url: str,
               tracking: SweepTracking | None) -> dict[str, Any]:
        names = s["objective_names"]
        extra: dict[str, Any] = {"storage": _masked(url), "trial_overhead_s": None}
        if tracking:
            extra["mlflow_parent_run_id"] = tracking.parent_id
            extra["trial_overhead_s"] = self.trial_overhead(study, tracking, s)
        summary = _results.summarize(study, names, extra)
        summary["importances"] = _results.importances(study, names, s["importance_min_trials"] or 0)
        path = _results.write(summary, self.sweep_dir / "optimization_results.yaml")
        artifacts = [path]
        try:
            plot = _results.plot(study, names, self.sweep_dir)
            if plot:
                artifacts.append(plot)
        except Exception as err:  # a plot must never lose the results
            log.warning("no plot: %s", failure_line(err))
        if "best_value" in summary:
            log.info("Best %s = %s (trial %d): %s", names[0], summary["best_value"], summary["best_trial"],
                     summary["best_params"])
        for sol in summary.get("solutions", []):
            log.info("Pareto trial %d: %s %s", sol["trial"], sol["values"], sol["params"])
        log.info("Results: %s", path)
        if tracking:
            tracking.log_metrics(_results.metrics(study, names, summary))
            tracking.log_artifacts(artifacts)
        return summary

    @staticmethod
    def trial_overhead(study: optuna.Study, tracking: SweepTracking, s: dict[str, Any]) -> float | None:
        """Mean seconds a trial's launch took beyond its MLflow run (sequential trials only)."""
        if s["n_jobs"] != 1:
            return None
        children = tracking.children()
        gaps = []
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            run = children.get(t.number)
            wall = t.user_attrs.get("launch_wall_s")
            if run is not None and wall is not None and run.info.end_time and run.info.start_time:
                gaps.append(wall - (run.info.end_time - run.info.start_time) / 1000)
        return round(sum(gaps) / len(gaps), 3) if gaps else None
