"""Byte-level corpus: a train split and a shifted test stream, split by module, nothing downloaded.

The default corpus is the Python standard library's own source. Files are grouped by top-level
module or package, and whole groups go to the test stream, so the test stream is code the model
never saw in training (a distribution shift for test-time adaptation). The split is cached as tensors,
keyed by its config (cached_corpus).
"""
from __future__ import annotations

import hashlib
import json
import random
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from omegaconf import OmegaConf

from ttha import cache
from ttha.config import ConfigError

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass
class Corpus:
    train: torch.Tensor  # uint8 [n]
    test: torch.Tensor  # uint8 [m]
    train_files: list[str]
    test_files: list[str]


def _files(root: Path, extensions: list[str] | None) -> list[Path]:
    exts = {e.lower() for e in extensions} if extensions else None
    out = []
    for p in root.rglob("*"):
        rel = p.relative_to(root).parts
        if SKIP_DIRS.intersection(rel) or not p.is_file():
            continue
        if exts is not None and p.suffix.lower() not in exts:
            continue
        if p.stat().st_size > 0:
            out.append(p)
    return sorted(out)


def _concat(files: list[Path], cap: int) -> torch.Tensor:
    chunks, total = [], 0
    for f in files:
        b = f.read_bytes() + b"\n"
        chunks.append(b[: cap - total])
        total += len(chunks[-1])
        if total >= cap:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)


def corpus_root(cfg) -> Path:
    """data.corpus_dir, or this Python's standard library when it is null."""
    custom = cfg.get("corpus_dir")
    return Path(str(custom)).expanduser() if custom else Path(sysconfig.get_paths()["stdlib"])


def load_corpus(cfg) -> Corpus:
    """Split the corpus by top-level module (deterministic by cfg.seed)."""
    custom = cfg.get("corpus_dir")
    root = corpus_root(cfg)
    # A custom folder takes every file (any text); the stdlib, only the configured extensions.
    files = _files(root, None if custom else list(cfg.get("extensions") or [".py"]))
    if not files:
        raise ConfigError("data.corpus_dir", str(root), "holds no non-empty files")
    groups: dict[str, list[Path]] = {}
    for f in files:
        groups.setdefault(f.relative_to(root).parts[0], []).append(f)
    names = sorted(groups)
    random.Random(int(cfg.seed)).shuffle(names)
    n_test = max(1, round(len(names) * float(cfg.test_frac))) if len(names) > 1 else 0
    test_names, train_names = names[:n_test], names[n_test:]
    train_files = [f for n in train_names for f in groups[n]]
    test_files = [f for n in test_names for f in groups[n]]
    if not test_files:  # a single-file folder: its tail is the test stream
        data = _concat(train_files, int(cfg.max_train_bytes) + int(cfg.max_test_bytes))
        cut = int(len(data) * (1 - float(cfg.test_frac)))
        return Corpus(data[:cut], data[cut:], [str(f) for f in train_files], [str(f) for f in train_files])
    return Corpus(_concat(train_files, int(cfg.max_train_bytes)), _concat(test_files, int(cfg.max_test_bytes)),
                  [str(f) for f in train_files], [str(f) for f in test_files])


def cached_corpus(cfg, cache_dir: Path) -> Corpus:
    """load_corpus(cfg), cached in cache_dir under a hash of the config (ttha.cache: safetensors + a checked JSON;
    a damaged entry is rebuilt): every sweep trial reads the corpus, and loading the cached tensors is far
    cheaper than reading and splitting the files again."""
    payload = {"data": OmegaConf.to_container(cfg, resolve=True), "root": str(corpus_root(cfg)),
               "python": sys.version}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def build() -> tuple[dict, dict]:
        corpus = load_corpus(cfg)
        return ({"train": corpus.train, "test": corpus.test},
                {"train_files": corpus.train_files, "test_files": corpus.test_files, "config": payload})

    def check(tensors: dict, meta: dict) -> None:
        if set(tensors) != {"train", "test"} or any(t.dtype != torch.uint8 or t.dim() != 1 for t in tensors.values()):
            raise cache.Damaged("not a corpus split")
        if meta.get("config") != payload:
            raise cache.Damaged("built for another config")

    tensors, meta, _ = cache.get_or_build(Path(cache_dir) / f"corpus-{key}", build, "corpus", check)
    return Corpus(tensors["train"], tensors["test"], list(meta["train_files"]), list(meta["test_files"]))


def stream_batches(stream: torch.Tensor, batch_size: int, seq_len: int, n_batches: int) -> Iterator[torch.Tensor]:
    """Consecutive windows [B, S + 1] (int64) in stream order, wrapping at the end."""
    n = len(stream) - seq_len - 1
    if n <= 0:
        raise ValueError(f"stream of {len(stream)} bytes is shorter than seq_len + 1 = {seq_len + 1}")
    offsets = torch.arange(seq_len + 1)
    for i in range(n_batches):
        starts = (torch.arange(batch_size) + i * batch_size) * seq_len % n
        yield stream[starts[:, None] + offsets].long()


def random_batch(stream: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """Random windows [B, S + 1] for training."""
    starts = torch.randint(0, len(stream) - seq_len - 1, (batch_size,), generator=gen)
    return stream[starts[:, None] + torch.arange(seq_len + 1)].long()


def unigram_perplexity(stream: torch.Tensor) -> float:
    """exp(entropy) of the stream's own byte distribution: the best a context-free model can do."""
    p = torch.bincount(stream.long(), minlength=256).double()
    p = p[p > 0] / p.sum()
    return float(torch.exp(-(p * p.log()).sum()))
