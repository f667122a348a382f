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
from ttha.profiler import decode
from ttha.profiler.decode import DecodeTemplate
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
    for key in ("d_model", "d_ff", "n_experts", "top_k", "ttt_seq_len", "decode_batch"):
        if isinstance(shape.get(key), bool) or not isinstance(shape.get(key), int) or shape[key] < 1:
            raise ConfigError(f"sizes.{size}.{key}", shape.get(key), "expected an integer >= 1")
    if shape["top_k"] > shape["n_experts"]:
        raise ConfigError(f"sizes.{size}.top_k", shape["top_k"], f"must be <= n_experts ({shape['n_experts']})")
    return size, shape


def decode_shape(cfg: Any, size: str, shape: dict) -> dict:
    """The layer the decode ops measure: the experts of the model shape.decode_model names (one of cfg.models,
    the model served in decode), or of the size itself when null."""
    choice = shape.get("decode_model")
    model = None
    if choice is not None:
        models = option(cfg, "models", {})
        if str(choice) not in models:
            raise ConfigError(f"sizes.{size}.decode_model", choice,
                              f"must be null or one of {', '.join(models) or '(no models composed)'}")
        model = dict(plain(models[str(choice)]))
    s = decode.decode_shape(shape, model)
    for key in ("d_model", "d_ff"):  # the grouped kernels' smallest tile; whole quantization groups
        if s[key] % 16 or s[key] % s["group_size"]:
            raise ConfigError(f"sizes.{size}.decode_model", choice,
                              f"its {key}={s[key]} must be a multiple of 16 and of group_size={s['group_size']}")
    return s


def check_decode_tokens(value: Any, shape: dict) -> list[int]:
    """Routed-token counts m the decode ops are measured at: null = 0, 1, ... decode_batch x top_k (a step's
    slots, `shape` from decode_shape); else a strictly increasing list from 0 up to that."""
    slots = shape["slots"]
    if value is None:
        return list(range(slots + 1))
    tokens = list(plain(value)) if isinstance(value, (list, tuple)) or OmegaConf.is_list(value) else None
    if (not tokens or len(tokens) < 2 or any(isinstance(m, bool) or not isinstance(m, int) for m in tokens)
            or tokens[0] != 0 or any(b <= a for a, b in zip(tokens, tokens[1:])) or tokens[-1] > slots):
        raise ConfigError("decode_tokens", plain(value),
                          f"expected null or a strictly increasing list of integers from 0 to at most {slots} "
                          f"(decode_batch x top_k)")
    return tokens


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


def pick_ops(templates: dict[str, OpTemplate], wanted: Any, decode: dict[str, DecodeTemplate] | None = None
             ) -> tuple[dict[str, OpTemplate], dict[str, DecodeTemplate]]:
    """(op templates, decode templates) that `ops` names (all of them for `all`)."""
    decode = decode or {}
    if wanted == "all":
        return templates, decode
    known = {**templates, **decode}
    unknown = [o for o in wanted if o not in known]
    if unknown:
        raise ConfigError("ops", list(wanted), f"unknown {unknown}; known: {', '.join(known)}")
    return ({o: templates[o] for o in wanted if o in templates}, {o: decode[o] for o in wanted if o in decode})
