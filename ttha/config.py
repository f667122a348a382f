"""Validation of the composed config: one line naming the offending key, before any work.

Hydra composes plain YAML; this module is the schema. `validate(cfg)` raises ConfigError
whose message is exactly the line a user sees ("targets.power_w=-5: must be > 0").
"""
from __future__ import annotations

import json
import math
import os
import socket
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


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
    "eval/mean_latency_ms", "eval/p50_latency_ms", "eval/p99_latency_ms", "ttt/skip_frac",
    "pretrain/test_perplexity",
)
CHOICES = {
    "device": None,  # checked by _check_device
    "kernels": ("auto", "triton", "torch"),
    "model.dtype": ("auto", "bf16", "fp16", "fp32"),
    "router.name": ("static", "ttha"),
    "stress.kind": ("none", "matmul", "bursty", "thermal_ramp"),
    "telemetry.source": ("auto", "nvml", "sim", "replay"),
    "workload.kind": ("saturated", "paced", "decode"),
    "ttt.policy": ("always", "never", "budget"),
}
INTEGER = [
    "model.vocab_size", "model.d_model", "model.n_layers", "model.n_heads", "model.d_ff", "model.n_experts",
    "model.top_k", "model.max_seq_len", "pretrain.steps", "pretrain.batch_size", "pretrain.seq_len",
    "pretrain.warmup_steps", "pretrain.eval_batches", "test.n_batches", "test.batch_size", "test.seq_len",
    "test.warmup_batches", "experts.group_size",
]
POSITIVE = [
    "model.d_model", "model.n_layers", "model.n_heads", "model.d_ff", "model.n_experts", "model.top_k",
    "model.max_seq_len", "pretrain.steps", "pretrain.batch_size", "pretrain.seq_len", "pretrain.lr",
    "test.n_batches", "test.batch_size", "test.seq_len", "targets.power_w", "targets.temp_c",
    "targets.latency_ms", "telemetry.sample_hz", "experts.group_size", "tracking.flush_every_s",
]
NON_NEGATIVE = [
    "objective.task_weight", "objective.power_weight", "objective.thermal_weight",
    "objective.latency_weight", "objective.throughput_weight", "objective.thermal_boost",
    "pretrain.weight_decay", "pretrain.aux_loss_weight", "pretrain.expert_drop", "pretrain.warmup_steps",
    "pretrain.eval_batches", "test.warmup_batches", "ttt.full_lr", "ttt.light_lr",
]
# Keys some options of a group leave out (router=static has no adapter): checked where present.
OPTIONAL_POSITIVE = ["router.lr", "router.max_bias", "router.loss_tokens", "router.adapter_hidden",
                     "router.activation_tau", "router.loss_steps"]
OPTIONAL_NON_NEGATIVE = ["router.cost_bias_scale", "router.balancer_alpha", "router.slope_span",
                         "objective.thermal_threshold_c"]
# MLflow's built-in tracking stores ('' is a local folder); network ones are checked with a short connect.
TRACKING_SCHEMES = ("", "file", "sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")
DEFAULT_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306, "mssql": 1433}
CONNECT_TIMEOUT_S = 3.0
TRAIN_BYTES_PER_PARAM = 16  # fp32 weight + gradient + AdamW's two moments: the least pretraining holds
PLOTS = {True: "all", False: "none", "all": "all", "timeline": "timeline", "none": "none"}  # tracking.plots


def option(node: Any, key: str, default: Any = None) -> Any:
    """node.key from a DictConfig, dict or object, with `default` when it is absent or null: the one
    accessor for library code that takes a config group or a plain object (tests, the profiler)."""
    value = node.get(key, default) if hasattr(node, "get") else getattr(node, key, default)
    return default if value is None else value


def plots_mode(value: Any) -> str:
    """tracking.plots as all, timeline or none: the one reading of it (validate, the tracker, plots.draw)."""
    if not isinstance(value, (bool, str)) or value not in PLOTS:  # a list is unhashable; 1 would pass as True
        raise ConfigError("tracking.plots", value, "must be all, timeline or none (true = all, false = none)")
    return PLOTS[value]


def _get(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
    if value is None:
        raise ConfigError(key, None, "is missing")
    return value


def _number(cfg: DictConfig, key: str) -> float:
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, value, "must be a number")
    if not math.isfinite(value):
        raise ConfigError(key, value, "must be a finite number")
    return float(value)


def _integer(cfg: DictConfig, key: str) -> int:
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, value, "must be an integer")
    return value


def _present(cfg: DictConfig, key: str) -> bool:
    return OmegaConf.select(cfg, key, default=None, throw_on_missing=False) is not None


def _first_line(err: BaseException) -> str:
    return next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)


def _check_device(value: str) -> None:
    if value in ("auto", "cpu", "cuda") or (isinstance(value, str) and value.startswith("cuda:")
                                           and value[5:].isdigit()):
        return
    raise ConfigError("device", value, "must be auto, cpu, cuda or cuda:N")


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError for the first bad value; return None when the config is usable.

    Values first, then what they point at (files, memory, folders, servers): cheapest first, and nothing
    is left behind (a folder's write probe is removed at once)."""
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:  # an ${interpolation} that does not resolve
        raise ConfigError(err.full_key or "config", str(err.child_node), _first_line(err)) from None
    _check_values(cfg)
    _check_cost_model(cfg)
    _check_memory(cfg)
    _check_folders(cfg)
    _check_tracking_uri(cfg)


def _check_values(cfg: DictConfig) -> None:
    for key, choices in CHOICES.items():
        value = _get(cfg, key)
        if key == "device":
            _check_device(value)
        elif value not in choices:
            raise ConfigError(key, value, f"must be one of {', '.join(choices)}")
    for key in INTEGER:
        _integer(cfg, key)
    for key in POSITIVE + [k for k in OPTIONAL_POSITIVE if _present(cfg, k)]:
        if _number(cfg, key) <= 0:
            raise ConfigError(key, _get(cfg, key), "must be > 0")
    for key in NON_NEGATIVE + [k for k in OPTIONAL_NON_NEGATIVE if _present(cfg, k)]:
        if _number(cfg, key) < 0:
            raise ConfigError(key, _get(cfg, key), "must be >= 0")
    if _present(cfg, "router.per_expert") and not isinstance(_get(cfg, "router.per_expert"), bool):
        raise ConfigError("router.per_expert", _get(cfg, "router.per_expert"), "must be true or false")
    for key in ("seed", "pretrain.seed"):  # numpy takes seeds in [0, 2**32)
        if key == "seed" or _present(cfg, key):
            if not 0 <= _integer(cfg, key) < 2**32:
                raise ConfigError(key, _get(cfg, key), "must be an integer in [0, 2**32)")

    m = cfg.model
    if m.vocab_size < 256:
        raise ConfigError("model.vocab_size", m.vocab_size, "must be >= 256 (the model reads bytes)")
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
    if cfg.workload.kind == "decode":
        if _present(cfg, "workload.steps_per_s") and _number(cfg, "workload.steps_per_s") <= 0:  # null: saturated
            raise ConfigError("workload.steps_per_s", cfg.workload.steps_per_s, "must be > 0 (or null: saturated)")
        n = _integer(cfg, "workload.steps_per_graph") if _present(cfg, "workload.steps_per_graph") else 1
        if n < 1 or cfg.test.seq_len % n:
            raise ConfigError("workload.steps_per_graph", n, f"must be >= 1 and divide test.seq_len={cfg.test.seq_len}")
    if _present(cfg, "telemetry.sim.decode_expert_params") and _number(cfg, "telemetry.sim.decode_expert_params") <= 0:
        raise ConfigError("telemetry.sim.decode_expert_params", cfg.telemetry.sim.decode_expert_params, "must be > 0")
    if _present(cfg, "tracking.log_every") and _integer(cfg, "tracking.log_every") < 1:
        raise ConfigError("tracking.log_every", cfg.tracking.log_every, "must be >= 1 (or null: per workload)")
    if cfg.router.adaptive and _integer(cfg, "router.update_every") < 1:
        raise ConfigError("router.update_every", cfg.router.update_every, "must be >= 1")
    if _present(cfg, "router.loss_steps"):
        _integer(cfg, "router.loss_steps")
    if _number(cfg, "pretrain.expert_drop") >= 1:
        raise ConfigError("pretrain.expert_drop", cfg.pretrain.expert_drop, "must be below 1 (a probability)")
    drop_bits = OmegaConf.select(cfg, "pretrain.expert_drop_bits", default=None)
    if drop_bits is not None:
        if not isinstance(drop_bits, (list, ListConfig)) or not drop_bits or any(b not in VALID_BITS for b in drop_bits):
            raise ConfigError("pretrain.expert_drop_bits", drop_bits, "must be null or a list of bits (2, 4, 8, 16)")
        if not set(drop_bits) & set(cfg.experts.bits):
            raise ConfigError("pretrain.expert_drop_bits", list(drop_bits),
                              f"no expert of experts.bits={list(cfg.experts.bits)} has these bits")
    drop_experts, n = OmegaConf.select(cfg, "pretrain.expert_drop_experts", default=None), cfg.model.n_experts
    if drop_experts is not None and (drop_bits is not None or not isinstance(drop_experts, (list, ListConfig)) or not
                                     drop_experts or any(not isinstance(i, int) or not 0 <= i < n for i in drop_experts)):
        raise ConfigError("pretrain.expert_drop_experts", drop_experts, f"must be null or a list of expert indices in "
                          f"0..{n - 1}, with pretrain.expert_drop_bits null")
    if _present(cfg, "data.test_frac") and not 0 < _number(cfg, "data.test_frac") < 1:
        raise ConfigError("data.test_frac", cfg.data.test_frac, "must be between 0 and 1")

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

    experiment = _get(cfg, "tracking.experiment")
    if not isinstance(experiment, str) or not experiment.strip():
        raise ConfigError("tracking.experiment", experiment, "must be a non-empty name")
    plots_mode(cfg.tracking.get("plots", True))
    for key in ("tracking.uri", "pretrain.cache_dir", "cost_model"):  # null means the default; '' is a slip
        if OmegaConf.select(cfg, key, default=None) == "":
            raise ConfigError(key, "", "must not be empty (leave it out, or null, for the default)")


def _check_cost_model(cfg: DictConfig) -> None:
    """An explicit cost model must load and price every operation the run asks it about."""
    from ttha import costs  # the cost-model schema lives with its reader

    value = cfg.get("cost_model")
    if value is None:
        return
    path = Path(str(value)).expanduser()
    if path.is_dir():  # it exists: 'file does not exist' would send the user looking for the wrong slip
        raise ConfigError("cost_model", str(value), "is a folder, not a cost-model JSON file")
    if not path.is_file():
        raise ConfigError("cost_model", str(value), "file does not exist")
    try:
        tables = costs.validate_schema(json.loads(path.read_text()), "cost model")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError("cost_model", str(value), f"cannot read it ({_first_line(err)})") from None
    except json.JSONDecodeError as err:
        raise ConfigError("cost_model", str(value), f"not valid JSON ({err})") from None
    except ValueError as err:
        raise ConfigError("cost_model", str(value), str(err).removeprefix("cost model: ")) from None
    needed = [costs.expert_op(b) for b in sorted({16, *cfg.experts.bits})] + ["ttt_full", "ttt_light"]
    missing = [op for op in needed if op not in tables]
    if missing:
        raise ConfigError("cost_model", str(value), f"has no ops.{missing[0]} (the run needs {', '.join(needed)})")


def model_parameters(m: DictConfig) -> int:
    """Parameters of the MoE LM that `model` describes (ttha.model.MoELM; embeddings tied)."""
    d, f, e = m.d_model, m.d_ff, m.n_experts
    per_layer = 4 * d * d + 4 * d + d * e + e * 2 * d * f  # qkv + proj, two LayerNorms, gate, experts
    return (m.vocab_size + m.max_seq_len) * d + m.n_layers * per_layer + 2 * d


def _memory(device: str) -> tuple[str, int | None]:
    """(what the model would live in, its size in bytes; None when unknown)."""
    import torch  # only here: the config schema itself needs no torch

    if device != "cpu" and torch.cuda.is_available():
        index = int(device[5:]) if device.startswith("cuda:") else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            return "GPU", None  # runtime.resolve_device names the bad index
        return torch.cuda.get_device_name(index), torch.cuda.get_device_properties(index).total_memory
    try:
        return "this machine's RAM", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (not POSIX)
        return "RAM", None


def _size(n: float) -> str:
    return f"{n / 1e9:.3g} GB" if n < 1e12 else f"{n / 1e12:.3g} TB"


def _check_memory(cfg: DictConfig) -> None:
    """Refuse a model, or a decode KV cache, that cannot fit before anything allocates it, naming the key."""
    m = cfg.model
    params = model_parameters(m)
    need = params * TRAIN_BYTES_PER_PARAM
    where, have = _memory(str(cfg.device))
    if have is None:
        return
    if need > have:
        key = max(("d_model", "d_ff", "n_experts", "n_layers", "max_seq_len"), key=lambda k: m[k])
        raise ConfigError(f"model.{key}", m[key], f"a model of {params:.3g} parameters needs at least "
                          f"{_size(need)} to pretrain ({TRAIN_BYTES_PER_PARAM} bytes each); {where}: {_size(have)}")
    if cfg.workload.kind == "decode":
        from ttha.decode import kv_cache_bytes  # serving's own formula; imports torch

        gpu = where not in ("RAM", "this machine's RAM")
        dtype = m.dtype if m.dtype != "auto" else ("bf16" if gpu else "fp32")
        b, s = int(cfg.test.batch_size), int(cfg.test.seq_len)
        cache = kv_cache_bytes(m, b, dtype, s)
        if cache + params * 4 > have:  # the cache beside the served model (its weights, at most fp32)
            raise ConfigError("test.batch_size", b, f"the decode KV cache needs {_size(cache)} ({b} streams x {s} "
                              f"positions x {m.n_layers} layers x {m.d_model} x 2, {dtype}) beside the model's "
                              f"{_size(params * 4)}; {where}: {_size(have)}")


def _check_writable(key: str, value: Any, path: Path) -> None:
    """`path` is a folder this process can write in, or can be created: its nearest existing ancestor is.
    Probed by making (and removing) a folder there: os.access passes root even on /proc or a read-only mount."""
    p = path.expanduser().absolute()
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        raise ConfigError(key, value, f"{p} is not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".ttha-probe-", dir=p))
    except OSError as err:
        raise ConfigError(key, value, f"{p} is not writable ({err.strerror})") from None


def _check_folders(cfg: DictConfig) -> None:
    from ttha.paths import outputs_root

    root = outputs_root()
    _check_writable("paths.outputs", OmegaConf.select(cfg, "paths.outputs", default=str(root)), root)
    cache = OmegaConf.select(cfg, "pretrain.cache_dir", default=None)
    if cache is not None:
        _check_writable("pretrain.cache_dir", str(cache), Path(str(cache)))


def _check_tracking_uri(cfg: DictConfig) -> None:
    """A tracking URI MLflow can open: a known scheme, a writable local store, a server that answers."""
    uri = OmegaConf.select(cfg, "tracking.uri", default=None)
    if uri is None:
        return  # the default store, under the outputs root (checked above)
    uri = str(uri)
    parsed = urlparse(uri)
    scheme = parsed.scheme.split("+")[0]  # postgresql+psycopg2 -> postgresql
    if scheme not in TRACKING_SCHEMES:
        raise ConfigError("tracking.uri", uri, f"unknown scheme {parsed.scheme!r}: use sqlite:///path.db, a folder, "
                          "http(s)://host:port or a database URL")
    if scheme == "sqlite":
        db = uri.split("://", 1)[1].removeprefix("/")
        if not db or db == ":memory:":
            raise ConfigError("tracking.uri", uri, "needs a file: sqlite:///path/to/mlflow.db")
        db_path = Path(db).expanduser()
        if db_path.exists() and (not db_path.is_file() or not os.access(db_path, os.W_OK)):
            raise ConfigError("tracking.uri", uri, f"{db_path} is not a writable file")
        _check_writable("tracking.uri", uri, db_path.parent)
    elif scheme in ("", "file"):
        _check_writable("tracking.uri", uri, Path(parsed.path if scheme else uri))
    elif scheme in DEFAULT_PORTS:
        host = parsed.hostname or "localhost"
        try:
            port = parsed.port or DEFAULT_PORTS[scheme]
        except ValueError:
            raise ConfigError("tracking.uri", uri, "the port is not a number") from None
        try:
            socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as err:
            reason = err.strerror or str(err) or type(err).__name__
            raise ConfigError("tracking.uri", uri, f"cannot connect to {host}:{port} ({reason})") from None


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
