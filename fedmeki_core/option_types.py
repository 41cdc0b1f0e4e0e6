"""One rule for typed settings given as plain data: a value must have the type of its default."""

from __future__ import annotations

from typing import Any


def has_type_of(value: Any, default: Any) -> bool:
    """True when `value` fits the type of `default`; bools are strict, an int fits where a float is expected."""
    expected = type(default)
    if expected is bool or isinstance(value, bool):
        return type(value) is expected
    if expected is float:
        return isinstance(value, int | float)
    return isinstance(value, expected)
