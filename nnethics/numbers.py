"""The one rule for numbers a user gives (an option, an environment variable, an API field): finite, and in range.

``float("nan")`` and ``float("inf")`` parse, and every comparison with NaN is false, so a bound such as
``x >= 0`` lets NaN through (click's ``FloatRange`` does: ``--min-gap nan`` was stored as "at least nan logits").
Every numeric input is therefore checked here, or by :class:`~nnethics.commands.common.FiniteFloat` (the click
type, the same rule) or :func:`nnethics.analyses.base.check_values` (an analysis' Options field): finite unless the
field declares otherwise, then within its bounds. Imports nothing heavy.
"""

from __future__ import annotations

import math
import os
from typing import Any


class NumberError(ValueError):
    """A number outside what it may be (bad input: exit code 2); the message names the input and the allowed range."""


def describe_range(lo: float | None, hi: float | None, kind: type = float, lo_open: bool = False,
                   unit: str = "") -> str:
    """``"a whole number from 0 to 100"``, ``"a number of seconds above 0 and at most 86400"``..."""
    what = ("a whole number" if kind is int else "a number") + (f" of {unit}" if unit else "")
    if lo is not None and hi is not None:
        return f"{what} {'above' if lo_open else 'from'} {lo:g} {'and at most' if lo_open else 'to'} {hi:g}"
    if lo is not None:
        return f"{what} {'above' if lo_open else 'of at least'} {lo:g}"
    if hi is not None:
        return f"{what} of at most {hi:g}"
    return f"a finite {what[2:]}" if kind is float else what


def bounded(name: str, value: Any, kind: type = float, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False, unit: str = "", fix: str = "") -> Any:
    """``value`` (a number or its text) as ``kind``, or :class:`NumberError` naming ``name`` and the allowed range
    when it is not a number, not finite, or out of range. ``fix``: what to do instead, after the range."""
    allowed = describe_range(lo, hi, kind, lo_open, unit)
    fix = f"; {fix}" if fix else ""
    try:
        number = kind(value.strip()) if isinstance(value, str) else value
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise TypeError
        if kind is int and isinstance(number, float):
            raise TypeError
    except (TypeError, ValueError, OverflowError):
        raise NumberError(f"{name}={value!r} is not {allowed}{fix}") from None
    if not math.isfinite(number):
        raise NumberError(f"{name}={value!r} is not finite; it must be {allowed}{fix}")
    if (lo is not None and (number < lo or (lo_open and number == lo))) or (hi is not None and number > hi):
        raise NumberError(f"{name}={value!r} is out of range; it must be {allowed}{fix}")
    return number


def env_number(name: str, default: Any, kind: type = float, lo: float | None = None, hi: float | None = None,
               lo_open: bool = False, unit: str = "") -> Any:
    """The environment variable ``name`` checked by :func:`bounded` (``default`` when unset or empty); the message
    says to fix or unset it."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    return bounded(name, raw, kind, lo, hi, lo_open, unit, fix=f"set it in that range or unset it (default {default:g})"
                   if isinstance(default, (int, float)) else "set it in that range or unset it")
