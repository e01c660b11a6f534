"""One range check for every number PyFed takes in: protocol fields, configuration values and
strategy parameters. Imports nothing from PyFed, so every layer may use it.

>>> Range(0, 1, high_open=True).check(0.5)
0.5
>>> Range(1, integer=True).check(0)
Traceback (most recent call last):
ValueError: must be a positive integer, got 0
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Range:
    """An interval of numbers (of integers with ``integer``); open at either end on request."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def __str__(self) -> str:
        left = "(" if self.low_open or self.low == -math.inf else "["
        right = ")" if self.high_open or self.high == math.inf else "]"
        return f"{left}{_show(self.low)}, {_show(self.high)}{right}"

    def describe(self) -> str:
        """'a positive integer', 'a non-negative number', 'a number in (0, 1]'."""
        kind = "integer" if self.integer else "number"
        if self.high == math.inf and self.low == 0:
            return f"a {'positive' if self.low_open else 'non-negative'} {kind}"
        if self.high == math.inf and self.integer and self.low == 1 and not self.low_open:
            return "a positive integer"
        return f"{'an integer' if self.integer else 'a number'} in {self}"

    def contains(self, value: float) -> bool:
        if math.isnan(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below and (self.integer or math.isfinite(value))

    def check(self, value: Any, name: str = "") -> Any:
        """``value`` itself if it is a number (an int with ``integer``) in the range; else ValueError,
        naming ``name`` if given."""
        subject = f"{name} " if name else ""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (self.integer and not isinstance(value, int)):
            raise ValueError(f"{subject}must be {self.describe()}, got {type(value).__name__} {str(value)[:40]}")
        if not self.contains(value):
            raise ValueError(f"{subject}must be {self.describe()}, got {value}")
        return value

    def parse(self, text: str) -> int | float:
        """The number ``text`` spells, in the range (for configuration values); ValueError otherwise."""
        try:
            value: int | float = int(text.strip()) if self.integer else float(text.strip())
        except ValueError:
            raise ValueError(f"must be {self.describe()}, got {text!r}") from None
        if not self.contains(value):
            raise ValueError(f"must be {self.describe()}, got {text!r}")
        return value


def _show(bound: float) -> str:
    """A bound as people write it: 9007199254740992 for 2**53, 0.9, 1e+06, inf."""
    if isinstance(bound, int):
        return str(bound)
    return f"{bound:g}"
