"""profile_kernels.py / ttha.profiler on the CPU: cost-model JSON (the decode section included), MLflow run,
torch.profiler round trip, the energy-window arithmetic against a simulated NVML counter, the printed table,
config errors. On the GPU (marked gpu): the decode section measured from CUDA graphs."""
import json
import time
from pathlib import Path

import pytest
import torch

from ttha import costs, kernels, profiler
from ttha.config import ConfigError
from ttha.profiler import decode, measure, ops, report

EXPERT_OPS = [costs.expert_op(b) for b in (16, 8, 4, 2)]
RUN_OPS = EXPERT_OPS + ["router_topk", "ttha_adapter_forward", "ttha_update", "ttt_light", "ttt_full"]
DECODE_OPS = [costs.decode_op(b) for b in (16, 4, 2)]


@pytest.fixture(scope="module")
def profile_cfg(compose_cfg):
    """profile_cfg(tmp_path, *overrides): conf/profile.yaml for a small CPU profile writing under tmp_path."""
    def make(tmp_path, *overrides):
        return compose_cfg("size=tiny", "batch_sizes=[1,16,512]", "warmup=2", "repeats=7", "cpu_threads=1",
                           "progress=false", f"out={tmp_path}/cm/cpu.json",
                           f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "device=cpu", *overrides,
                           config_name="profile")
    return make


@pytest.fixture(scope="module")
def cpu_profile(tmp_path_factory, profile_cfg):
    tmp = tmp_path_factory.mktemp("profile")
    path, data = profiler.run(profile_cfg(tmp))
    return tmp, path, data


def test_cpu_profile_is_a_cost_model_the_run_can_read(cpu_profile):
    tmp, path, data = cpu_profile
    model = costs.KernelCostModel.from_file(path)
    assert set(RUN_OPS) <= set(model.ops)
    assert not model.estimated and data["gpu"].startswith("cpu")
    for op in model.ops:
        entry = data["ops"][op]
        assert entry["batch_sizes"] == [1, 16, 512]
        assert all(v > 0 for v in entry["latency_ms"]), op
        assert entry["energy_j"] is None and entry["energy_j_gross"] is None  # no energy counter on a CPU
        assert model.get_cost(op, 16) == (entry["latency_ms"][1], None)
    for op in EXPERT_OPS:  # 512 tokens through an expert cost more than 1
        lat = data["ops"][op]["latency_ms"]
        assert lat[-1] > lat[0], (op, lat)
    assert data["idle_w"] is None and data["profile_seconds"] > 0
    assert data["shape"]["d_model"] == 128 and data["shape"]["ttt_model"]["name"] == "tiny"


def test_cpu_profile_measures_the_decode_op_per_precision_and_routed_tokens(cpu_profile):
    _, path, data = cpu_profile
    model = costs.KernelCostModel.from_file(path)
    section = data["decode"]
    slots = 2 * 2  # sizes.tiny: decode_batch x top_k
    assert section["shape"] == {"model": "tiny", "d_model": 128, "d_ff": 256, "n_experts": 6, "top_k": 2, "batch": 2,
                                "slots": slots, "group_size": 64, "bits": [16, 4, 2, 16, 4, 2]}
    assert sorted(section["ops"]) == sorted(DECODE_OPS)
    for bits in (16, 4, 2):
        entry = section["ops"][costs.decode_op(bits)]
        assert entry["bits"] == bits and entry["tokens"] == list(range(slots + 1)) and entry["path"] == "torch"
        assert entry["energy_j"] is None and all(v > 0 for v in entry["latency_ms"])
        assert model.has_decode_table(bits)
        assert model.decode_cost(bits, 0) == (0.0, None)
        lat = entry["latency_ms"]
        for m in range(1, slots + 1):  # the expert's cost: the op with m tokens on it less the op with none
            assert model.decode_cost(bits, m).latency_ms == pytest.approx(max(0.0, lat[m] - lat[0]))


def _record_reads(monkeypatch):
    """The experts whose weights moe_decode reads (the torch reference reads them through .weight)."""
    reads = []
    weight = kernels.GroupedExperts.weight
    monkeypatch.setattr(kernels.GroupedExperts, "weight",
                        lambda self, e, side: reads.append(e) or weight(self, e, side))
    return reads


@pytest.mark.parametrize("bits", [16, 4, 2])
def test_decode_op_routes_m_tokens_to_one_expert_of_its_precision(monkeypatch, bits):
    shape = {"d_model": 64, "d_ff": 128, "n_experts": 5, "top_k": 2, "group_size": 32, "decode_batch": 3}
    ctx = ops.Context(torch.device("cpu"), torch.float32, shape, None, 0)
    (template,) = [t for t in decode.decode_templates(ctx, decode.decode_shape(shape)) if t.bits == bits]
    layer_bits = [16, 4, 2, 16, 4]
    expected = [e for e, b in enumerate(layer_bits) if b == bits]
    reads = _record_reads(monkeypatch)
    for m in (0, 1, 6):  # 6 = decode_batch x top_k: every slot of the step on one expert
        fn, steps = template.build(m)
        reads.clear()
        for _ in range(len(expected)):  # one step each: the calls rotate over the experts of this precision
            out = fn()
        assert steps == 1 and out.shape == (6, 64)
        assert sorted(set(reads)) == ([] if m == 0 else expected), m


def test_graph_build_rotates_over_experts_and_layer_copies_spanning_rotate_bytes(monkeypatch):
    """The CUDA branch of a decode build, its graph replaced by the calls it would capture: every step routes
    m tokens to one expert of the op's precision, over enough layer copies that their weights span
    rotate_bytes (so a GPU reads them from HBM, not L2); tuned once, eagerly, before any capture."""
    shape = {"d_model": 64, "d_ff": 128, "n_experts": 5, "top_k": 2, "group_size": 32, "decode_batch": 3}
    s = decode.decode_shape(shape)
    ctx = ops.Context(torch.device("cpu"), torch.float32, shape, None, 0)
    int4_bytes = 2 * 64 * 128 * (0.5 + 4 / 32)  # codes + fp16 scale and min per group, both projections
    ctx.rotate_bytes = int(5 * 2 * int4_bytes)  # five layers' worth of the two int4 experts (1 and 4)
    monkeypatch.setattr(decode, "_graphs", lambda ctx, s: True)
    tuned, captured = [], []
    monkeypatch.setattr(decode, "_tune", lambda *args: tuned.append(args) or True)

    def fake_timing_graph(fn, items):
        captured.append(items)
        return type("Graph", (), {"replay": lambda self: [fn(it) for it in items]})(), 2 * len(items)
    monkeypatch.setattr("ttha.kernels.tuning.timing_graph", fake_timing_graph)
    (template,) = [t for t in decode.decode_templates(ctx, s) if t.bits == 4]
    reads = _record_reads(monkeypatch)
    for m in (0, 2):
        fn, steps = template.build(m)
        reads.clear()
        fn()
        items = captured[-1]
        assert steps == 2 * len(items) == 2 * 5 * 2
        assert len({id(layer) for layer, _ in items}) == 5  # distinct copies, each with both int4 experts
        assert sorted(plan.counts.nonzero().flatten().tolist() for _, plan in items) == (
            [[]] * 10 if m == 0 else [[1]] * 5 + [[4]] * 5)
        assert sorted(set(reads)) == ([] if m == 0 else [1, 4])
    assert len(tuned) == 1


def test_one_expert_plan_is_what_the_reference_computes_for_that_expert():
    torch.manual_seed(0)
    layer = kernels.GroupedExperts.from_weights(
        [(torch.randn(64, 32), torch.randn(32, 64), b) for b in (16, 4, 2)], 32, torch.bfloat16)
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    plan = decode.one_expert_plan(3, 1, 3, 5, x.device)
    out = kernels.moe_decode_ref(x, torch.ones(5, 1), plan, layer)
    full = kernels.moe_decode_ref(x, torch.ones(5, 1), kernels.route_plan_ref(torch.ones(5, 1, dtype=torch.long), 3),
                                  layer)
    torch.testing.assert_close(out[:3], full[:3])  # the first m tokens through expert 1 (the same sums)
    assert torch.equal(out[3:], torch.zeros_like(out[3:]))  # the others through none


def test_cpu_profile_logs_an_mlflow_run_with_json_and_plot(cpu_profile):
    tmp, path, data = cpu_profile
    from ttha.tracking import Tracker

    client = Tracker(f"sqlite:///{tmp}/mlflow.db", "ttha-profile").client
    exp = client.get_experiment_by_name("ttha-profile")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["kind"] == "profile"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"cpu.json", "cpu.png"}
    lat = data["ops"]["expert_int4"]["latency_ms"][2]
    assert run.data.metrics["latency_ms/expert_int4/b512"] == pytest.approx(lat)
    lat = data["decode"]["ops"]["moe_decode_int2"]["latency_ms"][1]
    assert run.data.metrics["latency_ms/moe_decode_int2/m1"] == pytest.approx(lat)
    assert path.with_suffix(".png").stat().st_size > 10_000


def test_trace_saved_and_parsed_back_gives_the_same_ops(tmp_path):
    device = torch.device("cpu")
    # experts large enough that 4096 tokens take far longer than a time slice of a loaded machine; one host
    # thread, as profile_kernels.py times a CPU (cpu_threads): spinning threads stall when a core is taken
    shape = {"d_model": 256, "d_ff": 1024, "n_experts": 4, "top_k": 2, "group_size": 64, "ttt_seq_len": 16,
             "ttt_expert_bits": [16, 4, 2]}
    templates = ops.operation_templates(ops.Context(device, torch.float32, shape, None, 0))
    picked = {k: templates[k] for k in ("expert_16bit", "expert_int2", "router_topk")}
    with measure.host_threads(1):
        trace = report.save_trace(picked, [2, 4096], device, tmp_path / "trace.json", repeats=5)
    data = report.parse_trace(trace, "cpu", shape)
    model = costs.KernelCostModel(data, "trace")
    assert model.ops == sorted(picked) and data["gpu"] == "cpu"
    for op in picked:
        assert model.batch_sizes(op) == [2.0, 4096.0]
        assert all(v > 0 for v in data["ops"][op]["latency_ms"]) and data["ops"][op]["energy_j"] is None
    # 4096 tokens through an expert take longer than 2, in the trace too
    assert data["ops"]["expert_16bit"]["latency_ms"][1] > data["ops"]["expert_16bit"]["latency_ms"][0]


def test_parse_trace_rejects_a_trace_without_annotations(tmp_path):
    bad = tmp_path / "t.json"
    bad.write_text(json.dumps({"traceEvents": [{"ph": "X", "name": "aten::mm", "cat": "cpu_op", "dur": 3}]}))
    with pytest.raises(ValueError, match="no op@batch annotations"):
        report.parse_trace(bad)


class FakeMeter:
    """An NVML-like energy counter: true power `watts`, refreshed every 100 ms (as on the H100)."""

    def __init__(self, watts: float):
        self.watts, self.t0 = watts, time.perf_counter()

    def read_j(self) -> float:
        elapsed = time.perf_counter() - self.t0
        return self.watts * (int(elapsed / 0.1) * 0.1)


def test_energy_window_recovers_power_despite_100ms_counter_refresh():
    meter = FakeMeter(300.0)
    joules, dt, batches = measure.counter_window(lambda: time.sleep(0.005), lambda _: None, meter.read_j, 0.5)
    assert dt >= 0.5 and batches >= 50
    assert joules / dt == pytest.approx(300.0, rel=0.06)  # an unaligned 0.5 s window can be 20 % off


def test_energy_per_call_gross_and_net_of_idle():
    meter = FakeMeter(250.0)
    calls_per_s = []

    def call():
        time.sleep(0.002)
        calls_per_s.append(1)
    e = measure.energy_per_call(call, meter, torch.device("cpu"), 0.5, call_ms=2.0, idle_w=100.0)
    per_call_s = e["window_s"] / e["calls"]
    assert e["gross"] == pytest.approx(250.0 * per_call_s, rel=0.08)
    assert e["net"] == pytest.approx(e["gross"] - 100.0 * per_call_s, rel=1e-6)


def _profile_data(latency_ms, tokens_ms):
    return {"gpu": "NVIDIA H200", "idle_w": 125.0,
            "ops": {"expert_16bit": {"batch_sizes": [1], "latency_ms": [latency_ms], "energy_j": [0.0123456],
                                     "energy_j_gross": [0.0223456]}},
            "decode": {"ops": {"moe_decode_int2": {"tokens": [0, 32], "latency_ms": tokens_ms,
                                                   "energy_j": [0.001, 0.0234567]}}}}


def test_table_columns_never_run_together():
    # a slow CPU call: 248 ms for 1 token is 248058.7 us/token, wider than its column
    lines = report.table(_profile_data(248.0587, [0.05, 12345.678])).splitlines()
    assert lines[0] == "NVIDIA H200  idle 125.0 W"
    assert lines[1].split() == ["op", "batch", "lat", "ms", "us/tok", "E", "net", "J", "mJ/tok", "E", "gross", "J"]
    assert lines[2].split() == ["expert_16bit", "1", "248.0587", "248058.700", "0.01235", "12.3456", "0.02235"]
    decode_rows = [line.split() for line in lines if line.startswith("moe_decode_int2")]
    assert decode_rows == [["moe_decode_int2", "0", "0.0500", "0.00", "1.0000", "0.0000"],
                           ["moe_decode_int2", "32", "12345.6780", "12345628.00", "23.4567", "22.4567"]]
    no_energy = _profile_data(1.0, [0.05, 0.06])
    no_energy["ops"]["expert_16bit"]["energy_j"] = no_energy["decode"]["ops"]["moe_decode_int2"]["energy_j"] = None
    lines = report.table(no_energy).splitlines()  # no columns for energy nobody measured
    assert lines[1].split() == ["op", "batch", "lat", "ms", "us/tok"]
    assert lines[4].split() == ["decode", "op", "m", "lat", "ms", "+us", "over", "m=0"]


@pytest.mark.parametrize("override, key", [
    ("decode_tokens=[1,2]", "decode_tokens"),
    ("decode_tokens=[0,2,1]", "decode_tokens"),
    ("decode_tokens=[0,5]", "decode_tokens"),
    ("sizes.tiny.decode_batch=0", "sizes.tiny.decode_batch"),
    ("sizes.tiny.decode_model=nope", "sizes.tiny.decode_model"),
    ("models.tiny.d_ff=100", "sizes.tiny.decode_model"),
    ("ops=[moe_decode_int3]", "ops"),
    ("batch_sizes=[16,4]", "batch_sizes"),
    ("batch_sizes=[]", "batch_sizes"),
    ("energy.window_s=0.2", "energy.window_s"),
    ("size=huge", "size"),
    ("ops=[expert_16bit,expert_int3]", "ops"),
    ("sizes.tiny.ttt_model=nope", "ttt_model"),
    ("kernels=cuda", "kernels"),
])
def test_bad_config_is_one_line_naming_the_key(tmp_path, profile_cfg, override, key):
    with pytest.raises(ConfigError) as err:
        profiler.run(profile_cfg(tmp_path, override, "tracking.enabled=false"))
    assert err.value.key == key and "\n" not in str(err.value)


def test_default_out_is_the_gpu_file_under_the_outputs_root(tmp_path, monkeypatch, profile_cfg):
    monkeypatch.setattr(profiler, "outputs_root", lambda: tmp_path / "root")
    path, data = profiler.run(profile_cfg(tmp_path, "out=null", "ops=[expert_16bit]", "batch_sizes=[1]",
                                   "tracking.enabled=false"))
    assert path == tmp_path / "root" / "cost_models" / costs.gpu_file_name(data["gpu"]) and path.is_file()


def test_partial_profile_carries_the_other_ops_over_from_base(cpu_profile, tmp_path, profile_cfg):
    _, base_path, base = cpu_profile
    path, data = profiler.run(profile_cfg(tmp_path, "ops=[expert_int4,moe_decode_int2]", f"base={base_path}",
                                          "tracking.enabled=false"))
    assert set(data["ops"]) == set(base["ops"]) and set(data["decode"]["ops"]) == set(DECODE_OPS)
    assert data["ops"]["ttt_full"] == base["ops"]["ttt_full"]  # carried over verbatim
    assert data["decode"]["ops"]["moe_decode_16bit"] == base["decode"]["ops"]["moe_decode_16bit"]
    assert data["decode"]["ops"]["moe_decode_int2"] != base["decode"]["ops"]["moe_decode_int2"]  # measured now
    assert data["carried_over"]["ops"] == sorted(set(base["ops"]) - {"expert_int4"}) + ["moe_decode_16bit",
                                                                                          "moe_decode_int4"]
    assert json.loads(Path(path).read_text())["carried_over"]["from"].endswith(str(base_path))


def test_base_from_another_gpu_is_rejected_before_profiling(tmp_path, profile_cfg):
    with pytest.raises(ConfigError) as err:
        profiler.run(profile_cfg(tmp_path, f"base={costs.DEFAULT_PATH}", "tracking.enabled=false"))
    assert err.value.key == "base" and "measured on NVIDIA" in str(err.value)
    assert not (tmp_path / "cm").exists()  # nothing written


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NVML, CUDA graphs)")
def test_gpu_decode_costs_follow_the_bytes_an_activated_expert_reads(tmp_path, profile_cfg):
    """Mixtral-sized experts (4096 x 14336) measured from CUDA graphs: an expert given no token adds nothing,
    and one given a token costs what its weights cost to read: 16-bit > int4 > int2, in time and in energy."""
    path, data = profiler.run(profile_cfg(
        tmp_path, "device=cuda", "size=full", "sizes.full.decode_model=null",  # the size's 4096 x 14336 experts
        "ops=[moe_decode_16bit,moe_decode_int4,moe_decode_int2]",
        "decode_tokens=[0,1,2,16,32]", "energy.window_s=0.5", "energy.idle_s=1.0", "warmup=5", "repeats=20",
        "tracking.enabled=false"))
    model = costs.KernelCostModel.from_file(path)
    for bits in (16, 4, 2):
        entry = data["decode"]["ops"][costs.decode_op(bits)]
        assert entry["path"] == "triton" and entry["steps_per_call"] >= 16 and entry["energy_j"] is not None
    # the op with nothing routed (every program returns at once) costs less than reading one 16-bit expert
    lat16 = data["decode"]["ops"]["moe_decode_16bit"]["latency_ms"]
    assert lat16[0] < 0.5 * lat16[1], lat16
    one = [model.decode_cost(b, 1) for b in (16, 4, 2)]
    assert one[0].latency_ms > one[1].latency_ms > one[2].latency_ms > 0, one
    assert one[0].energy_j > one[1].energy_j > one[2].energy_j > 0, one
