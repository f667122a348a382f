"""End-of-sweep results: best value / Pareto front (YAML), history or Pareto plot, parameter importances."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import optuna
from omegaconf import OmegaConf
from optuna.trial import TrialState

log = logging.getLogger(__name__)


def _plain(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


def summarize(study: optuna.Study, objectives: list[str], extra: dict[str, Any]) -> dict[str, Any]:
    """The YAML written to the sweep directory and the parent run (keys of the official plugin included)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    out: dict[str, Any] = {"name": "optuna", "study_name": study.study_name, "objectives": objectives,
                           "directions": [d.name.lower() for d in study.directions],
                           "n_complete": len(complete),
                           "n_fail": len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))),
                           "n_skipped": sum("skipped" in t.user_attrs for t in study.get_trials(deepcopy=False)),
                           **extra}
    if not complete:
        return out
    if len(study.directions) == 1:
        best = study.best_trial
        out.update(best_trial=best.number, best_value=best.value,
                   best_params={k: _plain(v) for k, v in best.params.items()})
    else:
        out["solutions"] = [{"trial": t.number, "values": dict(zip(objectives, t.values)),
                             "params": {k: _plain(v) for k, v in t.params.items()}}
                            for t in sorted(study.best_trials, key=lambda t: t.number)]
    return out


def metrics(study: optuna.Study, objectives: list[str], summary: dict[str, Any]) -> list[tuple[str, float, int]]:
    """(key, value, step) for the parent run: every trial's value(s) by trial number, then the best / Pareto."""
    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        rows += [(f"trials/{name}", v, t.number) for name, v in zip(objectives, t.values)]
    if "best_value" in summary:
        rows += [(f"best/{objectives[0]}", summary["best_value"], 0), ("best/trial_number", summary["best_trial"], 0)]
    for i, sol in enumerate(summary.get("solutions", [])):
        rows += [(f"pareto/{name}", v, i) for name, v in sol["values"].items()]
        rows.append(("pareto/trial_number", sol["trial"], i))
    if "solutions" in summary:
        rows.append(("pareto/size", len(summary["solutions"]), 0))
    for obj, imps in summary.get("importances", {}).items():
        rows += [(f"importance/{obj}/{p}", v, 0) for p, v in imps.items()]
    if summary.get("trial_overhead_s") is not None:
        rows.append(("sweep/trial_overhead_s", summary["trial_overhead_s"], 0))
    return rows


def importances(study: optuna.Study, objectives: list[str], min_trials: int) -> dict[str, dict[str, float]]:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < max(2, min_trials) or not complete[0].params:
        return {}
    out = {}
    for i, name in enumerate(objectives):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                imp = optuna.importance.get_param_importances(study, target=lambda t, i=i: t.values[i])
            out[name] = {k: float(v) for k, v in imp.items()}
        except Exception as err:  # e.g. every trial has the same params
            log.warning("no parameter importances for %s: %s", name, err)
    return out


def plot(study: optuna.Study, objectives: list[str], out_dir: Path) -> Path | None:
    """Optimisation history (one objective) or Pareto front (two or three objectives) as PNG."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) or len(objectives) > 3:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
        if len(objectives) == 1:
            ax = ovm.plot_optimization_history(study, target_name=objectives[0])
            path = out_dir / "optimization_history.png"
        else:
            ax = ovm.plot_pareto_front(study, target_names=objectives)
            path = out_dir / "pareto_front.png"
    fig = ax.figure
    fig.set_size_inches(7, 5)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write(summary: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(summary), path)
    return path
