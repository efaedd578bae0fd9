"""Small reusable field checks for configs: each returns a message naming the key, or None.

Configs report every problem at once, so a check never raises; it describes what is wrong
and what a valid value looks like.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

Check = Callable[[str, Any], "str | None"]


def is_real(value: Any) -> bool:
    """A real number that is not a bool (YAML's ``true`` must not pass as 1)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def in_interval(interval: str, example: float) -> Check:
    """A real number in ``interval``, written like "[0, 1)" or "(0, inf)"."""
    low, high = (float(bound) for bound in interval[1:-1].split(","))

    def check(key: str, value: Any) -> str | None:
        inside = is_real(value) and (
            (low < value if interval[0] == "(" else low <= value)
            and (value < high if interval[-1] == ")" else value <= high))
        if not inside:
            return f"'{key}' must be a number in {interval}, got {value!r}; e.g. {example}"
        return None

    return check


def integer_at_least(low: int, high: int | None = None) -> Check:
    """An integer >= ``low`` (and <= ``high`` when given)."""
    def check(key: str, value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int) or value < low \
                or (high is not None and value > high):
            wanted = f">= {low}" if high is None else f"from {low} to {high}"
            return f"'{key}' must be an integer {wanted}, got {value!r}"
        return None

    return check


# Random seeds: JAX keys take 32 bits (a larger seed would alias a smaller one, or overflow).
check_seed = integer_at_least(0, 2**32 - 1)


def check_finite(key: str, value: Any) -> str | None:
    if not is_real(value) or not math.isfinite(value):
        return f"'{key}' must be a finite number, got {value!r}"
    return None


def one_of(choices: Sequence[Any]) -> Check:
    def check(key: str, value: Any) -> str | None:
        if value not in choices:
            return f"'{key}' must be one of {list(choices)}, got {value!r}"
        return None

    return check


def optional(inner: Check) -> Check:
    """``inner``, or null."""
    def check(key: str, value: Any) -> str | None:
        problem = None if value is None else inner(key, value)
        return problem and f"{problem} (or null)"

    return check


def check_bool(key: str, value: Any) -> str | None:
    if not isinstance(value, bool):
        return f"'{key}' must be true or false, got {value!r}"
    return None


def check_real(key: str, value: Any) -> str | None:
    if not is_real(value):
        return f"'{key}' must be a number, got {value!r}"
    return None


def field_problems(obj: Any, checks: dict[str, Check]) -> list[str]:
    """The problems of ``obj``'s attributes under ``checks`` (attribute name -> check)."""
    problems = (check(name, getattr(obj, name)) for name, check in checks.items())
    return [problem for problem in problems if problem]
