"""Error-message help shared by every config validator: the closest valid name."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(word: object, options: Iterable[str]) -> str:
    """" (did you mean 'x'?)" for the closest option, or "" when nothing is close."""
    close = difflib.get_close_matches(str(word), list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
