"""Checks of conf/profile.yaml: each bad value is one ConfigError line naming its key, raised before any
profiling."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from ttha import costs
from ttha.config import ConfigError, option
from ttha.paths import launch_dir
from ttha.profiler.measure import device_name
from ttha.profiler.ops import OpTemplate

SIZES = ("auto", "full", "tiny")
MIN_WINDOW_S = 0.5  # NVML energy refreshes every ~100 ms: shorter windows are mostly quantisation error


def plain(node: Any) -> Any:
    """An omegaconf node (or anything) as plain JSON-able Python."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def check_batch_sizes(value: Any) -> list[int]:
    sizes = list(value) if isinstance(value, (list, tuple)) or hasattr(value, "__len__") else None
    if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
        raise ConfigError("batch_sizes", value, "expected a non-empty list of integers >= 1")
    if any(b2 <= b1 for b1, b2 in zip(sizes, sizes[1:])):
        raise ConfigError("batch_sizes", value, "must be strictly increasing")
    return [int(b) for b in sizes]


def check_counts(cfg: Any) -> tuple[int, int]:
    """(warmup, repeats) per op and batch size."""
    warmup, repeats = int(option(cfg, "warmup", 10)), int(option(cfg, "repeats", 50))
    if warmup < 0:
        raise ConfigError("warmup", warmup, "must be >= 0")
    if repeats < 1:
        raise ConfigError("repeats", repeats, "must be >= 1")
    return warmup, repeats


def resolve_size(cfg: Any, device: torch.device) -> tuple[str, dict]:
    size = str(option(cfg, "size", "auto"))
    if size not in SIZES:
        raise ConfigError("size", size, f"must be one of {', '.join(SIZES)}")
    if size == "auto":
        size = "full" if device.type == "cuda" else "tiny"
    shape = option(cfg, "sizes", {}).get(size)
    if shape is None:
        raise ConfigError(f"sizes.{size}", None, "missing")
    shape = dict(plain(shape))
    for key in ("d_model", "d_ff", "n_experts", "top_k", "ttt_seq_len"):
        if not isinstance(shape.get(key), int) or shape[key] < 1:
            raise ConfigError(f"sizes.{size}.{key}", shape.get(key), "expected an integer >= 1")
    return size, shape


def energy_settings(cfg: Any, device: torch.device) -> tuple[float | None, float]:
    """(seconds of the NVML energy window per op and batch size, None = latency only; seconds of idle power
    measured before and after)."""
    energy_cfg = option(cfg, "energy", {})
    mode = str(option(energy_cfg, "enabled", "auto"))
    if mode not in ("auto", "true", "false", "True", "False"):
        raise ConfigError("energy.enabled", mode, "must be auto, true or false")
    if mode.lower() == "true" and device.type != "cuda":
        raise ConfigError("energy.enabled", mode, "needs a CUDA device (NVML energy counter)")
    window = float(option(energy_cfg, "window_s", 1.0))
    if window < MIN_WINDOW_S:
        raise ConfigError("energy.window_s", window, f"must be >= {MIN_WINDOW_S} (NVML refreshes every 100 ms)")
    use_energy = device.type == "cuda" and mode.lower() != "false"
    return (window if use_energy else None), float(option(energy_cfg, "idle_s", 2.0))


def load_base(value: Any, device: torch.device) -> costs.KernelCostModel | None:
    """The `base` cost model, or None."""
    if not value:
        return None
    path = Path(str(value)).expanduser()
    try:
        base = costs.KernelCostModel.from_file(path if path.is_absolute() else launch_dir() / path, "base")
    except ValueError as err:
        raise ConfigError("base", str(value), str(err)) from None
    if base.gpu != device_name(device):
        raise ConfigError("base", str(value), f"measured on {base.gpu}, this run profiles {device_name(device)}")
    return base


def ttt_model(cfg: Any, shape: dict) -> Any:
    """The model config the TTT ops build: shape.ttt_model names one of cfg.models (conf/model/*.yaml,
    composed by the defaults list), or is a model config itself; null = no TTT ops."""
    choice = shape.get("ttt_model")
    if choice is None:
        return None
    if not hasattr(choice, "keys"):
        models = option(cfg, "models", {})
        if str(choice) not in models:
            raise ConfigError("ttt_model", choice, f"must be one of {', '.join(models) or '(no models composed)'}")
        choice = models[str(choice)]
    return OmegaConf.create(plain(choice))  # MoELM reads attributes


def pick_ops(templates: dict[str, OpTemplate], wanted: Any) -> dict[str, OpTemplate]:
    """The templates `ops` names (all of them for `all`)."""
    if wanted == "all":
        return templates
    unknown = [o for o in wanted if o not in templates]
    if unknown:
        raise ConfigError("ops", list(wanted), f"unknown {unknown}; known: {', '.join(templates)}")
    return {o: templates[o] for o in wanted}
