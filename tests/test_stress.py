"""Stressors: schedules, sim power, and the child process lifecycle (CPU stand-in child): gone after
stop, after an exception inside the `with`, and after the parent is SIGKILLed."""
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from omegaconf import OmegaConf

from ttha import stress, telemetry as tm
from ttha.config import ConfigError
from ttha.paths import conf_dir


def stress_cfg(name, **over):
    return OmegaConf.merge(OmegaConf.load(conf_dir() / "stress" / f"{name}.yaml"), OmegaConf.create(over))


def alive(pid: int) -> bool:
    """Running (a zombie or a reaped pid counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return not alive(pid)


# ----------------------------------------------------------------------------- schedules

def test_schedules():
    m = stress.Schedule("matmul", duty_cycle=0.25, period_s=1.0)
    assert [m.on(t) for t in (0.1, 0.2, 0.3, 0.9, 1.1)] == [True, True, False, False, True]
    assert m.level(123.0) == 0.25
    b = stress.Schedule("bursty", on_s=2.0, off_s=1.0)
    assert [b.level(t) for t in (0.5, 1.9, 2.1, 2.9, 3.1)] == [1.0, 1.0, 0.0, 0.0, 1.0]
    r = stress.Schedule("thermal_ramp", ramp_s=10.0, period_s=1.0)
    assert [r.level(t) for t in (0.0, 2.5, 10.0, 50.0)] == [0.0, 0.25, 1.0, 1.0]
    assert r.on(5.3) and not r.on(5.7)  # level 0.5: on for the first half of each period


@pytest.mark.parametrize("over,key", [({"duty_cycle": 1.5}, "stress.duty_cycle"), ({"period_s": 0}, "stress.period_s"),
                                      ({"kind": "melt"}, "stress.kind"), ({"backend": "tpu"}, "stress.backend"),
                                      ({"sim_power_w": -1}, "stress.sim_power_w")])
def test_bad_stress_config(over, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        stress.build_stressor(stress_cfg("matmul", **over), torch.device("cpu"), None)


# ----------------------------------------------------------------------------- no stress

def test_none_and_auto_without_simulator():
    s = stress.build_stressor(OmegaConf.create({"kind": "none"}), torch.device("cpu"), None)
    assert not s.start().running
    replay = tm.build_monitor(OmegaConf.create({"source": "replay", "sample_hz": 10.0}), None)
    s = stress.build_stressor(stress_cfg("bursty"), torch.device("cpu"), replay)  # nothing to load
    assert s.backend == "none" and not s.start().running


# ----------------------------------------------------------------------------- child process lifecycle

def cpu_stressor():
    return stress.build_stressor(stress_cfg("matmul", size=16, duty_cycle=0.5), torch.device("cpu"), None,
                                 backend="cpu")


def test_child_gone_after_stop():
    s = cpu_stressor()
    with s:
        s.start()
        pid = s.pid
        assert alive(pid) and s.running
        time.sleep(0.3)
        assert alive(pid)  # still working, not crashed
        s.stop()
        assert not alive(pid) and not s.running
        s.stop()  # idempotent


def test_child_gone_after_exception_in_with():
    with pytest.raises(RuntimeError, match="boom"):
        with cpu_stressor() as s:
            s.start()
            pid = s.pid
            assert alive(pid)
            raise RuntimeError("boom")
    assert not alive(pid)


PARENT = textwrap.dedent("""
    import sys, time, torch
    from omegaconf import OmegaConf
    from ttha import stress
    s = stress.build_stressor(OmegaConf.create({"kind": "matmul", "size": 16, "duty_cycle": 0.5}),
                              torch.device("cpu"), None, backend="cpu").start()
    print(s.pid, flush=True)
    time.sleep(60)
""")


def test_child_dies_when_parent_is_sigkilled():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())
        time.sleep(1.0)  # the child is up (past its spawn bootstrap) and working
        assert alive(pid)
        parent.kill()  # SIGKILL: no atexit, no handlers
        parent.wait()
        assert wait_gone(pid, 5.0), "stressor child outlived its SIGKILLed parent"
    finally:
        parent.kill()
        parent.wait()


SIGTERM_PARENT = textwrap.dedent("""
    import time, torch
    from omegaconf import OmegaConf
    from ttha import runtime, stress
    assert runtime.install_signal_handlers()
    try:
        with stress.build_stressor(OmegaConf.create({"kind": "bursty", "size": 16}), torch.device("cpu"), None,
                                   backend="cpu") as s:
            s.start()
            print(s.pid, flush=True)
            time.sleep(60)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
""")


def test_sigterm_becomes_keyboard_interrupt_and_stops_child():
    parent = subprocess.Popen([sys.executable, "-c", SIGTERM_PARENT], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())
        assert alive(pid)
        parent.send_signal(signal.SIGTERM)
        assert parent.stdout.readline().strip() == "interrupted"
        assert parent.wait(10) == 0
        assert not alive(pid)
    finally:
        parent.kill()
        parent.wait()


def test_measure_reports_the_power_a_scenario_adds_under_sim():
    """Under sim the windows are simulated seconds: the same numbers on any host."""
    (row,) = stress.measure(["matmul"], seconds=1.5, device="cpu", idle_s=0.5)
    assert row["telemetry"] == "sim" and row["idle_w"] == pytest.approx(78.0, abs=1e-6)
    # matmul at duty 1 adds sim_power_w = 250 W; NVML-like averaging (0.5 s) lags the first part of the window
    assert 150.0 < row["added_power_w"] < 250.0 and row["added_temp_c"] > 1.0
    assert stress.measure(["matmul"], seconds=1.5, device="cpu", idle_s=0.5) == [row]
