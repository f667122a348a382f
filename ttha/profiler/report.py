"""What a profile leaves behind: the cost-model JSON, a torch.profiler trace parsed into the same schema,
the plot and text table, and the MLflow run (through ttha.tracking)."""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, record_function

from ttha import costs
from ttha.config import flatten, option
from ttha.profiler.measure import PROFILE_VERSION, sync
from ttha.profiler.ops import OpTemplate

TRACE_LABEL = "{op}@{batch}"  # record_function label of one call in a torch.profiler trace


def write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def carry_over(data: dict, base: costs.KernelCostModel) -> list[str]:
    """Copy into `data` the ops of `base` that `data` lacks, decode ops included where both measured the same
    decode shape (or `data` none); record which, and from where."""
    carried = [op for op in base.ops if op not in data["ops"]]
    for op in carried:
        data["ops"][op] = base.data["ops"][op]
    base_decode = base.data.get("decode")
    if base_decode:
        ours = data.setdefault("decode", {"shape": base_decode["shape"], "method": base_decode.get("method"),
                                          "ops": {}})
        if ours["shape"] == base_decode["shape"]:
            extra = [op for op in base_decode["ops"] if op not in ours["ops"]]
            ours["ops"].update({op: base_decode["ops"][op] for op in extra})
            carried += extra
    data["carried_over"] = {"from": base.source, "created": base.data.get("created"), "ops": carried}
    return carried


# ---------------------------------------------------------------------------------------------------
# torch.profiler traces
def save_trace(templates: dict[str, OpTemplate], batch_sizes: list[int], device: torch.device, path: str | Path,
               repeats: int = 5, warmup: int = 2) -> Path:
    """Run each op `repeats` times per batch size under torch.profiler, each call labelled op@batch,
    and export a Chrome trace to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    calls = []
    for op in templates.values():
        for b in batch_sizes:
            fn = op.build(b)
            for _ in range(warmup):
                fn()
            calls.append((TRACE_LABEL.format(op=op.name, batch=b), fn))
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _, fn in calls:  # unlabelled: the profiler's own start-up cost lands on these calls
            fn()
        sync(device)
        for label, fn in calls:
            for _ in range(repeats):
                with record_function(label):  # the CPU span = wall time of one call, launch to done
                    fn()
                    sync(device)
    prof.export_chrome_trace(str(path))
    return path


def parse_trace(path: str | Path, gpu: str | None = None, shape: dict | None = None) -> dict:
    """A cost model (schema 1, energy null) from a trace `save_trace` wrote: per op@batch label the
    median wall time of one call (the CPU span of the label, which waits for the GPU); gpu_span_ms = the
    median GPU-side span (first kernel to last) where the trace has one. Host-side ops (the TTHA update)
    have a short GPU span and a long wall time: the wall time is what a run waits for."""
    path = Path(path)
    try:
        events = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"trace={str(path)!r}: not a readable Chrome trace ({err})") from None
    events = events.get("traceEvents", []) if isinstance(events, dict) else events
    spans: dict[tuple[str, int], dict[str, list[float]]] = {}
    for ev in events:
        name, cat = ev.get("name", ""), ev.get("cat", "")
        if ev.get("ph") != "X" or "@" not in name or cat not in ("user_annotation", "gpu_user_annotation"):
            continue
        op, _, batch = name.rpartition("@")
        if not batch.isdigit():
            continue
        spans.setdefault((op, int(batch)), {}).setdefault(cat, []).append(float(ev.get("dur", 0.0)) / 1e3)
    if not spans:
        raise ValueError(f"trace={str(path)!r}: no op@batch annotations (was it written by save_trace?)")
    ops: dict[str, dict] = {}
    for (op, batch), by_cat in sorted(spans.items()):
        if "user_annotation" not in by_cat:
            continue
        entry = ops.setdefault(op, {"batch_sizes": [], "latency_ms": [], "energy_j": None, "gpu_span_ms": []})
        entry["batch_sizes"].append(batch)
        entry["latency_ms"].append(float(statistics.median(by_cat["user_annotation"])))
        gpu_spans = by_cat.get("gpu_user_annotation")
        entry["gpu_span_ms"].append(float(statistics.median(gpu_spans)) if gpu_spans else None)
    return {"schema_version": costs.SCHEMA_VERSION, "gpu": gpu or "unknown", "estimated": False,
            "source": f"torch.profiler trace {path.name} (ttha.profiler.parse_trace)",
            "note": "latency_ms: median span of each op@batch annotation; no energy in a trace",
            "profile_version": PROFILE_VERSION, "shape": dict(shape or {}), "ops": ops}


# ---------------------------------------------------------------------------------------------------
def plot(data: dict, path: str | Path) -> Path:
    """Latency and energy per token vs batch size per expert op, log-log; with a decode section, a third panel:
    the latency one expert adds to the decode op vs the tokens routed to it, per precision."""
    import matplotlib

    matplotlib.use("Agg")  # headless; set only when a plot is drawn, not on import
    import matplotlib.pyplot as plt

    decode = (data.get("decode") or {}).get("ops") or {}
    fig, axes = plt.subplots(1, 3 if decode else 2, figsize=(16 if decode else 11, 4.2))
    experts = {k: v for k, v in data["ops"].items() if k.startswith("expert_")}
    for name, entry in sorted(experts.items()):
        b = entry["batch_sizes"]
        style = "--" if name.endswith("_torch") else "-"
        axes[0].plot(b, [1e3 * v / t for v, t in zip(entry["latency_ms"], b)], style, marker="o", label=name)
        if entry.get("energy_j") is not None:
            axes[1].plot(b, [1e3 * v / t for v, t in zip(entry["energy_j"], b)], style, marker="o", label=name)
    axes[0].set(title="latency per token", xlabel="batch (tokens)", ylabel="µs / token", xscale="log",
                yscale="log")
    if any(e.get("energy_j") is not None for e in experts.values()):
        axes[1].set(title=f"energy per token (net of idle {data.get('idle_w') or 0:.0f} W)",
                    xlabel="batch (tokens)", ylabel="mJ / token", xscale="log", yscale="log")
        axes[1].legend(fontsize=8)
    else:
        axes[1].text(0.5, 0.5, "no energy measured (a CPU, or no expert ops)", ha="center", va="center")
        axes[1].set_axis_off()
    if experts:  # a legend without labelled lines only warns
        axes[0].legend(fontsize=8)
    for name, entry in sorted(decode.items()):
        lat = entry["latency_ms"]
        axes[2].plot(entry["tokens"], [1e3 * (v - lat[0]) for v in lat], marker="o", label=name)
    if decode:
        shape = data["decode"].get("shape", {})
        axes[2].set(title=f"decode: one expert's cost, {shape.get('d_model')} x {shape.get('d_ff')}",
                    xlabel="tokens routed to it (m)", ylabel="µs added over m = 0")
        axes[2].legend(fontsize=8)
    fig.suptitle(f"{data['gpu']} — d_model={data['shape'].get('d_model')}, d_ff={data['shape'].get('d_ff')}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def aligned(rows: list[list[str]], gap: int = 2) -> list[str]:
    """Rows of cells as text columns: the first left-aligned, the others right-aligned, each as wide as its
    widest cell and `gap` spaces apart, so no two values ever run together whatever their size."""
    width = [max(len(r[i]) for r in rows if i < len(r)) for i in range(max(map(len, rows)))]
    return [(" " * gap).join(c.ljust(width[i]) if i == 0 else c.rjust(width[i]) for i, c in enumerate(r)).rstrip()
            for r in rows]


def table(data: dict) -> str:
    """Text table: per op and batch, latency (ms, us/token) and net energy (J, mJ/token); then per decode op and
    routed-token count m, the grouped op's latency and energy and what the expert adds over m = 0."""
    title = f"{data['gpu']}  idle {data['idle_w']:.1f} W" if data.get("idle_w") is not None else data["gpu"]
    energy = any(e.get("energy_j") is not None for e in data["ops"].values())
    rows = [["op", "batch", "lat ms", "us/tok"] + (["E net J", "mJ/tok", "E gross J"] if energy else [])]
    for op, e in data["ops"].items():
        for i, b in enumerate(e["batch_sizes"]):
            lat = e["latency_ms"][i]
            row = [op, str(b), f"{lat:.4f}", f"{1e3 * lat / b:.3f}"]
            if e.get("energy_j") is not None:
                gross = (e.get("energy_j_gross") or e["energy_j"])[i]
                row += [f"{e['energy_j'][i]:.5f}", f"{1e3 * e['energy_j'][i] / b:.4f}", f"{gross:.5f}"]
            rows.append(row)
    lines = [title, *aligned(rows)]
    decode = (data.get("decode") or {}).get("ops") or {}
    if decode:
        energy = any(e.get("energy_j") is not None for e in decode.values())
        rows = [["decode op", "m", "lat ms", "+us over m=0"] + (["E net mJ", "+mJ over m=0"] if energy else [])]
        for op, e in decode.items():
            for i, m in enumerate(e["tokens"]):
                lat = e["latency_ms"][i]
                row = [op, str(m), f"{lat:.4f}", f"{1e3 * (lat - e['latency_ms'][0]):.2f}"]
                if e.get("energy_j") is not None:
                    row += [f"{1e3 * e['energy_j'][i]:.4f}", f"{1e3 * (e['energy_j'][i] - e['energy_j'][0]):.4f}"]
                rows.append(row)
        lines += ["", *aligned(rows)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# MLflow
def summary_metrics(data: dict) -> dict[str, float]:
    """Flat metrics for MLflow: latency_ms/<op>/b<batch>, energy_j/<op>/b<batch> (net); for decode ops
    latency_ms/<op>/m<tokens>, energy_j/<op>/m<tokens>."""
    out = {"profile/seconds": float(data["profile_seconds"])}
    if data.get("idle_w") is not None:
        out["profile/idle_w"] = float(data["idle_w"])
    for op, entry in data["ops"].items():
        for i, b in enumerate(entry["batch_sizes"]):
            out[f"latency_ms/{op}/b{b}"] = float(entry["latency_ms"][i])
            if entry.get("energy_j") is not None:
                out[f"energy_j/{op}/b{b}"] = float(entry["energy_j"][i])
    for op, entry in ((data.get("decode") or {}).get("ops") or {}).items():
        for i, m in enumerate(entry["tokens"]):
            out[f"latency_ms/{op}/m{m}"] = float(entry["latency_ms"][i])
            if entry.get("energy_j") is not None:
                out[f"energy_j/{op}/m{m}"] = float(entry["energy_j"][i])
    return out


def track(cfg: Any, data: dict, artifacts: list[Path]) -> None:
    """One MLflow run (when tracking.enabled): the config as params, the profile as summary metrics, the
    written files as artifacts."""
    tracking_cfg = option(cfg, "tracking")
    if tracking_cfg is None or not bool(option(tracking_cfg, "enabled", True)):
        return
    from ttha.tracking import tracker_from_config  # mlflow is imported only when a run is logged

    tracker = tracker_from_config(tracking_cfg)
    tags = {"kind": "profile", "gpu": data["gpu"], "device": data["device"], "torch": data["torch"],
            "triton": data["triton"], "driver": data["driver"]}
    with tracker:
        tracker.start(option(tracking_cfg, "run_name") or f"profile-{costs.gpu_file_name(data['gpu'])[:-5]}", tags)
        tracker.log_params(flatten(cfg) if hasattr(cfg, "_get_node") else {})
        tracker.log_summary(summary_metrics(data))
        tracker.log_artifacts(artifacts)
