"""Compare finished runs: mean ± std of summary metrics per group of params (e.g. router x TTT policy
over seeds). `python -m ttha.report --experiment h100_stress --group-by router.name,ttt.policy`.

Prints a Markdown table and writes it as CSV (--csv). Reads MLflow through ttha.tracking.
"""
from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from pathlib import Path
from typing import NoReturn

from ttha import paths, tracking

DEFAULT_METRICS = ("eval/energy_per_token_j", "eval/mean_power_w", "eval/max_temp_c",
                   "eval/time_over_power_target_frac", "eval/time_over_temp_target_frac", "eval/perplexity",
                   "ttt/skip_frac", "eval/tokens_per_s")


def summarise(runs: list[dict], group_by: list[str], metrics: list[str]) -> list[dict]:
    """One row per group: the group's param values, n, and (mean, std) of each metric over its runs."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        missing = [k for k in group_by if k not in run["params"]]
        if missing:
            raise ValueError(f"group_by: run {run['run_id']} has no param {missing[0]!r}")
        groups.setdefault(tuple(run["params"][k] for k in group_by), []).append(run)
    rows = []
    for key, members in sorted(groups.items()):
        row = {**dict(zip(group_by, key)), "n": len(members)}
        for m in metrics:
            values = [r["metrics"][m] for r in members if m in r["metrics"] and math.isfinite(r["metrics"][m])]
            row[m] = (statistics.fmean(values) if values else math.nan,
                      statistics.stdev(values) if len(values) > 1 else 0.0)
        rows.append(row)
    return rows


def markdown(rows: list[dict], group_by: list[str], metrics: list[str]) -> str:
    head = [*group_by, "n", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [str(row[k]) for k in group_by] + [str(row["n"])]
        cells += [f"{row[m][0]:.4g} ± {row[m][1]:.2g}" for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: list[dict], group_by: list[str], metrics: list[str], path: Path) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([*group_by, "n", *(f"{m} {s}" for m in metrics for s in ("mean", "std"))])
        for row in rows:
            w.writerow([row[k] for k in group_by] + [row["n"]] + [v for m in metrics for v in row[m]])
    return path


def with_params(runs: list[dict], keys: list[str]) -> tuple[list[dict], int]:
    """The runs that have every param in `keys`, and how many do not (a sweep's parent run has none)."""
    kept = [r for r in runs if all(k in r["params"] for k in keys)]
    return kept, len(runs) - len(kept)


def fail(line: str) -> NoReturn:
    print(f"error: {line}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--uri", default=None, help="MLflow tracking URI (default: outputs/mlflow.db, as train.py)")
    ap.add_argument("--experiment", default="ttha")
    ap.add_argument("--group-by", default="router.name,ttt.policy")
    ap.add_argument("--metrics", default=",".join(DEFAULT_METRICS))
    ap.add_argument("--csv", default=None, help="also write the table here")
    args = ap.parse_args(argv)
    # the default store's path without tracking.default_uri(), which creates its folder: a report writes nothing
    uri = args.uri or f"sqlite:///{paths.outputs_root().resolve() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        fail(f"--uri={uri}: no MLflow store there (run train.py first, or pass --uri)")
    group_by, metrics = args.group_by.split(","), args.metrics.split(",")
    try:
        runs = tracking.finished_runs(uri, args.experiment)
    except ValueError as err:  # no such experiment
        fail(str(err))
    runs, skipped = with_params(runs, group_by)
    if skipped:
        print(f"skipped {skipped} run(s) without param(s) {args.group_by} (a sweep's parent run has none)",
              file=sys.stderr)
    if not runs:
        fail(f"--experiment={args.experiment}: no FINISHED runs with params {args.group_by} at {uri}")
    rows = summarise(runs, group_by, metrics)
    text = markdown(rows, group_by, metrics)
    print(text)
    if args.csv:
        write_csv(rows, group_by, metrics, Path(args.csv))
    return text


if __name__ == "__main__":
    main()
