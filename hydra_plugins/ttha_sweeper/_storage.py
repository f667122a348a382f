"""Optuna storage from `hydra.sweeper.storage`: sqlite (default), any RDB URL, or a journal file."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
from filelock import FileLock

from ._errors import SweepConfigError

KEY = "hydra.sweeper.storage"


def make_storage(url: str, launch_dir: Path) -> tuple[Any, str]:
    """(Optuna storage, absolute URL). sqlite waits up to 60 s on a lock: parallel sweeps share one file."""
    if url.startswith("journal:") or url.endswith((".log", ".journal")):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        path = Path(url.removeprefix("journal:"))
        path = path if path.is_absolute() else launch_dir / path
        _make_folder(url, path.parent)
        return JournalStorage(JournalFileBackend(str(path))), f"journal:{path}"
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        path = path if path.is_absolute() else launch_dir / path
        _make_folder(url, path.parent)
        url = f"sqlite:///{path}"
        with FileLock(f"{path}.lock", timeout=120):  # sweeps started at once on a new file: one creates its tables
            return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}}), url
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True}), url
    except Exception as err:  # an unknown dialect, a missing driver, a server that does not answer
        raise SweepConfigError(KEY, masked(url), str(err).splitlines()[0]) from None


def _make_folder(url: str, folder: Path) -> None:
    """The storage file's folder, created; one that cannot be (under a file, /proc) is a one-line error."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SweepConfigError(KEY, masked(url), f"cannot create {folder} ({err.strerror or err})") from None


def masked(url: str) -> str:
    """The storage URL without a password, for tags and logs."""
    if "://" in url and "@" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return url
