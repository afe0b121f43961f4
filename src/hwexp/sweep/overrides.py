"""Hydra override values: Python values written so that Hydra's override parser reads them
back unchanged (the sweeper passes trial parameters and the ``sweep_trial`` block this way)."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- overrides

_PLAIN_STRING = re.compile(r"[A-Za-z_][\w\-./]*")
_RESERVED = {"true", "false", "null", "nan", "inf", "none"}
_BACKSLASHES_BEFORE_QUOTE = re.compile(r"(\\+)(?='|$)")


def override_value(value: Any) -> str:
    """``value`` (None, bool, int, float, str, or lists/mappings of them) written as the value
    of a Hydra command-line override that parses back to the same value. Strings are quoted
    unless plain, and ``${`` is escaped (no interpolation)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, str):
        if _PLAIN_STRING.fullmatch(value) and value.lower() not in _RESERVED:
            return value
        # Hydra's quoted strings: backslashes are literal except before a quote or at the end
        escaped = _BACKSLASHES_BEFORE_QUOTE.sub(lambda m: m.group(1) * 2, value)
        escaped = escaped.replace("'", "\\'").replace("${", "\\${")
        return f"'{escaped}'"
    if isinstance(value, Mapping):
        items = ",".join(f"{key}:{override_value(item)}" for key, item in value.items())
        return "{" + items + "}"
    if isinstance(value, Sequence):
        return "[" + ",".join(override_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as an override value")
