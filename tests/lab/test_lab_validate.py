"""pyvm-lab validate: a real migration of dirty.elf against the simulation of its trace."""

from __future__ import annotations

import math

import pytest

from pyvm.guests import guest_path
from pyvm.lab.realvm import rounds_from_samples
from pyvm.lab.validate import report, validate


def test_rounds_from_polls() -> None:
    samples = [(0.0, 0, 0, 1), (0.1, 100, 50, 1), (0.2, 300, 40, 2), (0.3, 400, 8192, 3),
               (0.35, 410, 8192, 3)]
    rounds = rounds_from_samples(samples)
    assert [(r.round, r.bytes_sent, r.unsent_after) for r in rounds] == [(0, 300, 0), (1, 100, 2)]
    assert rounds[1].start == 0.2 and math.isclose(rounds[1].duration, 0.1)


@pytest.mark.slow
@pytest.mark.validate
def test_validate_hot_cold_guest() -> None:
    """Bytes and rounds are predicted closely on a quiet guest; the report shows them."""
    v = validate(guest_path("dirty.elf"), "start=2 size=8 pattern=1 rate=100", "32M", "qemu",
                 10_000_000, duration=3.0, warmup=0.3)
    assert v.measured.status == "completed", v.measured.error
    assert v.predicted.status == "completed"
    errors = v.errors()
    assert abs(errors["bytes_sent"]) < 0.25, report(v)
    assert v.measured.total_time > 0.3 and v.predicted.total_time > 0.3, report(v)
    assert v.measured.rounds >= 1 and v.predicted.rounds >= 1
    text = report(v)
    assert "total_time" in text and "downtime" in text and "%" in text
