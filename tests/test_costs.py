"""KernelCostModel: schema, interpolation in log batch size, extrapolation, the shipped estimates."""
from __future__ import annotations

import copy
import json
import math

import pytest

from ttha import costs
from ttha.costs import KernelCostModel, expert_op

BS = [1, 4, 16, 64]


def table(latency, energy=None, bs=BS, **extra):
    return {"schema_version": 1, "gpu": "test", "estimated": False, "source": "unit test",
            "shape": {"d_model": 8, "d_ff": 16}, **extra,
            "ops": {"op": {"batch_sizes": list(bs), "latency_ms": list(latency),
                           "energy_j": None if energy is None else list(energy)},
                    "other": {"batch_sizes": [2], "latency_ms": [3.0], "energy_j": [0.5]}}}


def test_exact_at_points_and_log_linear_between():
    lat, en = [1.0, 2.0, 5.0, 9.0], [0.1, 0.3, 0.4, 1.0]
    m = KernelCostModel(table(lat, en))
    for b, l, e in zip(BS, lat, en):
        c = m.get_cost("op", b)
        assert c.latency_ms == pytest.approx(l) and c.energy_j == pytest.approx(e)
    # geometric midpoint of 4 and 16 is 8: halfway in log batch size
    assert m.get_cost("op", 8).latency_ms == pytest.approx(3.5)
    assert m.get_cost("op", 8).energy_j == pytest.approx(0.35)
    # monotone between points
    xs = [1 + i * 0.37 for i in range(170)]
    ys = [m.get_cost("op", x).latency_ms for x in xs]
    assert all(b >= a for a, b in zip(ys, ys[1:]))


def test_clamps_below_and_extrapolates_linearly_in_batch_size():
    # latency = 2 + 0.5 * b on the last segment (16 -> 64): linear continuation beyond 64
    m = KernelCostModel(table([1.0, 1.0, 10.0, 34.0], [1.0, 1.0, 1.0, 1.0]))
    assert m.get_cost("op", 0.25).latency_ms == pytest.approx(1.0)
    assert m.get_cost("op", 128).latency_ms == pytest.approx(34.0 + 0.5 * 64)
    assert m.get_cost("op", 1000).latency_ms == pytest.approx(2 + 0.5 * 1000)
    assert m.get_cost("op", 1000).energy_j == pytest.approx(1.0)  # flat last segment stays flat
    # a single point: cost per token constant
    assert m.get_cost("other", 8).latency_ms == pytest.approx(12.0)
    # a decreasing last segment (measurement noise) never extrapolates below the last point
    m2 = KernelCostModel(table([1.0, 2.0, 3.0, 2.5]))
    assert m2.get_cost("op", 640).latency_ms == pytest.approx(2.5)


def test_unknown_op_lists_known_ops_and_bad_batch():
    m = KernelCostModel(table([1, 2, 3, 4]))
    with pytest.raises(KeyError, match="known ops: op, other"):
        m.get_cost("expert_int3", 4)
    with pytest.raises(ValueError, match="batch_size"):
        m.get_cost("op", 0)
    assert m.get_cost("op", 4).energy_j is None  # energy unknown (e.g. profiled on a CPU)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(schema_version=2), "schema_version=2"),
    (lambda d: d.pop("gpu"), "gpu=None"),
    (lambda d: d.update(estimated="yes"), "estimated='yes'"),
    (lambda d: d.update(ops={}), "ops is empty"),
    (lambda d: d["ops"]["op"].update(batch_sizes=[1, 4, 4, 64]), "strictly increasing"),
    (lambda d: d["ops"]["op"].update(batch_sizes=[0, 4, 16, 64]), r"ops.op.batch_sizes"),
    (lambda d: d["ops"]["op"].update(latency_ms=[1, 2, 3]), r"ops.op.latency_ms: expected a list of 4"),
    (lambda d: d["ops"]["op"].update(latency_ms=[1, 2, "x", 4]), r"'x' is not a finite number"),
    (lambda d: d["ops"]["op"].update(energy_j=[1, None, 1, 1]), r"ops.op.energy_j: None"),
    (lambda d: d["ops"]["op"].pop("energy_j"), r"energy_j: missing"),
    (lambda d: d["ops"].update(op=[1, 2]), r"ops.op: expected an object"),
])
def test_wrong_schema_is_a_clear_value_error(mutate, message):
    data = copy.deepcopy(table([1, 2, 3, 4], [1, 1, 1, 1]))
    mutate(data)
    with pytest.raises(ValueError, match=message):
        KernelCostModel(data)


def test_load_file_errors_and_explicit_path(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        KernelCostModel.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        KernelCostModel.load(bad)
    good = KernelCostModel(table([1, 2, 3, 4])).save(tmp_path / "good.json")
    m = KernelCostModel.load(good)
    assert m.source == f"file:{good}" and m.get_cost("op", 16).latency_ms == 3.0


def test_load_without_gpu_file_uses_the_shipped_h100_measurements(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(costs, "_current_gpu_name", lambda: None)
    m = KernelCostModel.load()
    assert m.source == f"default:{costs.DEFAULT_PATH}" and not m.estimated
    assert m.gpu == "NVIDIA H100 80GB HBM3" and m.data["source"].startswith("profile_kernels.py")
    # a profiled file for this GPU wins over the default
    monkeypatch.setattr(costs, "_current_gpu_name", lambda: "NVIDIA H100 80GB HBM3")
    measured = KernelCostModel(table([1, 2, 3, 4])).save(
        tmp_path / "outputs" / "cost_models" / "nvidia-h100-80gb-hbm3.json")
    m = KernelCostModel.load()
    assert m.source == f"gpu:{measured}" and not m.estimated


def test_expert_op_names():
    assert [expert_op(b) for b in (16, 8, 4, 2)] == ["expert_16bit", "expert_fp8", "expert_int4", "expert_int2"]
    with pytest.raises(ValueError, match="bits=3"):
        expert_op(3)


def test_shipped_estimate_is_the_documented_roofline():
    shipped = json.loads(costs.ESTIMATE_PATH.read_text())
    assert shipped == json.loads(json.dumps(costs.estimate_h100()))  # regenerate: python -m ttha.costs
    m = KernelCostModel.load(costs.ESTIMATE_PATH)
    assert m.estimated and "ESTIMATES" in shipped["note"]
    required = {"expert_16bit", "expert_fp8", "expert_int4", "expert_int2", "router_topk",
                "ttha_adapter_forward", "ttha_update", "ttt_full", "ttt_light"}
    assert required <= set(m.ops)
    # memory bound at batch 1: cost follows bytes moved (16-bit > fp8 > int4 > int2)
    e1 = [m.get_cost(expert_op(b), 1).energy_j for b in (16, 8, 4, 2)]
    assert e1 == sorted(e1, reverse=True)
    # 16-bit batch-1 latency from the roofline: weight bytes / 2.55 TB/s + 3 launches
    d, f = 4096, 14336
    expected_ms = (2 * d * f * 2 + (d + f) * 4) / 2.55e12 * 1e3 + 3 * 4e-3
    assert m.get_cost("expert_16bit", 1).latency_ms == pytest.approx(expected_ms, rel=1e-4)
    # TTT: full = 3x, light = 1.1x the same forward
    for b in (16, 1024):
        ratio = m.get_cost("ttt_full", b).energy_j / m.get_cost("ttt_light", b).energy_j
        assert ratio == pytest.approx(3.0 / 1.1, rel=1e-4)
    # average power of a compute-bound expert call stays within an H100's envelope (net of idle)
    c = m.get_cost("expert_16bit", 4096)
    assert 200 < c.energy_j / (c.latency_ms / 1e3) < 700
    assert not math.isnan(m.get_cost("ttt_full", 10_000).latency_ms)
