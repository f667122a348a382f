"""GPU timing from CUDA graphs, shared by the benchmark (bench.py) and the decode-chain tuner (chain_tune.py)."""
from __future__ import annotations

import statistics

import torch

L2_ROTATE_BYTES = 256 << 20  # rotate among weight copies so repeated calls do not run from the 50 MB L2


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


GRAPH_CALLS = 16  # calls a timed graph holds at least, so its launch is a small share of its time


def replay_us(graph, calls: int, replays: int = 10, repeats: int = 5) -> float:
    """GPU time per call of a graph of `calls` calls: `replays` replays back to back between two CUDA events,
    the median of `repeats`. Not do_bench: it zeroes a 256 MB buffer before each timed call, and writing back the
    dirty L2 lines that leaves costs the call after it up to ~20 us (H100, bf16 F.linear 8192x28672: 160.5 us of
    kernel, 179.8 us per call from a graph of one call), a share that falls with the calls the graph holds and so
    favoured kernels whose rotation held more copies. Back to back, the rotation over >= 256 MiB of weights is
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
