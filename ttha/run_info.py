"""What a run is called and says about itself in MLflow: a name that tells runs apart, tags for the factors a
researcher compares by, and a markdown note with the key results (the run's description in the MLflow UI)."""
from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig

KEY_RESULTS = [("eval/perplexity", "perplexity", "{:.4g}"), ("eval/mean_power_w", "mean power", "{:.1f} W"),
               ("eval/energy_per_token_j", "energy / token", "{:.4g} J"),
               ("eval/tokens_per_s", "tokens / s", "{:.4g}"),
               ("eval/time_over_power_target_frac", "time over power target", "{:.0%}"),
               ("eval/time_over_temp_target_frac", "time over temp target", "{:.0%}")]


def factors(cfg: DictConfig) -> dict[str, Any]:
    """The factors runs differ by, as tags (a sweep's trial and sweep come from the sweeper's tags)."""
    extra = dict(cfg.tracking.get("tags") or {})
    out = {"experts": cfg.experts.name, "router": cfg.router.name, "workload": cfg.workload.kind,
           "stress": cfg.stress.kind, "seed": cfg.seed}
    if "trial_number" in extra:
        out["trial"] = extra["trial_number"]
    if "sweep" in extra or "study_name" in extra:
        out["sweep"] = extra.get("sweep") or extra["study_name"]
    return out


def run_name(cfg: DictConfig) -> str:
    """tracking.run_name when set; a sweep's trial: `<study>#<n> <searched values>`; otherwise the factors,
    e.g. `int2-ttha-saturated-s0` (the stress scenario joins them when there is one)."""
    if cfg.tracking.get("run_name"):
        return str(cfg.tracking.run_name)
    tags = dict(cfg.tracking.get("tags") or {})
    if "trial_number" in tags:
        label = f"{tags.get('study_name', 'trial')}#{tags['trial_number']}"
        return f"{label} {tags['trial_params']}".strip() if tags.get("trial_params") else label
    parts = [cfg.experts.name, cfg.router.name, cfg.workload.kind]
    if cfg.stress.kind != "none":
        parts.append(cfg.stress.kind)
    return "-".join(str(p) for p in parts) + f"-s{cfg.seed}"


def trial_params(params: dict[str, Any]) -> str:
    """A trial's searched values, short: the last part of each key unless two keys share it."""
    last = [k.rsplit(".", 1)[-1] for k in params]
    items = []
    for (key, value), short in zip(params.items(), last):
        name = short if last.count(short) == 1 else key
        items.append(f"{name}={value:.3g}" if isinstance(value, float) else f"{name}={value}")
    return " ".join(items)


def note(cfg: DictConfig, summary: dict[str, float] | None = None) -> str:
    """Markdown: the setup in one line, then (once the run has them) its key results."""
    f = factors(cfg)
    head = (f"**{f['experts']} experts · {f['router']} router · {f['workload']} · stress {f['stress']} · "
            f"seed {f['seed']}**")
    if "trial" in f:
        params = (cfg.tracking.get("tags") or {}).get("trial_params") or ""
        head += f"  \nsweep {f.get('sweep', '')}, trial {f['trial']} {params}".rstrip()
    if summary is None:
        return head
    rows = [f"| {label} | {_fmt(fmt, summary.get(key))} |" for key, label, fmt in KEY_RESULTS]
    return "\n".join([head, "", "| result | value |", "|---|---|", *rows])


def _fmt(fmt: str, value: Any) -> str:
    if value is None:
        return "-"
    value = float(value)
    return fmt.format(value) if math.isfinite(value) else f"**{value}** (not finite)"
