"""The sweep: validate, open (or resume) the study, ask → launch → tell in batches of n_jobs, report."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import optuna
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.errors import HydraException
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, ListConfig, OmegaConf
from optuna.trial import TrialState

from ttha import paths
from ttha.tracking import default_uri, failure_line

from . import _results, _sampler, _space, _trials
from ._errors import SweepConfigError, SweepStopped
from ._mlflow import SweepTracking
from ._storage import make_storage, masked

log = logging.getLogger(__name__)
DIRECTIONS = ("minimize", "maximize")
K = "hydra.sweeper."
MAX_SKIPS = 100  # asks in a row that only repeat known parameter sets: the search space is used up


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
            s["extender"] = _space.search_space_function(s["custom_search_space"])
        return s

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
        sampler, grid = _sampler.make_sampler(self.settings.get("sampler"), space)
        n_trials = self.n_trials(s, space, grid)
        self.dry_compose(space)
        url = s["storage"] or f"sqlite:///{paths.outputs_root() / 'optuna.db'}"
        storage, url = make_storage(str(url), self.launch_dir)
        name = self.study_name(s, space)
        try:
            existing = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            existing = None
        if existing is not None and [d.name.lower() for d in existing.directions] != s["directions"]:
            raise SweepConfigError(K + "direction", s["directions"], f"study {name!r} in {masked(url)} was "
                                   f"created with {[d.name.lower() for d in existing.directions]}")
        study = optuna.create_study(study_name=name, storage=storage, sampler=sampler,
                                    directions=s["directions"], load_if_exists=True)
        tracking = self.open_tracking(s, study, url, sampler) if s["mlflow"] else None
        log.info("Study %s in %s: %d/%d trials complete; sampler %s; directions %s; objectives %s",
                 name, masked(url), _trials.counts(study)[0], n_trials, _sampler.name(sampler), s["directions"],
                 s["objective_names"])
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
    def n_trials(s: dict[str, Any], space: _space.SearchSpace, grid: int | None) -> int:
        """n_trials, at most the number of distinct parameter sets when the space is finite (no repeats)."""
        size = grid or (None if s["extender"] else _sampler.space_size(space))
        if size is not None and size < s["n_trials"]:
            log.info("the search space holds %d parameter set(s): %d trial(s), not n_trials=%d", size, size,
                     s["n_trials"])
            return size
        return s["n_trials"]

    def open_tracking(self, s: dict[str, Any], study: optuna.Study, url: str,
                      sampler: Any) -> SweepTracking | None:
        tracking_cfg = self.config.get("tracking")
        if tracking_cfg is None or "parent_run_id" not in tracking_cfg:
            log.info("no tracking.parent_run_id in the task config: no MLflow parent run")
            return None
        uri = tracking_cfg.get("uri") or default_uri()
        choices = self.config.hydra.runtime.get("choices", {})
        tags = {"study_name": study.study_name, "storage": masked(url), "sampler": _sampler.name(sampler),
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
        """Ask/launch/tell until the study holds n_trials COMPLETE trials (or other sweeps of it run the
        rest); a stop message when too many fail or the search space is used up."""
        failures: list[str] = []
        while True:
            killed = _trials.fail_orphans(study, space.distributions)
            if tracking and killed:
                tracking.trials_killed(killed)
            complete, running = _trials.counts(study)
            to_go = n_trials - complete - running
            if to_go <= 0:
                if complete < n_trials and _trials.ownerless_running(study):
                    time.sleep(1.0)  # a trial just asked by another sweep, or one left by a killed sweep
                    continue
                if complete < n_trials:
                    log.info("%d trial(s) of other sweeps of this study are running: they finish it", running)
                return None
            trials, used_up = self.ask(study, space, s, min(s["n_jobs"], to_go), n_trials)
            if used_up:
                return used_up
            if not trials:
                continue
            try:
                overrides = [self.trial_overrides(t, space, slot, s, tracking) for slot, t in enumerate(trials)]
                t0 = time.perf_counter()
                returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
                wall = time.perf_counter() - t0
            except BaseException as err:
                for trial in trials:
                    _trials.finish(study, trial, TrialState.FAIL)
                    if tracking and not isinstance(err, KeyboardInterrupt):
                        tracking.trial_failed(trial.number, failure_line(err), trial.params, None)
                raise
            self.job_idx += len(returns)
            failed = []
            for trial, ret in zip(trials, returns):
                values, error = self.values(ret, s)
                trial.set_user_attr("launch_wall_s", round(wall, 4))
                if error is None:
                    _trials.finish(study, trial, values=values)
                    continue
                trial.set_user_attr("error", error)
                _trials.finish(study, trial, TrialState.FAIL)
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

    def ask(self, study: optuna.Study, space: _space.SearchSpace, s: dict[str, Any], k: int,
            n_trials: int) -> tuple[list[optuna.Trial], str | None]:
        """Up to k trials to run, skipping repeated parameter sets and trials beyond n_trials;
        (trials, a stop message when only repeats come)."""
        trials: list[optuna.Trial] = []
        skips = 0
        try:
            while len(trials) < k:
                trial = study.ask(space.distributions)
                trial.set_user_attr(_trials.OWNER_ATTR, _trials.owner())
                if s["extender"] is not None:
                    s["extender"](self.config, trial)
                reason = _trials.skip_reason(study, trial, n_trials)
                if reason is None:
                    trials.append(trial)
                    continue
                _trials.skip(study, trial, reason)
                if reason.startswith("n_trials="):
                    break  # the other sweeps' trials make the count: ask no more now
                skips += 1
                if skips >= MAX_SKIPS:
                    return trials, (f"{K}params: {MAX_SKIPS} trials in a row repeated a parameter set already "
                                    "run; the search space seems used up, stopping")
        except BaseException:
            for trial in trials:
                _trials.finish(study, trial, TrialState.FAIL)
            raise
        return trials, None

    def report(self, study: optuna.Study, s: dict[str, Any], url: str,
               tracking: SweepTracking | None) -> dict[str, Any]:
        names = s["objective_names"]
        extra: dict[str, Any] = {"storage": masked(url), "trial_overhead_s": None}
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
