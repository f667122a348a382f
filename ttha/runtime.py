"""The process a run lives in: which device, which seeds, how many host threads, what a signal does.

One home for what every entry point sets up before any work, so train.py, profile_kernels.py and the
stress tool make the same choices.
"""
from __future__ import annotations

import _thread
import contextlib
import gc
import random
import signal
import sys
import threading

import numpy as np
import torch

from ttha import kernels
from ttha.kernels._backend import interpreting
from ttha.config import ConfigError


def resolve_device(name) -> torch.device:
    """`auto` picks CUDA when present; an explicit CUDA device on a machine without one is a config error."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", name, "CUDA is not available on this machine")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError("device", name, "not a torch device (auto | cpu | cuda | cuda:N)") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError("device", name, f"this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


@contextlib.contextmanager
def steady_heap():
    """Serving with Python's cyclic garbage collector kept off the objects already alive (torch, MLflow, Hydra:
    hundreds of thousands): a full collection walks them all and stalls the host for a few hundred milliseconds,
    at whichever step it falls on, and paced serving queues every step behind it. Unreferenced objects are still
    freed; only cycles among the frozen ones wait until the block ends."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_kernel_backend(choice: str) -> str:
    """The one switch between Triton kernels and torch references. Forcing Triton needs CUDA, or Triton's CPU
    interpreter (TRITON_INTERPRET=1): without either the torch references would run under its name."""
    if choice == "triton" and not (torch.cuda.is_available() or interpreting()):
        raise ConfigError("kernels", choice, "needs CUDA (or TRITON_INTERPRET=1 for Triton's CPU interpreter)")
    try:
        kernels.set_backend(choice)
    except ValueError as err:
        raise ConfigError("kernels", choice, str(err).split(": ", 1)[-1]) from None
    return choice


GIL_SWITCH_S = 2e-4  # a GPU run's GIL switch interval (Python's default: 5 ms)


def limit_host_threads(device: torch.device) -> None:
    """On a GPU run the host's torch work is the router's per-step math on tensors of a few thousand
    elements: one thread. A pool of one per core only adds wake-ups, and stalls when another process takes
    cores (a stressor, say). CPU runs keep torch's default: the model itself runs there.

    A GPU run also hands the GIL round sooner: the MLflow flush thread runs Python beside the serving loop, and
    each time the loop lets the GIL go (a CUDA sync, a BLAS call, a sleep) it waited up to the 5 ms default
    switch interval to get it back, a stall per release in a loop whose steps take a fraction of that."""
    if device.type == "cuda":
        torch.set_num_threads(1)
        sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_S))


class Interrupted(KeyboardInterrupt):
    """A signal stopped the process; cleanup treats it as Ctrl-C. The exit code is 128 + signum."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"signal {signum} ({signal.Signals(signum).name})")


def _sigterm_to_interrupt(signum, frame) -> None:
    raise Interrupted(signum)


REDELIVER_AFTER_S = 0.01


def _redeliver_interrupt(unraisable) -> None:
    """sys.unraisablehook: an interrupt raised while a finalizer ran (a garbage-collection callback such as
    SQLAlchemy's, a __del__) is swallowed there ("Exception ignored in ...") and the run would go on for
    good; deliver its signal to the main thread again, where it stops the run. Anything else goes to the
    hook that was there before."""
    exc = unraisable.exc_value
    if isinstance(exc, KeyboardInterrupt):
        # from another thread, a moment later: raised in this hook, the interrupt would be swallowed again
        threading.Timer(REDELIVER_AFTER_S, _interrupt_main, (getattr(exc, "signum", signal.SIGINT),)).start()
        return
    _previous_unraisablehook(unraisable)


def _interrupt_main(signum: int) -> None:
    """The signal again, to the main thread (a real one wakes a sleep); simulated when Python does not handle it."""
    if callable(signal.getsignal(signum)):
        signal.pthread_kill(threading.main_thread().ident, signum)
    else:
        _thread.interrupt_main()


_previous_unraisablehook = sys.unraisablehook


def redeliver_swallowed_interrupts() -> None:
    """Install _redeliver_interrupt (once; the hook in place is kept for everything else)."""
    global _previous_unraisablehook
    if sys.unraisablehook is not _redeliver_interrupt:
        _previous_unraisablehook = sys.unraisablehook
        sys.unraisablehook = _redeliver_interrupt


def install_signal_handlers() -> bool:
    """Make SIGTERM raise KeyboardInterrupt in the main thread, so `with`/finally cleanup runs (the
    stressor stops, the MLflow run is marked KILLED), and an interrupt that lands in a finalizer is not
    lost (redeliver_swallowed_interrupts). Only when SIGTERM has its default handler and we are in the main
    thread; returns whether the handler is installed."""
    if threading.current_thread() is not threading.main_thread():
        return False
    redeliver_swallowed_interrupts()
    current = signal.getsignal(signal.SIGTERM)
    if current is _sigterm_to_interrupt:
        return True
    if current not in (signal.SIG_DFL, None):
        return False
    signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    return True


def to_host_async(t: torch.Tensor) -> torch.Tensor:
    """A copy into pinned host memory, queued on the current stream; valid after the stream's next sync."""
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)
