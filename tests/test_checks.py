"""The shared config field checks."""

import pytest

from fluxflow_jax.checks import (check_bool, field_problems, in_interval, integer_at_least,
                                 one_of, optional)


@pytest.mark.parametrize("check, good, bad", [
    (in_interval("[0, 1)", 0.5), [0, 0.5, 0.999], [1, -0.1, True, "0.5", None]),
    (in_interval("(0, inf)", 1.0), [1e-9, 5], [0, -1, float("nan")]),
    (integer_at_least(1), [1, 7], [0, 1.0, True, "2"]),
    (one_of(("sum", "mean")), ["sum", "mean"], ["avg", None]),
    (check_bool, [True, False], [1, 0, "true"]),
    (optional(in_interval("(0, 1]", 0.9)), [None, 1, 0.5], [0, 2]),
])
def test_checks_accept_good_and_name_bad_values(check, good, bad):
    assert all(check("key", value) is None for value in good)
    for value in bad:
        message = check("key", value)
        assert message and message.startswith("'key'") and repr(value) in message


def test_field_problems_collects_every_problem():
    class Options:
        a, b, c = 0.5, -1, "x"
    checks = {"a": in_interval("[0, 1]", 0.5), "b": integer_at_least(0), "c": check_bool}
    assert [p.split()[0] for p in field_problems(Options(), checks)] == ["'b'", "'c'"]
