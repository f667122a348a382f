"""KernelCostModel: schema, interpolation in log batch size, extrapolation, the shipped estimates, the decode
section and its reader (decode_cost)."""
from __future__ import annotations

import copy
import json
import math

import pytest

from ttha import costs
from ttha.costs import Cost, KernelCostModel, decode_op, expert_op

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
    (lambda d: d.update(schema_version=3), "schema_version=3"),
    (lambda d: d.update(schema_version=True), "schema_version=True"),
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


# ---------------------------------------------------------------------------------------------------
# The decode section (schema 2): the grouped MoE op per precision and routed-token count m on one expert
def decode_file(energy=True, **ops_override):
    """A small synthetic profile: the op costs 0.010 ms with no token routed; int2 then +0.010 at m = 1,
    +0.012 at 2, +0.016 at 4; 16-bit +0.060 at 1, +0.064 at 4."""
    ops = {"moe_decode_int2": {"tokens": [0, 1, 2, 4], "latency_ms": [0.010, 0.020, 0.022, 0.026],
                               "energy_j": [0.001, 0.003, 0.0032, 0.0036] if energy else None},
           "moe_decode_16bit": {"tokens": [0, 1, 4], "latency_ms": [0.010, 0.070, 0.074],
                                "energy_j": [0.001, 0.013, 0.0134] if energy else None}}
    ops.update(ops_override)
    data = table([1, 2, 3, 4], [1, 1, 1, 1])
    data["ops"]["expert_int4"] = {"batch_sizes": [1, 16], "latency_ms": [0.5, 0.9], "energy_j": [0.05, 0.09]}
    return {**data, "schema_version": 2, "decode": {"shape": {"d_model": 8, "d_ff": 16, "n_experts": 3}, "ops": ops}}


def test_decode_cost_is_what_one_expert_adds_over_none_routed(tmp_path):
    path = tmp_path / "h200.json"
    path.write_text(json.dumps(decode_file()))
    m = KernelCostModel.load(path)
    assert m.has_decode_table(2) and m.has_decode_table(16) and not m.has_decode_table(4)
    assert m.decode_cost(2, 0) == Cost(0.0, 0.0) and m.decode_cost(16, 0) == Cost(0.0, 0.0)  # never read
    for tokens, lat, energy in ((1, 0.010, 0.002), (2, 0.012, 0.0022), (4, 0.016, 0.0026)):
        c = m.decode_cost(2, tokens)
        assert c.latency_ms == pytest.approx(lat) and c.energy_j == pytest.approx(energy)
    assert m.decode_cost(2, 3).latency_ms == pytest.approx(0.014)  # linear in m between the measured counts
    assert m.decode_cost(2, 0.5).latency_ms == pytest.approx(0.005)
    assert m.decode_cost(2, 8).latency_ms == pytest.approx(0.016 + 4 * 0.002)  # along the last slope beyond
    assert m.decode_cost(16, 2).latency_ms == pytest.approx(0.060 + 0.004 / 3)
    assert m.decode_cost(16, 1).energy_j == pytest.approx(0.012)
    # precision ranks as the bytes an activated expert reads
    assert m.decode_cost(16, 1).latency_ms > m.decode_cost(2, 1).latency_ms


def test_decode_cost_without_a_decode_table_answers_from_the_per_expert_op():
    m = KernelCostModel(decode_file())
    assert m.decode_cost(4, 16) == m.get_cost("expert_int4", 16)  # int4 was not measured in decode
    assert m.decode_cost(4, 0) == Cost(0.0, 0.0)
    no_energy = KernelCostModel(decode_file(energy=False))
    assert no_energy.decode_cost(2, 0) == Cost(0.0, None) and no_energy.decode_cost(2, 2).energy_j is None
    with pytest.raises(ValueError, match="tokens=-1"):
        m.decode_cost(2, -1)
    with pytest.raises(ValueError, match="tokens=nan"):
        m.decode_cost(2, float("nan"))
    with pytest.raises(ValueError, match="bits=3"):
        m.decode_cost(3, 1)


def test_files_without_a_decode_section_still_load_and_answer_decode_costs():
    m = KernelCostModel.load(costs.ESTIMATE_PATH)  # the roofline estimate has per-expert ops only
    assert not any(m.has_decode_table(b) for b in (16, 4, 2))
    assert m.decode_cost(2, 4) == m.get_cost(expert_op(2), 4) and m.decode_cost(2, 0) == Cost(0.0, 0.0)


def test_the_shipped_h100_file_has_a_measured_decode_table_where_fewer_bits_cost_less_energy():
    m = KernelCostModel.load(costs.DEFAULT_PATH)
    assert not m.estimated and all(m.has_decode_table(b) for b in (16, 4, 2))
    assert json.loads(costs.DEFAULT_PATH.read_text())["decode"]["shape"]["model"] == "decode"
    energy = [m.decode_cost(b, 1).energy_j for b in (16, 4, 2)]  # an expert's weights read once
    assert energy[0] > energy[1] > energy[2] > 0 and m.decode_cost(16, 0) == Cost(0.0, 0.0)


def test_decode_op_names():
    assert [decode_op(b) for b in (16, 4, 2)] == ["moe_decode_16bit", "moe_decode_int4", "moe_decode_int2"]
    with pytest.raises(ValueError, match="bits=8"):
        decode_op(8)  # the grouped kernels take 16-bit, int4 and int2 experts


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(schema_version=1), "decode: needs schema_version 2"),
    (lambda d: d["decode"].pop("shape"), "decode: expected an object with shape and ops"),
    (lambda d: d["decode"].update(ops={}), r"decode.ops=\{\}"),
    (lambda d: d["decode"]["ops"].update(moe_decode_int3={}), "decode.ops.moe_decode_int3: unknown decode op"),
    (lambda d: d["decode"]["ops"]["moe_decode_int2"].update(tokens=[1, 2, 3, 4]), "must start at 0"),
    (lambda d: d["decode"]["ops"]["moe_decode_int2"].update(tokens=[0, 2, 2, 4]), "must start at 0 .* increase"),
    (lambda d: d["decode"]["ops"]["moe_decode_int2"].update(tokens=[0, 1.5, 2, 4]), "integers >= 0"),
    (lambda d: d["decode"]["ops"]["moe_decode_int2"].update(latency_ms=[1, 2]),
     r"moe_decode_int2.latency_ms: expected a list of 4 numbers \(one per token count\)"),
    (lambda d: d["decode"]["ops"]["moe_decode_int2"].update(energy_j=[0, -1, 0, 0]), "-1 is not a finite number"),
    (lambda d: d["decode"]["ops"]["moe_decode_int2"].pop("energy_j"), "energy_j: missing"),
])
def test_wrong_decode_section_is_a_clear_value_error(mutate, message):
    data = decode_file()
    mutate(data)
    with pytest.raises(ValueError, match=message):
        KernelCostModel(data)


def test_a_decode_only_profile_is_a_cost_model():
    data = decode_file()
    data["ops"] = {}
    assert KernelCostModel(data).decode_cost(2, 1).latency_ms == pytest.approx(0.010)
    data.pop("decode")
    with pytest.raises(ValueError, match="ops is empty"):
        KernelCostModel(data)


def test_load_picks_the_shipped_file_measured_on_this_kind_of_gpu(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    resources = tmp_path / "resources"
    resources.mkdir()
    default = KernelCostModel(table([1, 2, 3, 4])).save(resources / "cost_model_h100.json")
    h200 = {**decode_file(), "gpu": "NVIDIA H200"}
    KernelCostModel(h200).save(resources / "cost_model_h200.json")
    KernelCostModel({**h200, "estimated": True}).save(resources / "cost_model_estimate.json")  # never picked
    monkeypatch.setattr(costs, "RESOURCES", resources)
    monkeypatch.setattr(costs, "DEFAULT_PATH", default)
    monkeypatch.setattr(costs, "_current_gpu_name", lambda: "NVIDIA H200")
    m = KernelCostModel.load()
    assert m.source == f"shipped:{resources / 'cost_model_h200.json'}" and m.has_decode_table(2)
    monkeypatch.setattr(costs, "_current_gpu_name", lambda: "NVIDIA B200")  # none shipped: the default
    assert KernelCostModel.load().source == f"default:{default}"
