"""The search space: ``hydra.sweeper.params`` and the command line's overrides, parsed with
Hydra's override grammar into Optuna distributions and fixed overrides.

* ``interval(a, b)``: ``FloatDistribution(a, b)``;
* ``int(interval(a, b))``: ``IntDistribution(a, b)``;
* ``tag(log, interval(a, b))`` (or of ``int(interval(...))``): the same with ``log=True``;
* ``range(a, b[, s])``: ``IntDistribution(a, last, step=s)`` with ``last`` the range's last
  value (float bounds or step: ``FloatDistribution(a, last, step=s)``);
* ``choice(x, y, ...)`` or ``x,y,...``: ``CategoricalDistribution``; list and dict choices are
  kept as their override text (``[32,64]``);
* ``glob(...)``: ``CategoricalDistribution`` of the matching config options;
* anything else: a fixed override, passed to every trial as written.

Unlike hydra-optuna-sweeper, ``range`` excludes its stop (as Hydra and Python do) and string
choices are quoted where Hydra would misread them. Later entries win: the command line
overrides ``params``, and a fixed value removes a key from the search space.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    ChoiceSweep,
    IntervalSweep,
    Override,
    QuotedString,
    RangeSweep,
)
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from hwexp.sweep.overrides import override_value

PRIMITIVES = (str, int, float, bool, type(None))
KNOWN_TAGS = {"log"}


@dataclass(frozen=True)
class SearchParam:
    """One searched key. ``name``: the Optuna parameter (config key or group, no ``+``);
    ``key``: the override's key element (with ``+``/``++``/``@package``); ``verbatim``: the
    choices are override text already (list/dict choices); ``expression``: as written."""

    name: str
    key: str
    distribution: BaseDistribution
    expression: str
    verbatim: bool = False

    def override(self, value: Any) -> str:
        """The override that sets this key to the sampled ``value``."""
        return f"{self.key}={value if self.verbatim else override_value(value)}"


@dataclass(frozen=True)
class SearchSpace:
    """Searched keys (in order of appearance) and the fixed overrides every trial gets."""

    params: tuple[SearchParam, ...]
    fixed: tuple[str, ...]

    @property
    def distributions(self) -> dict[str, BaseDistribution]:
        return {p.name: p.distribution for p in self.params}

    def overrides(self, values: Mapping[str, Any]) -> list[str]:
        """The fixed overrides, then one per searched key with its value from ``values``."""
        return [*self.fixed, *(p.override(values[p.name]) for p in self.params)]

    def describe(self) -> dict[str, str]:
        """``{name: expression}`` of the searched keys (for logs and MLflow params)."""
        return {p.name: p.expression for p in self.params}


def parse_search_space(
    params: Mapping[str, Any] | None,
    arguments: Sequence[str] = (),
    config_loader: Any = None,
) -> SearchSpace:
    """The search space of ``params`` (key -> expression or value) followed by ``arguments``
    (command-line overrides). ``config_loader`` expands ``glob(...)`` choices.

    Raises:
        ValueError: an expression Optuna cannot search (empty range, unknown tag, ...).
    """
    lines = [_param_line(key, value) for key, value in (params or {}).items()]
    parser = OverridesParser.create(config_loader=config_loader)
    searched: dict[str, SearchParam] = {}
    fixed: dict[str, str] = {}
    for override in parser.parse_overrides([*lines, *arguments]):
        name = override.key_or_group
        searched.pop(name, None)
        fixed.pop(name, None)
        if override.is_sweep_override():
            searched[name] = search_param(override)
        else:
            fixed[name] = str(override.input_line)
    return SearchSpace(tuple(searched.values()), tuple(fixed.values()))


def _param_line(key: str, value: Any) -> str:
    """``key=value`` for one entry of ``params``: strings as written (expressions), other
    values (numbers, lists, ...) as override values."""
    return f"{key}={value if isinstance(value, str) else override_value(value)}"


def search_param(override: Override) -> SearchParam:
    """The distribution of one sweep override (see the module table)."""
    value = override.value()
    expression = override.get_value_string() if override.input_line else str(value)
    unknown = set(getattr(value, "tags", set())) - KNOWN_TAGS
    if unknown:
        raise ValueError(f"{override.input_line}: unknown tag(s) {sorted(unknown)}; known: log")

    def param(distribution: BaseDistribution, verbatim: bool = False) -> SearchParam:
        return SearchParam(
            override.key_or_group, override.get_key_element(), distribution, expression, verbatim
        )

    if isinstance(value, IntervalSweep):
        log = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return param(IntDistribution(value.start, value.end, log=log))
        return param(FloatDistribution(float(value.start), float(value.end), log=log))
    if "log" in getattr(value, "tags", set()):
        raise ValueError(f"{override.input_line}: tag(log, ...) applies to interval(...) only")
    if isinstance(value, RangeSweep):
        values = list(value.range())
        if not values:
            raise ValueError(f"{override.input_line}: the range is empty")
        if all(isinstance(v, int) for v in (value.start, value.stop, value.step)):
            return param(IntDistribution(values[0], values[-1], step=int(value.step)))
        step = float(value.step)
        return param(FloatDistribution(float(values[0]), float(values[-1]), step=step))
    if isinstance(value, ChoiceSweep) or override.is_choice_sweep():
        choices = [c.text if isinstance(c, QuotedString) else c for c in override.sweep_iterator()]
        if not choices:
            raise ValueError(f"{override.input_line}: no choices")
        if all(isinstance(c, PRIMITIVES) for c in choices):
            return param(CategoricalDistribution(choices))
        texts = [Override._get_value_element_as_str(c) for c in choices]
        return param(CategoricalDistribution(texts), verbatim=True)
    raise ValueError(f"{override.input_line}: not a sweep Optuna can search")
