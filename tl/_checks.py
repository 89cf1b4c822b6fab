"""Checks of parameter values, worded like scikit-learn's parameter validation.

    The 'learning_rate' parameter must be > 0. Got 0.0 instead.
    The 'resize' parameter must be one of 'squash', 'center-crop', 'pad'. Got 'crop'
    instead.

A failed check raises `ParameterError`, which carries the parameter's name: the
scripts (`tl.cli.run_cli`) name the command-line option instead ("The --lr option
must be > 0. Got 0.0 instead."), so settings fields and flags may be spelt apart.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any

from tl.errors import TLError

_BRACKETS = {"both": "[]", "left": "[)", "right": "(]", "neither": "()"}


class ParameterError(TLError):
    """A parameter whose value is not allowed.

    Attributes:
        parameter: its name (a settings field, and the `dest` of its option).
        requirement: what is allowed, e.g. `> 0` or `one of 'avg', 'max'`.
        value: what was given.
        advice: an optional sentence on what to do instead.
    """

    def __init__(self, parameter: str, requirement: str, value: Any, advice: str = ""):
        self.parameter = parameter
        self.requirement = requirement
        self.value = value
        self.advice = advice
        super().__init__(self.message(f"The {parameter!r} parameter"))

    def message(self, subject: str) -> str:
        """The error with `subject` (`The --lr option`) as what must be so."""
        text = f"{subject} must be {self.requirement}. Got {self.value!r} instead."
        return f"{text} {self.advice}" if self.advice else text

    def __reduce__(self):  # picklable for process pools, despite its signature
        return type(self), (self.parameter, self.requirement, self.value, self.advice)


def check_choice(name: str, value: Any, choices: Iterable, advice: str = "") -> Any:
    """`value` if it is one of `choices`, else a `ParameterError` listing them."""
    choices = list(choices)
    if value not in choices:
        allowed = ", ".join(map(repr, choices))
        raise ParameterError(name, f"one of {allowed}", value, advice)
    return value


def check_interval(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    closed: str = "both",
    integer: bool = False,
    advice: str = "",
) -> Any:
    """`value` if it is a number (an integer with `integer`) between `low` and
    `high`, else a `ParameterError` saying what is allowed.

    Args:
        closed: which bounds are allowed themselves: `both`, `left`, `right` or
            `neither`.
    """
    opening, closing = _BRACKETS[closed]
    kind = numbers.Integral if integer else numbers.Real
    allowed = isinstance(value, kind) and not isinstance(value, bool)
    if allowed and low is not None:
        allowed = value >= low if opening == "[" else value > low
    if allowed and high is not None:
        allowed = value <= high if closing == "]" else value < high
    if allowed:
        return value
    if low is not None and high is not None:
        bounds = f"in {opening}{low}, {high}{closing}"
    elif low is not None:
        bounds = f"{'>=' if opening == '[' else '>'} {low}"
    elif high is not None:
        bounds = f"{'<=' if closing == ']' else '<'} {high}"
    else:
        bounds = ""
    noun = "an integer" if integer else "a number" if not bounds else ""
    requirement = " ".join(part for part in (noun, bounds) if part)
    raise ParameterError(name, requirement, value, advice)
