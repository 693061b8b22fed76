import errno

import pytest

from vlkit.utils.errors import DataError, UserError, environment_failure, find_user_error


def test_the_user_facing_errors_are_one_family_and_still_value_errors():
    from vlkit.config import ConfigError
    from vlkit.data.tar import TarFormatError
    from vlkit.eval.results import EvalUsageError
    from vlkit.interop.checkpoint_files import CheckpointError
    from vlkit.interop.cli import UsageError
    from vlkit.interop.native import ModelFormatError

    for cls in (ConfigError, ModelFormatError, CheckpointError, EvalUsageError, TarFormatError, DataError):
        assert issubclass(cls, UserError) and issubclass(cls, ValueError), cls
    assert issubclass(UsageError, UserError)


def test_a_user_error_is_found_through_raise_from_but_not_through_a_later_bug():
    cause = DataError("x.csv: no data rows")
    wrapped = RuntimeError("worker failed")
    wrapped.__cause__ = cause
    assert find_user_error(wrapped) is cause
    bug = KeyError("oops")
    bug.__context__ = cause  # a bug raised while handling the user's mistake stays a bug
    assert find_user_error(bug) is None


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (OSError(errno.ENOSPC, "No space left on device", "/c/model.safetensors"), "disk is full"),
        (MemoryError(), "host memory ran out"),
        (ValueError("bad value"), None),
        (OSError(errno.ENOENT, "No such file"), None),
    ],
)
def test_environment_failures_are_told_apart(exc, expected):
    what = environment_failure(exc)
    assert (what is None) if expected is None else (expected in what)
