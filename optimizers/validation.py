"""Argument checks shared by the optimizer builders (errors name the argument)."""

from __future__ import annotations

import math
from typing import Any, Collection


def check_positive(name: str, value: Any) -> None:
    """Raises unless `value` is a finite real number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a float > 0, got {value!r} ({type(value).__name__}).")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"`{name}` must be > 0 and finite, got {value!r}; pass e.g. 0.1.")


def check_unit_interval(name: str, value: Any) -> None:
    """Raises unless `value` is a real number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a float in [0, 1), got {value!r}.")
    if not (0.0 <= value < 1.0):
        raise ValueError(f"`{name}` must be in [0, 1), got {value!r}; pass e.g. 0.9.")


def check_unused(kind_name: str, used: Collection[str], **hparams: Any) -> None:
    """Raises if a hyperparameter not in `used` was set (is not None)."""
    for name, value in hparams.items():
        if value is not None and name not in used:
            uses = ", ".join(sorted(used)) or "no hyperparameter besides learning_rate"
            raise ValueError(
                f"`{name}` is not used by the {kind_name} optimizer (it uses {uses}), "
                f"got {name}={value!r}; leave it unset or choose an optimizer that uses it."
            )
