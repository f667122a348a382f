"""PNG plots of a run's per-step records (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ttha.config import plots_mode  # noqa: E402


def draw(which: str, rows: list[dict], targets: dict, expert_bits: list[int], out: Path) -> list[Path]:
    """The run's plots: `all`, `timeline` (the telemetry timeline alone: cheap enough for every sweep trial)
    or `none` (tracking.plots; true and false mean all and none)."""
    which = plots_mode(which)
    if which == "none":
        return []
    paths = [telemetry_timeline(rows, targets, out / "telemetry.png")]
    if which == "all":
        paths += [expert_usage(rows, expert_bits, out / "expert_usage.png"), loss_terms(rows, out / "loss_terms.png")]
    return paths


def _col(rows: list[dict], key: str) -> list[float]:
    return [r.get(key, float("nan")) for r in rows]


def _legend(ax, **kwargs) -> None:
    """A legend when the axes has labelled lines (a static router logs no loss terms: none to show)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def telemetry_timeline(rows: list[dict], targets: dict, path: Path) -> Path:
    """Power and temperature per step, with their targets, and the TTT mode."""
    steps = _col(rows, "step")
    fig, (ax_p, ax_t, ax_m) = plt.subplots(3, 1, figsize=(9, 7), sharex=True)
    ax_p.plot(steps, _col(rows, "telemetry/power_w"), label="power")
    ax_p.axhline(targets["power_w"], color="r", ls="--", label=f"target {targets['power_w']:.0f} W")
    ax_p.set_ylabel("power [W]")
    _legend(ax_p, loc="upper right")
    ax_t.plot(steps, _col(rows, "telemetry/temp_c"), color="tab:orange", label="temperature")
    ax_t.axhline(targets["temp_c"], color="r", ls="--", label=f"target {targets['temp_c']:.0f} °C")
    ax_t.set_ylabel("temperature [°C]")
    _legend(ax_t, loc="upper right")
    modes = [(r["step"], r["ttt/mode"]) for r in rows if "ttt/mode" in r]  # decode: one per finished sequence
    if modes:
        ax_m.step(*zip(*modes), where="post", color="tab:green")
    ax_m.set_yticks([0, 1, 2], ["skip", "light", "full"])
    ax_m.set_ylabel("TTT")
    ax_m.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def expert_usage(rows: list[dict], expert_bits: list[int], path: Path) -> Path:
    """Share of routed tokens per expert over time (stacked)."""
    steps = _col(rows, "step")
    shares = [_col(rows, f"experts/usage_{i}") for i in range(len(expert_bits))]
    labels = [f"expert {i} ({b}-bit)" for i, b in enumerate(expert_bits)]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.stackplot(steps, shares, labels=labels)
    ax.set_ylim(0, 1)
    ax.set_xlabel("step")
    ax.set_ylabel("share of routed tokens")
    _legend(ax, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def loss_terms(rows: list[dict], path: Path) -> Path:
    """Each TTHA loss term per adapter update."""
    fig, ax = plt.subplots(figsize=(9, 4))
    for key in ("loss/task", "loss/power", "loss/temp", "loss/latency", "loss/throughput_bonus", "loss/total"):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), label=key.split("/")[1])
    ax.set_xlabel("step")
    ax.set_ylabel("loss term")
    _legend(ax, loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
