"""Checked cache entries, shared by sweep trials and concurrent runs: the pretrained model, the corpus split.

An entry is `<stem>.safetensors` (tensors only: reading it cannot run code, unlike a pickle) and `<stem>.json`
beside it (metadata, and the sha256 of the tensors file, checked before the tensors are parsed). A damaged entry
(truncated, garbled, half-written, or refused by the caller's check) is rebuilt with one warning line. One process
builds an entry while the others that want it wait on a file lock beside it (`<stem>.lock`), then read it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable

import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)
FORMAT = 1  # bump when the layout of an entry changes: older entries are then rebuilt
Tensors = dict[str, torch.Tensor]


class Damaged(Exception):
    """A cache entry that must not be used; the message says why, in a few words."""


def tensors_path(stem: Path) -> Path:
    return Path(f"{stem}.safetensors")


def meta_path(stem: Path) -> Path:
    return Path(f"{stem}.json")


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def save(stem: Path, tensors: Tensors, meta: dict) -> None:
    """Write the tensors, then the JSON naming their hash, each to a temporary file renamed into place: the JSON
    lands last, so an entry is complete once its JSON is there."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{stem}.tmp{os.getpid()}")
    # contiguous copies: safetensors refuses views and tensors that share memory (tied weights)
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, tmp)
    record = {"format": FORMAT, "sha256": _sha256(tmp), "meta": meta}
    os.replace(tmp, tensors_path(stem))
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, meta_path(stem))


def load(stem: Path) -> tuple[Tensors, dict]:
    """(tensors, meta) of a complete entry whose tensors match their recorded hash; else Damaged."""
    try:
        record = json.loads(meta_path(stem).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise Damaged(f"unreadable metadata: {exc}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("meta"), dict):
        raise Damaged("metadata of another format")
    path = tensors_path(stem)
    try:
        digest = _sha256(path)
    except OSError as exc:
        raise Damaged(f"tensors unreadable: {exc.strerror or exc}") from None
    if digest != record.get("sha256"):
        raise Damaged("sha256 mismatch (truncated or garbled)")
    try:
        return load_file(path), record["meta"]
    except (SafetensorError, ValueError, RuntimeError, OSError) as exc:
        raise Damaged(f"tensors unreadable: {exc}") from None


def _exists(stem: Path) -> bool:
    return meta_path(stem).exists() or tensors_path(stem).exists()


def get_or_build(stem: Path, build: Callable[[], tuple[Tensors, dict]], what: str,
                 check: Callable[[Tensors, dict], None] | None = None) -> tuple[Tensors, dict, bool]:
    """(tensors, meta, cached): the entry at `stem`, checked by `check` (which raises Damaged to refuse it), or
    else build() saved there. Under the entry's file lock, so concurrent callers build it once."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(f"{stem}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:  # the lock is released when its holder ends, even killed (flock)
        log.info("waiting for another process building the %s cache %s", what, stem)
        lock.acquire()
    try:
        if _exists(stem):
            try:
                tensors, meta = load(stem)
                if check is not None:
                    check(tensors, meta)
                return tensors, meta, True
            except Damaged as exc:
                log.warning("%s cache %s is damaged (%s): rebuilding it", what, tensors_path(stem), exc)
        tensors, meta = build()
        save(stem, tensors, meta)
        return tensors, meta, False
    finally:
        lock.release()
