"""KernelCostModel: per-operation latency and energy as a function of batch size (tokens).

The router and the TTT policy ask it what an operation costs: `get_cost(op, batch_size)`.
A cost model is a JSON file (schema below). `KernelCostModel.load()` picks, in order, an explicit path,
the file measured on the GPU this process runs on (cost_models/<gpu-name>.json under the outputs root,
written by profile_kernels.py), the shipped file measured on that kind of GPU (ttha/resources/cost_model_*.json
whose `gpu` is its name, e.g. cost_model_h200.json), or the shipped default ttha/resources/cost_model_h100.json,
measured on an H100 with profile_kernels.py (CUDA events, NVML energy net of idle).

Decode (schema 2): a decode step reads an expert's weights once if the router gives it any token and not at all
if it gets none, so the step's cost is set by which experts are activated. `decode_cost(bits, m)` is what one
expert of `bits` bits adds to the grouped MoE decode op (ttha.kernels.moe_decode) when it serves m of the step's
routed tokens: 0 at m = 0. profile_kernels.py measures it (the `decode` section); a file without that section
answers from the per-expert op instead (expert_<bits> on m tokens).

ttha/resources/cost_model_estimate.json holds roofline ESTIMATES for an H100 (bytes moved and FLOPs per
operation, `estimate_h100`), marked "estimated": true; tests use it where they need quantized experts to
be the cheap ones. Regenerate it with `python -m ttha.costs`.

Schema (version 2; version 1 is the same without `decode`, and still loads):
    {"schema_version": 2, "gpu": str, "estimated": bool, "source": str, "note": str (optional),
     "shape": {"d_model": int, "d_ff": int, ...},
     "ops": {op: {"batch_sizes": [int, ...] (increasing, > 0),
                  "latency_ms": [number, ...] (one per batch size),
                  "energy_j": [number, ...] or null (unknown, e.g. profiled on a CPU)}},
     "decode": (optional) {"shape": {"d_model": int, "d_ff": int, "n_experts": int, ...},
                "ops": {"moe_decode_16bit" | "moe_decode_int4" | "moe_decode_int2":
                        {"tokens": [0, int, ...] (routed tokens m on the one expert: from 0, increasing),
                         "latency_ms": [number, ...] (the whole grouped op, one per m),
                         "energy_j": [number, ...] or null}}}}
"""
from __future__ import annotations

import argparse
import bisect
import json
import logging
import math
import re
from pathlib import Path
from typing import Any, NamedTuple

from ttha.paths import outputs_root

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
SCHEMA_VERSIONS = (1, 2)  # 2 adds the optional decode section
RESOURCES = Path(__file__).resolve().parent / "resources"
DEFAULT_PATH = RESOURCES / "cost_model_h100.json"  # measured (profile_kernels.py on an H100)
ESTIMATE_PATH = RESOURCES / "cost_model_estimate.json"  # roofline estimates (python -m ttha.costs)
EXPERT_OPS = {16: "expert_16bit", 8: "expert_fp8", 4: "expert_int4", 2: "expert_int2"}
DECODE_OPS = {16: "moe_decode_16bit", 4: "moe_decode_int4", 2: "moe_decode_int2"}  # the grouped kernel's precisions


class Cost(NamedTuple):
    latency_ms: float
    energy_j: float | None  # None: unknown (no energy counter where it was measured)


def expert_op(bits: int) -> str:
    """Op name of an expert forward with weights of `bits` bits (16 = the model's 16-bit dtype)."""
    try:
        return EXPERT_OPS[int(bits)]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"bits={bits!r}: must be one of {', '.join(map(str, sorted(EXPERT_OPS)))}") from None


def decode_op(bits: int) -> str:
    """Op name of the grouped MoE decode op measured for one expert of `bits` bits (the decode section)."""
    try:
        return DECODE_OPS[int(bits)]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"bits={bits!r}: must be one of {', '.join(map(str, sorted(DECODE_OPS)))}") from None


def gpu_file_name(gpu_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3.json' (the profiler writes under this name)."""
    return re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-") + ".json"


def _current_gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # a broken driver is not a reason to fail loading a cost table
        return None


def _shipped_for(gpu: str) -> Path | None:
    """The shipped measured cost model (ttha/resources/cost_model_*.json) whose `gpu` is `gpu`, if any."""
    for path in sorted(RESOURCES.glob("cost_model_*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):  # a damaged file is reported when it is loaded explicitly
            continue
        if isinstance(data, dict) and data.get("gpu") == gpu and data.get("estimated") is False:
            return path
    return None


def _numbers(where: str, value: Any, n: int, allow_null: bool, per: str = "batch size") -> list[float] | None:
    if value is None and allow_null:
        return None
    if not isinstance(value, list) or len(value) != n:
        got = f"{len(value)} values" if isinstance(value, list) else type(value).__name__
        raise ValueError(f"{where}: expected a list of {n} numbers (one per {per}), got {got}")
    if allow_null and all(v is None for v in value):
        return None
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{where}: {v!r} is not a finite number >= 0")
    return [float(v) for v in value]


def validate_schema(data: Any, where: str = "cost model") -> dict[str, dict[str, list[float] | None]]:
    """Check `data` against the schema (version 1 or 2, the decode section included); return
    {op: {batch_sizes, latency_ms, energy_j}}. Raises ValueError naming the offending field."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    version = data.get("schema_version")
    if isinstance(version, bool) or version not in SCHEMA_VERSIONS:
        raise ValueError(f"{where}: schema_version={version!r}: expected one of "
                         f"{', '.join(map(str, SCHEMA_VERSIONS))}")
    for key, kind in (("gpu", str), ("estimated", bool), ("source", str), ("shape", dict), ("ops", dict)):
        if not isinstance(data.get(key), kind):
            raise ValueError(f"{where}: {key}={data.get(key)!r}: expected a {kind.__name__}")
    if not data["ops"] and not data.get("decode"):
        raise ValueError(f"{where}: ops is empty")
    tables = {}
    for op, entry in data["ops"].items():
        w = f"{where}: ops.{op}"
        if not isinstance(entry, dict):
            raise ValueError(f"{w}: expected an object with batch_sizes, latency_ms, energy_j")
        bs = entry.get("batch_sizes")
        if (not isinstance(bs, list) or not bs
                or any(isinstance(b, bool) or not isinstance(b, (int, float)) or b <= 0 for b in bs)):
            raise ValueError(f"{w}.batch_sizes={bs!r}: expected a non-empty list of numbers > 0")
        if any(b2 <= b1 for b1, b2 in zip(bs, bs[1:])):
            raise ValueError(f"{w}.batch_sizes={bs!r}: must be strictly increasing")
        if "energy_j" not in entry:
            raise ValueError(f"{w}.energy_j: missing (write null when unknown)")
        tables[op] = {"batch_sizes": [float(b) for b in bs],
                      "latency_ms": _numbers(f"{w}.latency_ms", entry.get("latency_ms"), len(bs), False),
                      "energy_j": _numbers(f"{w}.energy_j", entry["energy_j"], len(bs), True)}
    validate_decode(data, where)
    return tables


def validate_decode(data: dict, where: str = "cost model") -> dict[int, dict[str, list[float] | None]]:
    """Check the optional decode section; return {bits: {tokens, latency_ms, energy_j}} ({} without one)."""
    section = data.get("decode")
    if section is None:
        return {}
    if data.get("schema_version") == 1:
        raise ValueError(f"{where}: decode: needs schema_version 2")
    if not isinstance(section, dict) or not isinstance(section.get("shape"), dict):
        raise ValueError(f"{where}: decode: expected an object with shape and ops")
    ops = section.get("ops")
    if not isinstance(ops, dict) or not ops:
        raise ValueError(f"{where}: decode.ops={ops!r}: expected a non-empty object")
    bits_of = {op: bits for bits, op in DECODE_OPS.items()}
    tables = {}
    for op, entry in ops.items():
        w = f"{where}: decode.ops.{op}"
        if op not in bits_of:
            raise ValueError(f"{w}: unknown decode op; known: {', '.join(DECODE_OPS.values())}")
        if not isinstance(entry, dict):
            raise ValueError(f"{w}: expected an object with tokens, latency_ms, energy_j")
        m = entry.get("tokens")
        if (not isinstance(m, list) or len(m) < 2
                or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in m)):
            raise ValueError(f"{w}.tokens={m!r}: expected a list of >= 2 integers >= 0")
        if m[0] != 0 or any(b <= a for a, b in zip(m, m[1:])):
            raise ValueError(f"{w}.tokens={m!r}: must start at 0 (no token on the expert) and increase")
        if "energy_j" not in entry:
            raise ValueError(f"{w}.energy_j: missing (write null when unknown)")
        tables[bits_of[op]] = {"tokens": [float(v) for v in m],
                               "latency_ms": _numbers(f"{w}.latency_ms", entry.get("latency_ms"), len(m), False,
                                                      "token count"),
                               "energy_j": _numbers(f"{w}.energy_j", entry["energy_j"], len(m), True, "token count")}
    return tables


def _interp_linear(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise linear in x; beyond the last point along the last segment's slope, never decreasing."""
    if x >= xs[-1]:
        return ys[-1] + max((ys[-1] - ys[-2]) / (xs[-1] - xs[-2]), 0.0) * (x - xs[-1])
    i = bisect.bisect_right(xs, x) - 1
    return ys[i] + (x - xs[i]) / (xs[i + 1] - xs[i]) * (ys[i + 1] - ys[i])


def _interp(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise linear in log(x) between points; clamp below the first; beyond the last, linear in x
    along the last segment's slope (never decreasing: cost grows ~linearly once compute bound)."""
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        if len(xs) == 1:
            return ys[0] * x / xs[0]  # one point: assume cost per token stays constant
        slope = max((ys[-1] - ys[-2]) / (xs[-1] - xs[-2]), 0.0)
        return ys[-1] + slope * (x - xs[-1])
    i = bisect.bisect_right(xs, x) - 1
    t = (math.log(x) - math.log(xs[i])) / (math.log(xs[i + 1]) - math.log(xs[i]))
    return ys[i] + t * (ys[i + 1] - ys[i])


class KernelCostModel:
    def __init__(self, data: dict, source: str = "dict"):
        self._tables = validate_schema(data, source)
        self._decode = validate_decode(data, source)
        self.data = data
        self.source = source  # which file (kind:path), logged as the run's `cost_model` tag
        self.gpu: str = data["gpu"]
        self.estimated: bool = data["estimated"]
        self.shape: dict = dict(data["shape"])

    @classmethod
    def from_file(cls, path: str | Path, kind: str = "file") -> "KernelCostModel":
        path = Path(path).expanduser()
        if not path.is_file():
            raise ValueError(f"cost_model={str(path)!r}: file does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"cost model {path}: not valid JSON ({err})") from None
        return cls(data, f"{kind}:{path}")

    @classmethod
    def load(cls, path: str | Path | None = None) -> "KernelCostModel":
        """An explicit path; else cost_models/<gpu-name>.json under the outputs root for this GPU if it
        exists; else the shipped file measured on this kind of GPU; else the shipped default. Logs which."""
        if path is not None:
            model = cls.from_file(path, "file")
        else:
            gpu = _current_gpu_name()
            measured = outputs_root() / "cost_models" / gpu_file_name(gpu) if gpu else None
            shipped = _shipped_for(gpu) if gpu else None
            if measured is not None and measured.is_file():
                model = cls.from_file(measured, "gpu")
            elif shipped is not None:
                model = cls.from_file(shipped, "shipped")
            else:
                model = cls.from_file(DEFAULT_PATH, "default")
        log.info("cost model: %s (gpu=%s, %s)", model.source, model.gpu,
                 "ESTIMATED" if model.estimated else "measured")
        return model

    @property
    def ops(self) -> list[str]:
        return sorted(self._tables)

    def batch_sizes(self, op: str) -> list[float]:
        return list(self._table(op)["batch_sizes"])

    def _table(self, op: str) -> dict:
        try:
            return self._tables[op]
        except KeyError:
            raise KeyError(f"unknown op {op!r}; known ops: {', '.join(self.ops)}") from None

    def get_cost(self, op: str, batch_size: float) -> Cost:
        """Cost of one call of `op` on `batch_size` tokens (interpolated in log batch size)."""
        t = self._table(op)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, float)) or not batch_size > 0:
            raise ValueError(f"batch_size={batch_size!r}: must be a number > 0")
        x = float(batch_size)
        energy = None if t["energy_j"] is None else _interp(t["batch_sizes"], t["energy_j"], x)
        return Cost(_interp(t["batch_sizes"], t["latency_ms"], x), energy)

    def has_decode_table(self, bits: int) -> bool:
        """Whether the decode op was measured for `bits` (else decode_cost answers from the per-expert op)."""
        return bits in self._decode

    def decode_cost(self, bits: int, tokens: float) -> Cost:
        """What one expert of `bits` bits adds to a decode step's grouped MoE op when it serves `tokens`
        routed tokens, over the same op with none on it: nothing at 0 tokens (its weights are not read).
        Linear in tokens between the measured counts, along the last slope beyond them. Without a measured
        table for `bits`: the per-expert op (expert_<bits>) on `tokens` tokens."""
        if isinstance(tokens, bool) or not isinstance(tokens, (int, float)) or not tokens >= 0 or math.isinf(tokens):
            raise ValueError(f"tokens={tokens!r}: must be a finite number >= 0")
        t = self._decode.get(bits)
        if t is None:
            if tokens == 0:
                known = self._table(expert_op(bits))["energy_j"] is not None
                return Cost(0.0, 0.0 if known else None)
            return self.get_cost(expert_op(bits), tokens)
        x = float(tokens)

        def over_none(ys):  # the op's cost with no token on the expert is paid whatever the routing
            return 0.0 if x == 0 else max(0.0, _interp_linear(t["tokens"], ys, x) - ys[0])
        energy = None if t["energy_j"] is None else over_none(t["energy_j"])
        return Cost(over_none(t["latency_ms"]), energy)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(self.data))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.data, indent=1) + "\n")
        return path


# ---------------------------------------------------------------------------------------------------
# Roofline ESTIMATES for an H100 SXM (written to ttha/resources/cost_model_estimate.json).
# latency = max(bytes / effective bandwidth, FLOPs / achievable FLOP/s) + launch overhead per kernel
# energy  = P_active * latency + E_BYTE * bytes + E_FLOP * FLOPs   (net of the ~78 W idle floor)
# The assumptions are module constants so the estimate can be read, checked and regenerated.
H100 = {
    "hbm_bytes_per_s": 3.0e12 * 0.85,    # 3.0 TB/s at 85 % achieved
    "bf16_flop_per_s": 700e12,           # achievable dense bf16 (peak 989)
    "fp8_flop_per_s": 1400e12,           # achievable dense fp8 (peak 1979)
    "launch_s": 4e-6,                    # per kernel launch + tail
    "active_w": 100.0,                   # power of a busy chip beyond idle, independent of the work
    "energy_per_byte_j": 60e-12,         # HBM3 access + on-chip movement, ~7.5 pJ/bit
    "energy_per_flop_j": {"bf16": 0.55e-12, "fp8": 0.3e-12},
}
# Bytes of weight storage relative to 16-bit: packed int + one fp16 scale and min per 64-weight group.
WEIGHT_BYTES_PER_PARAM = {16: 2.0, 8: 1.0, 4: 0.5 + 4 / 64, 2: 0.25 + 4 / 64}  # 0.28x and 0.16x of 16-bit
BATCH_SIZES = [1, 4, 16, 64, 256, 1024, 4096]
DEFAULT_SHAPE = {"d_model": 4096, "d_ff": 14336, "n_layers": 4, "n_experts": 8, "top_k": 2}


def _roofline(bytes_: float, flops: float, kernels: int, fp8: bool = False) -> tuple[float, float]:
    """(latency_s, energy_j) of work moving `bytes_` and doing `flops` in `kernels` launches."""
    hw = H100
    rate = hw["fp8_flop_per_s"] if fp8 else hw["bf16_flop_per_s"]
    lat = max(bytes_ / hw["hbm_bytes_per_s"], flops / rate) + kernels * hw["launch_s"]
    e_flop = hw["energy_per_flop_j"]["fp8" if fp8 else "bf16"]
    return lat, hw["active_w"] * lat + hw["energy_per_byte_j"] * bytes_ + e_flop * flops


def _expert(bits: int, t: float, d: int, f: int) -> tuple[float, float]:
    """Expert FFN with two projections d->f->d on t tokens (16-bit activations in and out)."""
    weights = 2 * d * f
    bytes_ = weights * WEIGHT_BYTES_PER_PARAM[bits] + t * (d + f) * 2 * 2
    return _roofline(bytes_, 2 * weights * t, kernels=3, fp8=bits == 8)


def _forward(t: float, s: dict) -> tuple[float, float]:
    """16-bit forward of the whole model on t tokens: per layer attention projections (4 d^2; the
    score matmuls are left out), the router, and every expert on its share t*top_k/n_experts."""
    d, f, e, k = s["d_model"], s["d_ff"], s["n_experts"], s["top_k"]
    attn = _roofline(4 * d * d * 2 + 4 * t * d * 2, 2 * 4 * d * d * t, kernels=6)
    router = _roofline(d * e * 2 + t * d * 2, 2 * d * e * t, kernels=2)
    expert = _expert(16, max(t * k / e, 1.0), d, f)
    lat = s["n_layers"] * (attn[0] + router[0] + e * expert[0])
    energy = s["n_layers"] * (attn[1] + router[1] + e * expert[1])
    return lat, energy


def estimate_h100(shape: dict | None = None, batch_sizes: list[int] | None = None) -> dict:
    """The estimated cost model (schema 1) from the roofline estimates above."""
    s = dict(DEFAULT_SHAPE if shape is None else shape)
    bss = list(BATCH_SIZES if batch_sizes is None else batch_sizes)
    d, f, e = s["d_model"], s["d_ff"], s["n_experts"]
    work = {f"expert_{n}": (lambda t, b=b: _expert(b, t, d, f))
            for b, n in ((16, "16bit"), (8, "fp8"), (4, "int4"), (2, "int2"))}
    work["router_topk"] = lambda t: _roofline(d * e * 2 + t * d * 2 + t * e * 8, 2 * d * e * t, kernels=2)
    # The adapter works on [E, features], not on tokens: a handful of tiny launches.
    work["ttha_adapter_forward"] = lambda t: _roofline(4096, 1e5, kernels=6)
    # The update reads the step's recorded gate logits (t tokens x E x layers, fp32) and runs forward,
    # backward and Adam on the adapter: ~40 small launches.
    work["ttha_update"] = lambda t: _roofline(t * e * s["n_layers"] * 4 * 6, t * e * s["n_layers"] * 40,
                                             kernels=40)
    # TTT: full = forward + backward over all weights (~3x a forward); light = forward + a backward that
    # only reaches norms and gates (~1.1x).
    work["ttt_full"] = lambda t: tuple(3.0 * v for v in _forward(t, s))
    work["ttt_light"] = lambda t: tuple(1.1 * v for v in _forward(t, s))
    ops = {}
    for op, fn in work.items():
        lat, energy = zip(*(fn(float(t)) for t in bss))
        ops[op] = {"batch_sizes": bss, "latency_ms": [round(v * 1e3, 6) for v in lat],
                   "energy_j": [round(v, 9) for v in energy]}
    return {
        "schema_version": SCHEMA_VERSION, "gpu": "NVIDIA H100 80GB HBM3", "estimated": True,
        "source": "ttha.costs.estimate_h100 (python -m ttha.costs)",
        "note": ("ESTIMATES, not measurements: roofline latency = max(bytes / (3.0 TB/s x 0.85), FLOPs / "
                 "700 TFLOP/s bf16 or 1400 fp8) + 4 us per kernel; energy = 100 W x latency + 60 pJ/byte "
                 "+ 0.55 pJ/FLOP (0.3 fp8), net of idle. Weight bytes vs 16-bit: fp8 0.5x, int4 0.28x, "
                 "int2 0.16x (group-64 fp16 scale+min); dequantisation ALU work is ignored. ttt_full = 3x "
                 "and ttt_light = 1.1x a 16-bit forward of a model of `shape` (attention score matmuls "
                 "ignored). Replace with profile_kernels.py measurements."),
        "assumptions": {**{k: v for k, v in H100.items()}, "weight_bytes_per_param": WEIGHT_BYTES_PER_PARAM},
        "shape": s, "ops": ops,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write the estimated H100 cost model (roofline, not measured).")
    p.add_argument("--out", default=str(ESTIMATE_PATH))
    args = p.parse_args(argv)
    KernelCostModel(estimate_h100(), "estimate").save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
