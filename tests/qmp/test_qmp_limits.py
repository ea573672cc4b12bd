"""The human monitor's bounds (pyvm/qmp/limits.py), without a VM."""

from __future__ import annotations

import pytest

from pyvm.qmp.errors import HmpError
from pyvm.qmp.hmp_expr import get_expr
from pyvm.qmp.limits import (MAX_COMMAND_LINE, MAX_EXPR_DEPTH, check_dump,
                             command_line_too_long)


def _no_regs(name: str) -> None:
    return None


def test_dump_bounds() -> None:
    check_dump("xp", 4096, "x", 1)
    check_dump("x", 128, "i", -1)
    with pytest.raises(HmpError, match=r"^xp: at most 4096 values per command \(asked for 4000000\)$"):
        check_dump("xp", 4000000, "x", 1)
    with pytest.raises(HmpError, match="x: at most 128 instructions"):
        check_dump("x", 129, "i", -1)


@pytest.mark.parametrize("depth", [MAX_EXPR_DEPTH + 1, 300, 100000])
def test_deep_expressions_are_refused_without_recursion_errors(depth: int) -> None:
    for text in ("(" * depth + "1" + ")" * depth, "-" * depth + "1", "~(" * depth + "1" + ")" * depth):
        with pytest.raises(HmpError, match="expression nested too deeply"):
            get_expr(text, 0, _no_regs)


def test_expressions_within_the_bound_still_work() -> None:
    d = MAX_EXPR_DEPTH - 1
    assert get_expr("(" * d + "5" + ")" * d, 0, _no_regs)[0] == 5
    assert get_expr("1+" * 20000 + "1", 0, _no_regs)[0] == 20001


def test_command_line_bound() -> None:
    assert command_line_too_long("p 1") is None
    assert command_line_too_long("x" * (MAX_COMMAND_LINE + 1)) == \
        f"command line too long (limit {MAX_COMMAND_LINE} bytes)\n"
