"""Parameter checks: one wording, the offending value echoed, the name carried."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from tl._checks import ParameterError, check_choice, check_interval


def message_of(check, *args, **kwargs) -> str:
    with pytest.raises(ParameterError) as error:
        check(*args, **kwargs)
    return str(error.value)


def test_a_choice_lists_what_is_allowed_and_echoes_the_value():
    assert check_choice("resize", "pad", ("squash", "pad")) == "pad"
    assert message_of(check_choice, "resize", "crop", ("squash", "pad")) == (
        "The 'resize' parameter must be one of 'squash', 'pad'. Got 'crop' instead."
    )
    assert check_choice("class_weight", None, (None, "balanced")) is None


@pytest.mark.parametrize(
    "bounds, value, requirement",
    [
        ({"low": 0, "closed": "neither"}, 0.0, "> 0"),
        ({"low": 0}, -1, ">= 0"),
        ({"high": 1, "closed": "left"}, 1, "< 1"),
        ({"high": 1}, 2, "<= 1"),
        ({"low": 0, "high": 1, "closed": "left"}, 1.0, "in [0, 1)"),
        ({"low": 0, "high": 1, "closed": "right"}, 0, "in (0, 1]"),
        ({"low": 0, "high": 1, "closed": "neither"}, float("nan"), "in (0, 1)"),
        ({"low": 1, "integer": True}, 0, "an integer >= 1"),
        ({"low": 1, "integer": True}, 2.5, "an integer >= 1"),
        ({"integer": True}, True, "an integer"),
        ({}, "0.5", "a number"),
    ],
)
def test_an_interval_says_what_is_allowed(bounds, value, requirement):
    assert message_of(check_interval, "x", value, **bounds) == (
        f"The 'x' parameter must be {requirement}. Got {value!r} instead."
    )


def test_allowed_values_pass_unchanged():
    assert check_interval("lr", 1e-4, low=0, closed="neither") == 1e-4
    assert check_interval("folds", np.int64(5), low=2, integer=True) == 5
    assert check_interval("dropout", 0, low=0, high=1, closed="left") == 0


def test_advice_follows_and_the_error_survives_pickling():
    with pytest.raises(ParameterError) as raised:
        check_interval(
            "unfreeze",
            1.5,
            low=0,
            high=1,
            closed="right",
            advice="To train the head only, pass --epochs 0.",
        )
    error = raised.value
    assert str(error) == (
        "The 'unfreeze' parameter must be in (0, 1]. Got 1.5 instead. To train the "
        "head only, pass --epochs 0."
    )
    assert error.message("The --unfreeze option").startswith("The --unfreeze option")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.parameter, str(copy)) == ("unfreeze", str(error))
