"""Sweep configuration errors: one line naming the key, printed by Hydra without a traceback."""
from hydra.errors import CompactHydraException

from ttha.config import ConfigError


class SweepConfigError(ConfigError, CompactHydraException):
    """'<key>=<value>: <problem>' — a bad sweeper setting, raised before any trial runs."""


class SweepStopped(CompactHydraException):
    """The sweep stopped early (too many failed trials)."""
