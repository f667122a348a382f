"""Validation of the composed config: one line naming the offending key, before any work.

Hydra composes plain YAML; this module is the schema. `validate(cfg)` raises ConfigError
whose message is exactly the line a user sees ("targets.power_w=-5: must be > 0").
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


class ConfigError(ValueError):
    """A bad config value. str(err) is one line: '<key>=<value>: <what is wrong>'."""

    def __init__(self, key: str, value: Any, problem: str):
        self.key, self.value, self.problem = key, value, problem
        super().__init__(f"{key}={value!r}: {problem}")


VALID_BITS = (2, 4, 8, 16)
# Summary metrics a run returns to a sweeper (cfg.objectives names some of them).
SUMMARY_METRICS = (
    "eval/perplexity", "eval/tokens_per_s", "eval/energy_per_token_j", "eval/mean_power_w",
    "eval/max_temp_c", "eval/time_over_power_target_frac", "eval/time_over_temp_target_frac",
    "eval/mean_latency_ms", "ttt/skip_frac", "pretrain/test_perplexity",
)
CHOICES = {
    "device": None,  # checked by _check_device
    "kernels": ("auto", "triton", "torch"),
    "model.dtype": ("auto", "bf16", "fp16", "fp32"),
    "router.name": ("static", "ttha"),
    "stress.kind": ("none", "matmul", "bursty", "thermal_ramp"),
    "telemetry.source": ("auto", "nvml", "sim", "replay"),
    "workload.kind": ("saturated", "paced"),
    "ttt.policy": ("always", "never", "budget"),
}
POSITIVE = [
    "model.d_model", "model.n_layers", "model.n_heads", "model.d_ff", "model.n_experts", "model.top_k",
    "model.max_seq_len", "pretrain.steps", "pretrain.batch_size", "pretrain.seq_len", "pretrain.lr",
    "test.n_batches", "test.batch_size", "test.seq_len", "targets.power_w", "targets.temp_c",
    "targets.latency_ms", "telemetry.sample_hz", "experts.group_size",
]
NON_NEGATIVE = [
    "objective.task_weight", "objective.power_weight", "objective.thermal_weight",
    "objective.latency_weight", "objective.throughput_weight", "objective.thermal_boost",
    "pretrain.weight_decay", "pretrain.aux_loss_weight", "test.warmup_batches", "ttt.full_lr", "ttt.light_lr",
]


def option(node: Any, key: str, default: Any = None) -> Any:
    """node.key from a DictConfig, dict or object, with `default` when it is absent or null: the one
    accessor for library code that takes a config group or a plain object (tests, the profiler)."""
    value = node.get(key, default) if hasattr(node, "get") else getattr(node, key, default)
    return default if value is None else value


def _get(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
    if value is None:
        raise ConfigError(key, None, "is missing")
    return value


def _number(cfg: DictConfig, key: str) -> float:
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, value, "must be a number")
    return float(value)


def _check_device(value: str) -> None:
    if value in ("auto", "cpu", "cuda") or (isinstance(value, str) and value.startswith("cuda:")
                                           and value[5:].isdigit()):
        return
    raise ConfigError("device", value, "must be auto, cpu, cuda or cuda:N")


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError for the first bad value; return None when the config is usable."""
    for key, choices in CHOICES.items():
        value = _get(cfg, key)
        if key == "device":
            _check_device(value)
        elif value not in choices:
            raise ConfigError(key, value, f"must be one of {', '.join(choices)}")
    for key in POSITIVE:
        if _number(cfg, key) <= 0:
            raise ConfigError(key, _get(cfg, key), "must be > 0")
    for key in NON_NEGATIVE:
        if _number(cfg, key) < 0:
            raise ConfigError(key, _get(cfg, key), "must be >= 0")

    m = cfg.model
    if m.top_k > m.n_experts:
        raise ConfigError("model.top_k", m.top_k, f"larger than model.n_experts={m.n_experts}")
    if m.d_model % m.n_heads:
        raise ConfigError("model.n_heads", m.n_heads, f"must divide model.d_model={m.d_model}")
    for key in ("test.seq_len", "pretrain.seq_len"):
        if _get(cfg, key) > m.max_seq_len:
            raise ConfigError(key, _get(cfg, key), f"exceeds model.max_seq_len={m.max_seq_len}")

    bits = _get(cfg, "experts.bits")
    if not isinstance(bits, (list, ListConfig)) or len(bits) == 0:
        raise ConfigError("experts.bits", bits, "must be a non-empty list")
    for i, b in enumerate(bits):
        if b not in VALID_BITS:
            raise ConfigError(f"experts.bits[{i}]", b, "bits must be one of 2, 4, 8, 16")
    if len(bits) > m.n_experts:
        raise ConfigError("experts.bits", list(bits), f"has more entries than model.n_experts={m.n_experts}")
    gs = cfg.experts.group_size
    if gs not in (32, 64, 128):
        raise ConfigError("experts.group_size", gs, "must be one of 32, 64, 128")
    for dim in ("d_model", "d_ff"):
        if any(b in (2, 4) for b in bits) and m[dim] % gs:
            raise ConfigError("experts.group_size", gs, f"must divide model.{dim}={m[dim]}")

    if cfg.workload.kind == "paced" and _number(cfg, "workload.tokens_per_s") <= 0:
        raise ConfigError("workload.tokens_per_s", cfg.workload.tokens_per_s, "must be > 0")
    if cfg.router.adaptive and _number(cfg, "router.update_every") < 1:
        raise ConfigError("router.update_every", cfg.router.update_every, "must be >= 1")

    corpus = OmegaConf.select(cfg, "data.corpus_dir", default=None)
    if corpus is not None:
        path = Path(str(corpus)).expanduser()
        if not path.is_dir():
            raise ConfigError("data.corpus_dir", str(corpus), "does not exist or is not a folder")
        if not any(p.is_file() and p.stat().st_size > 0 for p in path.rglob("*")):
            raise ConfigError("data.corpus_dir", str(corpus), "holds no non-empty files")

    objectives = _get(cfg, "objectives")
    if isinstance(objectives, str):
        objectives = [objectives]
    if len(objectives) == 0:
        raise ConfigError("objectives", list(objectives), "name at least one summary metric")
    for i, name in enumerate(objectives):
        if name not in SUMMARY_METRICS:
            raise ConfigError(f"objectives[{i}]", name, f"must be one of {', '.join(SUMMARY_METRICS)}")


def flatten(cfg: DictConfig) -> dict[str, Any]:
    """{'model.d_model': 128, ...}: the composed config as MLflow params."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            out[prefix] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out
