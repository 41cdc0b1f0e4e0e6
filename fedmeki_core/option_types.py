"""Typed settings given as plain data: a value must have the type of its default, and is shown short in errors."""

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


def shown(value: Any, longest: int = 60) -> str:
    """`value` as an error message quotes it: escaped, and short (a 5,000-digit number or string is not a message)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= longest else text[: longest - 3] + "..."
