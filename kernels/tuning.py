"""Tuning and timing helpers: the measurements of the benchmark (bench.py) and the decode-chain tuner.

Timing: a graph of calls over weight copies that span L2, replayed back to back between two CUDA events, so a
call's GPU time is measured without the host's launch path and without L2 serving the weights. Beside it: eager
time (do_bench), copy bandwidth, energy per call (NVML), paced call rates and each kernel's time in a graph.

Tuning: a decode chain (x rearranged, the main kernel, any split-K reduction) is tuned as it is served, the whole
chain timed per config, the fastest kept in memory and on disk; an entry read from disk is used only if it is a config
of the current tuning space, else the chain is tuned again. Triton's autotuner times the main kernel alone,
and its pick is not the chain's: the x-prep kernel overlaps the main kernel's start under programmatic dependent
launch, and how much depends on the tile. The cache file is $TTHA_CHAIN_CACHE, else ~/.cache/ttha/chain_configs.json;
entries are keyed by GPU name, kernel, weight layout (tiles of TILE_ROWS rows), whether split-K partials may be
added in place (not under torch.use_deterministic_algorithms), shape, bit width, group size, bias, dtype and M bucket.
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
import time
from typing import Callable, Iterable

import torch

log = logging.getLogger("ttha.kernels")

L2_ROTATE_BYTES = 256 << 20  # rotate among weight copies so repeated calls do not run from the 50 MB L2
GRAPH_CALLS = 16  # calls a timed graph holds at least, so its launch is a small share of its time


def capture(fn, items: list, repeat: int = 1):
    """One CUDA graph that calls fn(item) for each item (the L2 rotation), `repeat` times over, after an eager
    warm-up (autotuning and compiling cannot run inside a capture)."""
    for it in items:
        fn(it)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for it in items:
            fn(it)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for it in items * repeat:
            fn(it)
    return graph


def replay_us(graph, calls: int, replays: int = 10, repeats: int = 5) -> float:
    """GPU time per call of a graph of `calls` calls: `replays` replays back to back between two CUDA events,
    the median of `repeats`. Not do_bench: it zeroes a 256 MB buffer before each timed call, and writing back the
    dirty L2 lines that leaves costs the call after it, a share that falls with the calls the graph holds and so
    favours kernels whose rotation holds more copies. Back to back, the rotation over >= 256 MiB of weights is
    what keeps L2 from serving them, as in a decode loop."""
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (replays * calls))
    return statistics.median(times)


def timing_graph(fn, items: list):
    """(graph, calls): a graph of fn over the items, repeated to at least GRAPH_CALLS calls."""
    repeat = -(-GRAPH_CALLS // len(items))
    return capture(fn, items, repeat), len(items) * repeat


def graph_us(fn, items: list) -> float:
    """GPU time per call without the host's launch overhead: a timing_graph of fn over the items, replayed back
    to back; what a serving loop that captures its decode step pays. Eager timing of a few-microsecond kernel
    measures the Python launch path instead."""
    return replay_us(*timing_graph(fn, items))


def rotating(make, nbytes: int) -> list:
    """Copies of a weight (make() each), enough to span L2_ROTATE_BYTES, 1 to 8."""
    return [make() for _ in range(max(1, min(8, -(-L2_ROTATE_BYTES // max(nbytes, 1)))))]


def bench_us(fn, warmup=25, rep=100) -> float:
    """Eager time per call, host launch path included (triton.testing.do_bench, median)."""
    import triton

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")) * 1e3


def copy_bandwidth() -> float:
    """GB/s of a 2 GiB device-to-device copy, counting bytes read plus bytes written."""
    a = torch.empty(1 << 30, dtype=torch.float16, device="cuda").normal_()
    b = torch.empty_like(a)
    us = bench_us(lambda: b.copy_(a))
    del a, b
    return 2 * (2 << 30) / (us * 1e-6) / 1e9


def energy_per_call_j(fn, seconds: float = 2.0):
    """Joules per call from the NVML total-energy counter over a saturated loop of >= `seconds`."""
    import pynvml

    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < 0.2:  # calibrate a batch that takes ~0.2 s
        fn()
        n += 1
    torch.cuda.synchronize()
    batch = max(1, n)
    e0 = pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
    t0, calls = time.perf_counter(), 0
    while True:
        for _ in range(batch):
            fn()
        calls += batch
        torch.cuda.synchronize()
        if time.perf_counter() - t0 >= seconds:
            break
    dt = time.perf_counter() - t0
    e1 = pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
    return (e1 - e0) * 1e-3 / calls, (e1 - e0) * 1e-3 / dt


def paced_calls_per_s(fn, seconds: float = 1.0) -> float:
    """Single calls, each waited for (a serving loop): calls completed per second."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        fn()
        torch.cuda.synchronize()
        n += 1
    return n / (time.perf_counter() - t0)


def kernel_us_per_call(graph, calls: int, replays: int = 20) -> dict[str, float]:
    """GPU time of each kernel in a CUDA graph of `calls` calls, per call (torch.profiler over `replays` replays).
    Under programmatic dependent launch a kernel starts before the one it waits on ends, so times may overlap."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    return {e.key: e.device_time_total / (replays * calls) for e in prof.key_averages()
            if e.device_type.name == "CUDA" and e.count}


_MEMO: dict[str, dict] = {}  # chain key -> best config, this process


def cache_path() -> str:
    return os.environ.get("TTHA_CHAIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ttha",
                                                               "chain_configs.json")


def _read_disk() -> dict:
    try:
        with open(cache_path()) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_disk(key: str, config: dict) -> None:
    """Merge one entry into the cache file (atomic replace; another process's entries are kept)."""
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        data = _read_disk()
        data[key] = config
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home: tune again next run
        log.warning("decode-chain config not saved to %s: %s", path, exc)


def _same_config(stored, config: dict) -> bool:
    """Whether a config read from disk is `config`: the same keys, values and value types (JSON's 64.0 or true are
    not the space's 64 or 1)."""
    return (isinstance(stored, dict) and stored.keys() == config.keys()
            and all(type(stored[k]) is type(v) and stored[k] == v for k, v in config.items()))


def best_config(key: str, configs: Iterable[dict], time_us: Callable[[dict], float]) -> dict | None:
    """The config for `key`: remembered, read from the cache file if it is one of `configs` (same keys, values and
    value types), or else the one of `configs` whose chain time_us(config) timed fastest (configs that fail to
    compile or launch are skipped). `configs` is iterated only then, not for a remembered key, so a generator
    defers building the space. None under CUDA graph capture when `key` has no valid tuned config (timing cannot
    run inside a capture) or when every config failed."""
    if key in _MEMO:
        return _MEMO[key]
    disk = _read_disk()
    if key in disk:  # checked against the space before use: the file is anyone's to edit or damage
        configs = list(configs)
        if any(_same_config(disk[key], c) for c in configs):
            _MEMO[key] = disk[key]
            return disk[key]
        log.warning("decode-chain cache %s: %s = %.200r is not a config of its tuning space: tuning again",
                    cache_path(), key, disk[key])
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return None
    timed = []
    for cfg in configs:
        try:
            timed.append((time_us(cfg), cfg))
        except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory for this tile: try the others
            log.debug("chain config %s failed: %s", cfg, exc)
    if not timed:
        return None
    us, cfg = min(timed, key=lambda t: t[0])
    log.info("decode chain %s: %s at %.1f us a call (%d configs timed)", key, cfg, us, len(timed))
    _MEMO[key] = cfg
    _write_disk(key, cfg)
    return cfg
