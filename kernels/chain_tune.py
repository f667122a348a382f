"""Tune a decode chain as it is served: the whole chain (x rearranged, the main kernel, any split-K reduction),
timed from CUDA graphs, one config at a time, the fastest kept in memory and on disk.

Triton's autotuner times the main kernel alone, and its pick is not the chain's: on the H100 the M = 1 chain's
fastest int4 config ran 15.7 us a call at 4096x14336 where the autotuner's ran 17.0 (kernels/BENCH_H100.md, ninth
version). The x-prep kernel overlaps the main kernel's start under programmatic dependent launch, and how much
depends on the tile. The cache file is $TTHA_CHAIN_CACHE, else ~/.cache/ttha/chain_configs.json; entries are
keyed by GPU name, kernel, weight layout (tiles of TILE_ROWS rows), whether split-K partials may be added in place
(not under torch.use_deterministic_algorithms), shape, bit width, group size, bias, dtype and M bucket.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Callable, Iterable

import torch

log = logging.getLogger("ttha.kernels")
_MEMO: dict[str, dict] = {}  # key -> best config, this process


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


def best_config(key: str, configs: Iterable[dict], time_us: Callable[[dict], float]) -> dict | None:
    """The config for `key`: remembered, read from the cache file, or else the one of `configs` whose chain
    time_us(config) timed fastest (configs that fail to compile or launch are skipped; `configs` is iterated only
    then, so a generator defers building the space). None under CUDA graph capture when `key` was never tuned
    (timing cannot run inside a capture) or when every config failed."""
    if key in _MEMO:
        return _MEMO[key]
    stored = _read_disk().get(key)
    if isinstance(stored, dict):
        _MEMO[key] = stored
        return stored
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
