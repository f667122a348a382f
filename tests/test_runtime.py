"""The process a run lives in: host threads and what SIGTERM does."""
import os
import signal
import sys
import time

import pytest
import torch

from ttha.runtime import GIL_SWITCH_S, install_signal_handlers, limit_host_threads


def test_gpu_runs_do_host_math_on_one_thread_cpu_runs_keep_the_pool():
    """A GPU run: one torch thread and a GIL handed round within GIL_SWITCH_S; a CPU run keeps both."""
    before, switch = torch.get_num_threads(), sys.getswitchinterval()
    try:
        torch.set_num_threads(2)
        sys.setswitchinterval(0.005)
        limit_host_threads(torch.device("cpu"))
        assert torch.get_num_threads() == 2 and sys.getswitchinterval() == 0.005  # the model runs on the CPU
        limit_host_threads(torch.device("cuda", 0))
        assert torch.get_num_threads() == 1 and sys.getswitchinterval() == pytest.approx(GIL_SWITCH_S)
    finally:
        torch.set_num_threads(before)
        sys.setswitchinterval(switch)


def test_install_signal_handlers_keeps_a_user_handler():
    old = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, lambda *a: None)
        assert install_signal_handlers() is False
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        assert install_signal_handlers() is True
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1.0)
    finally:
        signal.signal(signal.SIGTERM, old)


class _InterruptedFinalizer:
    """A signal that arrives while a finalizer runs raises its KeyboardInterrupt there, where Python only prints
    it ("Exception ignored in ...": seen with SQLAlchemy's weakref callbacks while MLflow opens its store)."""

    def __init__(self, exc: KeyboardInterrupt):
        self.exc = exc

    def __del__(self):
        raise self.exc


def _wait(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.01)


def test_an_interrupt_swallowed_by_a_finalizer_still_stops_the_run(monkeypatch):
    from ttha.runtime import Interrupted

    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # pytest's own, restored after the test
    old = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        assert install_signal_handlers() is True
        with pytest.raises(Interrupted) as caught:
            _InterruptedFinalizer(Interrupted(signal.SIGTERM))  # dropped at once: __del__ raises, unraisable
            _wait(5.0)  # the signal comes again to the main thread, outside the finalizer
        assert caught.value.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C: Python's own SIGINT handler
            _InterruptedFinalizer(KeyboardInterrupt())
            _wait(5.0)
    finally:
        signal.signal(signal.SIGTERM, old)


def test_steady_heap_keeps_the_collector_off_older_objects_until_it_ends_however_it_ends():
    import gc

    from ttha.runtime import steady_heap
    older = [[] for _ in range(100)]
    with pytest.raises(RuntimeError):
        with steady_heap():
            assert gc.get_freeze_count() >= len(older)
            collected = {id(o) for g in range(3) for o in gc.get_objects(generation=g)}
            assert not any(id(o) in collected for o in older)  # in the permanent generation, which no pass walks
            raise RuntimeError("serving failed")
    assert gc.get_freeze_count() == 0
