"""The process a run lives in: host threads and what SIGTERM does."""
import os
import signal
import time

import pytest
import torch

from ttha.runtime import install_signal_handlers, limit_host_threads


def test_gpu_runs_do_host_math_on_one_thread_cpu_runs_keep_the_pool():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        limit_host_threads(torch.device("cpu"))
        assert torch.get_num_threads() == 2  # the model runs on the CPU: its threads stay
        limit_host_threads(torch.device("cuda", 0))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


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
