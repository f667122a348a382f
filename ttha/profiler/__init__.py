"""Profile operations into a measured cost model (the library behind profile_kernels.py).

  ops      which operations exist (experts per precision and path, router, TTHA update, TTT) and how
           each is built for a batch size and called
  decode   the grouped MoE decode op per expert precision and routed-token count (the decode section)
  measure  latency per call, NVML energy per call over a counter-aligned window, idle power; `profile`
           runs every op at every batch size into the cost-model dict
  report   the cost-model JSON, torch.profiler traces parsed back into it, plot, table, MLflow run
  config   checks of conf/profile.yaml, each a one-line ConfigError naming its key, before any work
`run(cfg)` ties them together.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ttha import costs
from ttha.config import option
from ttha.paths import launch_dir, outputs_root
from ttha.profiler import config, decode, measure, ops, report
from ttha.runtime import limit_host_threads, resolve_device, set_kernel_backend

log = logging.getLogger(__name__)


def run(cfg: Any) -> tuple[Path, dict]:
    """Profile per the config (conf/profile.yaml); write the JSON, log the MLflow run; (path, data)."""
    device = resolve_device(option(cfg, "device", "auto"))
    limit_host_threads(device)  # as in a run: the host-side ops (ttha_update) are timed as served
    batch_sizes = config.check_batch_sizes(option(cfg, "batch_sizes"))
    warmup, repeats = config.check_counts(cfg)
    size, shape = config.resolve_size(cfg, device)
    window, idle_s = config.energy_settings(cfg, device)
    kernels_choice = set_kernel_backend(str(option(cfg, "kernels", "auto")))
    base = config.load_base(option(cfg, "base"), device)
    torch.manual_seed(int(option(cfg, "seed", 0)))
    ttt_model = config.ttt_model(cfg, shape)
    rotate_bytes = int(option(cfg, "rotate_bytes", 256 << 20))
    ctx = ops.Context(device, ops.serving_dtype(device), shape, ttt_model, rotate_bytes)
    decode_shape = config.decode_shape(cfg, size, shape)
    decode_tokens = config.check_decode_tokens(option(cfg, "decode_tokens"), decode_shape)
    templates, decode_templates = config.pick_ops(
        ops.operation_templates(ctx), option(cfg, "ops", "all"),
        {t.name: t for t in decode.decode_templates(ctx, decode_shape)})
    # a busy shared CPU times erratically with spinning threads
    threads = int(option(cfg, "cpu_threads")) if device.type == "cpu" and option(cfg, "cpu_threads") else None

    with measure.host_threads(threads):
        data = measure.profile(templates, batch_sizes, device, warmup=warmup, repeats=repeats,
                               energy_window_s=window, idle_s=idle_s, progress=bool(option(cfg, "progress", True)),
                               decode=decode_templates, decode_tokens=decode_tokens)
    data["shape"] = {**shape, "size": size, "ttt_model": config.plain(ttt_model)}
    if "decode" in data:
        data["decode"] = {"shape": decode_shape, "method": decode.METHOD, **data["decode"]}
    data["kernels_backend"] = kernels_choice
    if base is not None:
        report.carry_over(data, base)
    costs.KernelCostModel(data, "profile")  # schema check before anything is written

    out = option(cfg, "out")
    path = Path(out) if out else outputs_root() / "cost_models" / costs.gpu_file_name(data["gpu"])
    path = path if path.is_absolute() else launch_dir() / path
    path.parent.mkdir(parents=True, exist_ok=True)
    report.write_json(path, data)
    log.info("cost model: %s (%d ops, %.1f s)", path, len(data["ops"]), data["profile_seconds"])
    artifacts = [path, report.plot(data, path.with_suffix(".png"))]

    trace_cfg = option(cfg, "trace", {})
    if bool(option(trace_cfg, "save", False)):
        with measure.host_threads(threads):
            trace = report.save_trace(templates, batch_sizes, device, path.with_name(path.stem + ".trace.json"),
                                      int(option(trace_cfg, "repeats", 5)))
        parsed = path.with_name(path.stem + ".from_trace.json")
        artifacts += [report.write_json(parsed, report.parse_trace(trace, data["gpu"], data["shape"]))]
    report.track(cfg, data, artifacts)
    return path, data
