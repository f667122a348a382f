"""Sweep configuration errors: one line naming the key, printed by Hydra without a traceback."""
from typing import Any

from hydra.errors import CompactHydraException


class SweepConfigError(ValueError, CompactHydraException):
    """'<key>=<value>: <problem>': a bad sweeper setting, raised before any trial runs. The plugin's own
    type, so it works for any Hydra app; the line reads like ttha's ConfigError."""

    def __init__(self, key: str, value: Any, problem: str):
        self.key, self.value, self.problem = key, value, problem
        super().__init__(f"{key}={value!r}: {problem}")


class SweepStopped(CompactHydraException):
    """The sweep stopped early (too many failed trials)."""
