import argparse

import pytest

from vlkit.utils.argtypes import int_in_range, non_negative_int, positive_int, probability


def test_values_in_range_pass_and_others_name_the_problem():
    assert positive_int("3") == 3 and non_negative_int("0") == 0 and probability("0.25") == 0.25
    assert int_in_range("100", 1, 100) == 100
    for parse, text, message in (
        (positive_int, "0", "must be >= 1, got 0"),
        (positive_int, "x", "expected an integer, got 'x'"),
        (non_negative_int, "-1", "must be >= 0, got -1"),
        (lambda t: int_in_range(t, 16, 1024), "8", "must be between 16 and 1024, got 8"),
        (probability, "1.5", "must be a number in [0, 1], got 1.5"),
    ):
        with pytest.raises(argparse.ArgumentTypeError, match=message.replace("[", r"\[").replace("]", r"\]")):
            parse(text)
