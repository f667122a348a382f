"""Telemetry: the sampler thread, replay, auto/nvml resolution, NVML read errors (the simulated GPU's own
tests are in test_sim.py)."""
import logging
import time

import pytest
from omegaconf import OmegaConf

from ttha import sim, telemetry as tm
from ttha.config import ConfigError
from ttha.paths import conf_dir


def tel_cfg(preset="sim", **over):
    cfg = OmegaConf.load(conf_dir() / "telemetry" / f"{preset}.yaml")
    return OmegaConf.merge(cfg, OmegaConf.create(over))


def wait_for(pred, timeout=3.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


# ----------------------------------------------------------------------------- the sampler

def test_sampler_thread_runs_at_rate_and_stops():
    """A real-time source (replay) is sampled by a background thread at sample_hz of wall time."""
    mon = tm.build_monitor(tel_cfg("replay", sample_hz=50.0), None)
    mon.start()
    mon.start()  # idempotent: still one thread
    thread = mon._thread
    time.sleep(0.3)
    mon.stop()
    mon.stop()
    n = len(mon.history)
    assert not thread.is_alive() and not mon.running
    assert 8 <= n <= 20  # ~50 Hz for 0.3 s plus the first synchronous sample
    time.sleep(0.1)
    assert len(mon.history) == n  # nothing samples after stop
    ts = [s.t for s in mon.history]
    assert ts == sorted(ts)


# ----------------------------------------------------------------------------- replay

def test_replay_returns_trace_values_in_order():
    trace = sim.load_trace()
    src = tm.ReplaySource(None, speed=1.0)
    for i in (0, 1, 100, len(trace["t"]) - 1):
        s = src.at(float(trace["t"][i]) + 1e-6)
        assert (s.power_w, s.temp_c, s.util_pct, s.sm_clock_mhz) == \
            (trace["p"][i], trace["T"][i], trace["u"][i], trace["clk"][i])
    again = src.at(src.duration + float(trace["t"][100]) + 1e-6)  # loops, energy keeps counting
    assert again.power_w == trace["p"][100]
    assert again.energy_j == pytest.approx(src.energy_per_loop + trace["e"][100] - trace["e"][0])

    with tm.build_monitor(tel_cfg("replay", sample_hz=100.0, replay_speed=20.0), None) as mon:
        assert mon.source == "replay"
        time.sleep(0.4)  # ~8 trace seconds
    idx = [src.index_at(s.t) for s in mon.history]
    assert len(idx) >= 20 and idx == sorted(idx) and idx[-1] > 40
    for s, i in zip(mon.history, idx):
        assert s.power_w == trace["p"][i] and s.temp_c == trace["T"][i]


def test_replay_bad_path_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="telemetry.replay_path"):
        tm.build_monitor(tel_cfg("replay", replay_path=str(tmp_path / "missing.json")), None)
    bad = tmp_path / "bad.json"
    bad.write_text('[{"x": 1}]')
    with pytest.raises(ConfigError, match="telemetry.replay_path"):
        tm.build_monitor(tel_cfg("replay", replay_path=str(bad)), None)


# ----------------------------------------------------------------------------- auto / nvml resolution

def nvml_answers() -> bool:
    return tm._nvml_probe(0)[0] is not None


@pytest.mark.skipif(nvml_answers(), reason="a GPU answers here")
def test_auto_picks_sim_without_gpu_and_says_so(caplog):
    import torch
    with caplog.at_level(logging.INFO, logger="ttha.telemetry"):
        mon = tm.build_monitor(tel_cfg("auto"), torch.device("cpu"))
    assert mon.source == "sim"
    assert "telemetry source: sim" in caplog.text
    mon2 = tm.build_monitor(tel_cfg("auto"), None)  # no device given: NVML is asked, and fails here
    assert mon2.source == "sim"


@pytest.mark.skipif(nvml_answers(), reason="a GPU answers here")
def test_nvml_without_gpu_is_config_error():
    with pytest.raises(ConfigError) as err:
        tm.build_monitor(tel_cfg("nvml"), None)
    assert str(err.value).startswith("telemetry.source='nvml': no NVIDIA GPU answers (NVML: ")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("over,key", [({"sample_hz": 0}, "telemetry.sample_hz"),
                                      ({"sim": {"cap_w": 50.0}}, "telemetry.sim.cap_w"),
                                      ({"sim": {"serve_s": -1}}, "telemetry.sim.serve_s"),
                                      ({"source": "gpu"}, "telemetry.source")])
def test_bad_telemetry_config(over, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        tm.build_monitor(tel_cfg("sim", **over), None)


# ----------------------------------------------------------------------------- NVML source with a fake pynvml

class FakeNvml:
    NVML_TEMPERATURE_GPU, NVML_CLOCK_SM = 0, 1

    def __init__(self):
        self.power_mw, self.energy_mj, self.fail = 300_000, 1_000_000, False
        self.shutdown = 0

    def _check(self):
        if self.fail:
            raise RuntimeError("NVML_ERROR_GPU_IS_LOST")

    def nvmlDeviceGetPowerUsage(self, h):
        self._check()
        return self.power_mw

    def nvmlDeviceGetTemperature(self, h, kind):
        return 55

    def nvmlDeviceGetUtilizationRates(self, h):
        return type("U", (), {"gpu": 97})()

    def nvmlDeviceGetClockInfo(self, h, kind):
        return 1755

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        return 4

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        return self.energy_mj

    def nvmlShutdown(self):
        self.shutdown += 1


def test_nvml_units_and_energy_relative_to_start():
    fake = FakeNvml()
    src = tm.NvmlSource(0, energy_every=2, opened=(fake, object()))
    fake.energy_mj += 2_500  # 2.5 J since start
    s = src.read()
    assert (s.power_w, s.temp_c, s.util_pct, s.sm_clock_mhz, s.throttle_reasons) == (300.0, 55.0, 97.0, 1755.0, 4)
    assert s.energy_j == pytest.approx(2.5)
    time.sleep(0.05)
    s2 = src.read()  # between counter reads: integrated power (300 W x ~0.05 s)
    assert 2.5 + 300 * 0.04 < s2.energy_j < 2.5 + 300 * 0.5


def test_nvml_read_errors_counted_and_last_sample_kept():
    fake = FakeNvml()
    mon = tm.GpuSystemMonitor(tm.NvmlSource(0, opened=(fake, object())), sample_hz=200.0)
    with mon:
        time.sleep(0.05)
        good = mon.latest()
        n_good = len(mon.history)
        fake.fail = True
        assert wait_for(lambda: mon.error_count >= 5)
        assert mon.latest() is good and mon.running
        assert len(mon.history) <= n_good + 1
        fake.fail = False
        fake.power_mw = 450_000
        assert wait_for(lambda: mon.latest().power_w == 450.0)
    assert fake.shutdown == 1 and not mon.running
