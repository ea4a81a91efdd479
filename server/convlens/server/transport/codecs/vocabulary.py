"""Proto enums <-> the domain's option names, derived from the domain's own tuples.

Each enumerated option is defined once, in the engine (saliency.METHODS, smoothgrad.BASES,
integrated_gradients.BASELINES, targets.REDUCTIONS, render.SCALINGS, optimize.maximize.PRESETS and
PARAMETERIZATIONS, optimize.style.OPTIMIZERS, SOFTEN, GRAM_NORMALIZATIONS, INITS and STYLE_DISTANCES).
A proto value is the enum's name in UPPER_SNAKE plus the option's name (SALIENCY_METHOD_GUIDED_BACKPROP
<-> "guided_backprop"), spelled otherwise only where listed; `enum_values` is the one way back (an option
name to its value). A value or an option without its counterpart fails at import, so the contract and the
engine cannot drift apart silently; the SDK's tables are pinned to these by a test
(tests/test_vocabulary.py), since the SDK may import neither torch nor the server.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any


def enum_prefix(enum: Any) -> str:
    """SaliencyMethod -> "SALIENCY_METHOD_"."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", enum.DESCRIPTOR.name).upper() + "_"


def enum_names(enum: Any, names: Sequence[str], *, unspecified: str | None,
               spelled: Mapping[str, str] | None = None) -> dict[int, str]:
    """{proto value: option name} for every value of `enum` (its UNSPECIFIED means `unspecified`;
    None leaves it out, so that it is refused)."""
    prefix = enum_prefix(enum)
    spelled = dict(spelled or {})
    by_suffix = {spelled.get(name, name.upper()): name for name in names}
    table: dict[int, str] = {}
    for value in enum.DESCRIPTOR.values:
        suffix = value.name.removeprefix(prefix)
        if suffix == "UNSPECIFIED":
            if unspecified is not None:
                table[value.number] = unspecified
            continue
        if suffix not in by_suffix:
            raise RuntimeError(f"proto value {value.name} has no option among {list(names)}: add it to the "
                               "engine or spell it in the codec")
        table[value.number] = by_suffix.pop(suffix)
    if by_suffix:
        raise RuntimeError(f"options {sorted(by_suffix.values())} have no {enum.DESCRIPTOR.name} value "
                           f"({prefix}...) in the proto")
    return table


def enum_values(table: Mapping[int, str]) -> dict[str, int]:
    """The reverse of an `enum_names` table: {option name: its proto value}, never UNSPECIFIED (0)."""
    values: dict[str, int] = {}
    for value, name in sorted(table.items()):
        if value != 0:
            values.setdefault(name, value)
    return values
