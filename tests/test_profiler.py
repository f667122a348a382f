"""profile_kernels.py / ttha.profiler on the CPU: cost-model JSON, MLflow run, torch.profiler round trip,
the energy-window arithmetic against a simulated NVML counter, config errors."""
import json
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from ttha import costs, profiler
from ttha.config import ConfigError
from ttha.paths import conf_dir
from ttha.profiler import measure, ops, report

CONF = str(conf_dir())
EXPERT_OPS = [costs.expert_op(b) for b in (16, 8, 4, 2)]
RUN_OPS = EXPERT_OPS + ["router_topk", "ttha_adapter_forward", "ttha_update", "ttt_light", "ttt_full"]


def _cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("profile", overrides=[
            "size=tiny", "batch_sizes=[1,16,512]", "warmup=2", "repeats=7", "cpu_threads=1", "progress=false",
            f"out={tmp_path}/cm/cpu.json", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "device=cpu",
            *overrides])


@pytest.fixture(scope="module")
def cpu_profile(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("profile")
    path, data = profiler.run(_cfg(tmp))
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
    assert path.with_suffix(".png").stat().st_size > 10_000


def test_trace_saved_and_parsed_back_gives_the_same_ops(tmp_path):
    device = torch.device("cpu")
    shape = {"d_model": 64, "d_ff": 128, "n_experts": 4, "top_k": 2, "group_size": 32, "ttt_seq_len": 16,
             "ttt_expert_bits": [16, 4, 2]}
    templates = ops.operation_templates(ops.Context(device, torch.float32, shape, None, 0))
    picked = {k: templates[k] for k in ("expert_16bit", "expert_int2", "router_topk")}
    trace = report.save_trace(picked, [2, 4096], device, tmp_path / "trace.json", repeats=3)
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


@pytest.mark.parametrize("override, key", [
    ("batch_sizes=[16,4]", "batch_sizes"),
    ("batch_sizes=[]", "batch_sizes"),
    ("energy.window_s=0.2", "energy.window_s"),
    ("size=huge", "size"),
    ("ops=[expert_16bit,expert_int3]", "ops"),
    ("sizes.tiny.ttt_model=nope", "ttt_model"),
    ("kernels=cuda", "kernels"),
])
def test_bad_config_is_one_line_naming_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError) as err:
        profiler.run(_cfg(tmp_path, override, "tracking.enabled=false"))
    assert err.value.key == key and "\n" not in str(err.value)


def test_default_out_is_the_gpu_file_under_the_outputs_root(tmp_path, monkeypatch):
    monkeypatch.setattr(profiler, "outputs_root", lambda: tmp_path / "root")
    path, data = profiler.run(_cfg(tmp_path, "out=null", "ops=[expert_16bit]", "batch_sizes=[1]",
                                   "tracking.enabled=false"))
    assert path == tmp_path / "root" / "cost_models" / costs.gpu_file_name(data["gpu"]) and path.is_file()


def test_partial_profile_carries_the_other_ops_over_from_base(cpu_profile, tmp_path):
    _, base_path, base = cpu_profile
    path, data = profiler.run(_cfg(tmp_path, "ops=[expert_int4]", f"base={base_path}", "tracking.enabled=false"))
    assert set(data["ops"]) == set(base["ops"])
    assert data["ops"]["ttt_full"] == base["ops"]["ttt_full"]  # carried over verbatim
    assert data["carried_over"]["ops"] == sorted(set(base["ops"]) - {"expert_int4"})
    assert json.loads(Path(path).read_text())["carried_over"]["from"].endswith(str(base_path))


def test_base_from_another_gpu_is_rejected_before_profiling(tmp_path):
    with pytest.raises(ConfigError) as err:
        profiler.run(_cfg(tmp_path, f"base={costs.DEFAULT_PATH}", "tracking.enabled=false"))
    assert err.value.key == "base" and "measured on NVIDIA" in str(err.value)
    assert not (tmp_path / "cm").exists()  # nothing written
