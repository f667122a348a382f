"""Search-space grammar of Hydra's official Optuna sweeper → Optuna distributions.

    choice(a, b, ...)          → CategoricalDistribution
    range(start, stop[, step]) → IntDistribution / FloatDistribution over start, start+step, ... < stop
                                 (half-open, as everywhere else in Hydra's grammar)
    interval(low, high)        → FloatDistribution [low, high]
    tag(log, interval(...))    → log scale;  tag(int, interval(...)) → IntDistribution
    anything else              → a fixed value, passed to every trial unchanged

`custom_search_space` names a function f(cfg, trial) that suggests more parameters; it must live in the
sweeps' own code (a module of ttha.sweeps or of the hydra_plugins namespace, which Hydra imports at every
start anyway): nothing else is imported, so a command line cannot make the sweep run arbitrary code.
"""
from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override, RangeSweep, Transformer
from hydra.errors import HydraException
from optuna.distributions import (BaseDistribution, CategoricalDistribution, FloatDistribution,
                                  IntDistribution)

from ._errors import SweepConfigError

KNOWN_TAGS = ("log", "int")
SEARCH_SPACE_PACKAGES = ("ttha.sweeps", "hydra_plugins")


@dataclass
class SearchSpace:
    distributions: dict[str, BaseDistribution] = field(default_factory=dict)
    fixed: dict[str, str] = field(default_factory=dict)      # key → value as written in an override
    deletions: list[str] = field(default_factory=list)       # ~key overrides, passed through


def _parse(key_label: str, line: str) -> Override:
    try:
        return OverridesParser.create().parse_overrides([line])[0]
    except HydraException as err:
        detail = [ln for ln in str(err).splitlines() if ln.strip() and not ln.startswith("See https")]
        raise SweepConfigError(key_label, line.split("=", 1)[-1],
                               f"malformed search-space expression ({detail[-1] if detail else err})") from None


def _choices(label: str, expr: str, override: Override) -> list[Any]:
    values = list(override.sweep_iterator(transformer=Transformer.encode))
    for v in values:
        if not isinstance(v, (str, int, float, bool)):
            raise SweepConfigError(label, expr, f"choice values must be str, int, float or bool, got {v!r}")
    if not values:
        raise SweepConfigError(label, expr, "no values to choose from")
    return values


def _range(label: str, expr: str, override: Override, value: RangeSweep) -> BaseDistribution:
    if value.shuffle or (value.step is not None and value.step < 0):
        return CategoricalDistribution(_choices(label, expr, override))
    start, stop, step = value.start, value.stop, value.step if value.step is not None else 1
    if step == 0:
        raise SweepConfigError(label, expr, "step must be > 0")
    n = math.ceil((stop - start) / step - 1e-9)
    if n < 1:
        raise SweepConfigError(label, expr, "range is empty (stop must be > start)")
    if all(isinstance(x, int) for x in (start, stop, step)):
        return IntDistribution(start, start + (n - 1) * step, step=step)
    high = round(start + (n - 1) * step, 12)
    return FloatDistribution(float(start), high, step=float(step))


def _interval(label: str, expr: str, value: IntervalSweep) -> BaseDistribution:
    unknown = set(value.tags) - set(KNOWN_TAGS)
    if unknown:
        raise SweepConfigError(label, expr, f"unknown tag {sorted(unknown)[0]!r} (known: {', '.join(KNOWN_TAGS)})")
    low, high, log = value.start, value.end, "log" in value.tags
    if not low < high:
        raise SweepConfigError(label, expr, "interval needs low < high")
    if log and low <= 0:
        raise SweepConfigError(label, expr, "a log interval needs low > 0")
    if "int" in value.tags:
        if low != int(low) or high != int(high):
            raise SweepConfigError(label, expr, "an int interval needs integer bounds")
        return IntDistribution(int(low), int(high), log=log)
    return FloatDistribution(float(low), float(high), log=log)


def distribution(label: str, line: str) -> BaseDistribution | str | None:
    """One override line `key=expr` → a distribution, or the fixed value as a string (None: a deletion)."""
    override = _parse(label, line)
    if override.is_delete():
        return None
    expr = line.split("=", 1)[-1]
    if not override.is_sweep_override():
        return override.get_value_element_as_str()
    value = override.value()
    if override.is_choice_sweep():
        return CategoricalDistribution(_choices(label, expr, override))
    if override.is_range_sweep():
        assert isinstance(value, RangeSweep)
        return _range(label, expr, override, value)
    if override.is_interval_sweep():
        assert isinstance(value, IntervalSweep)
        return _interval(label, expr, value)
    raise SweepConfigError(label, expr, "unsupported sweep expression")


def build(params: dict[str, Any] | None, arguments: list[str]) -> SearchSpace:
    """hydra.sweeper.params (config) + command-line overrides; the command line wins on the same key."""
    lines = [(f"hydra.sweeper.params.{k}", f"{k}={_as_expr(v)}") for k, v in (params or {}).items()]
    lines += [(line.split("=", 1)[0], line) for line in arguments]
    space = SearchSpace()
    for label, line in lines:
        parsed = distribution(label, line)
        key = _parse(label, line).get_key_element()
        space.distributions.pop(key, None)
        space.fixed.pop(key, None)
        if parsed is None:
            space.deletions.append(line)
        elif isinstance(parsed, BaseDistribution):
            space.distributions[key] = parsed
        else:
            space.fixed[key] = parsed
    return space


def _as_expr(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_as_expr(v) for v in value) + "]"
    return str(value)


def as_override_value(value: Any) -> str:
    """A sampled value written back into an override (choice strings are already in override syntax)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def representative(dist: BaseDistribution) -> Any:
    """A value inside the distribution (for the dry-run composition before any trial)."""
    if isinstance(dist, CategoricalDistribution):
        return dist.choices[0]
    return dist.low  # Int/FloatDistribution


def search_space_function(path: str) -> Callable[[Any, Any], Any]:
    """The function custom_search_space names, imported only from SEARCH_SPACE_PACKAGES."""
    label = "hydra.sweeper.custom_search_space"
    module, _, name = str(path).rpartition(".")
    parts = module.split(".") + [name]
    if not all(p.isidentifier() for p in parts) or name.startswith("_") or not any(
            module == pkg or module.startswith(pkg + ".") for pkg in SEARCH_SPACE_PACKAGES):
        raise SweepConfigError(label, path, "must name a function f(cfg, trial) of a module under "
                               f"{' or '.join(SEARCH_SPACE_PACKAGES)} (module.function)")
    try:
        fn = getattr(importlib.import_module(module), name)
    except Exception as err:
        from ttha.tracking import failure_line

        raise SweepConfigError(label, path, f"cannot import it ({failure_line(err)})") from None
    if not inspect.isfunction(fn) or fn.__module__ != module:  # not a name another module lends it
        raise SweepConfigError(label, path, f"is not a function defined in {module}")
    return fn
