"""pyvm-lab validate: a real migration of dirty.elf against the simulation of its trace."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

from pyvm.guests import guest_path
from pyvm.lab.errors import LabError
from pyvm.lab.realvm import RealResult, logged_downtime, migrate, rounds_from_samples
from pyvm.lab.simulate import SimResult
from pyvm.lab.trace import Trace
from pyvm.lab.calibration_policy import HOLD_S, CalibrateHold
from pyvm.lab.validate import (Validation, costs_from, fit_switchover, line_rate_from,
                               replay_starts, report, validate)
from pyvm.migration.policy import RoundState

LOG = """migration: round 1: sent 15528301 bytes (16384 pages) in 757 ms, 164.1 Mbps; dirty 1616 pages; expected downtime 322 ms
migration: round 2: sent 1534921 bytes (374 pages) in 2 ms, 6378.3 Mbps; dirty 451 pages; expected downtime 2 ms
migration: switchover: last dirty pages and device state, 2720662 bytes; downtime 75 ms (75.412 ms)
"""


def test_rounds_from_polls() -> None:
    samples = [(0.0, 0, 0, 1), (0.1, 100, 50, 1), (0.2, 300, 40, 2), (0.3, 400, 8192, 3),
               (0.35, 410, 8192, 3)]
    rounds = rounds_from_samples(samples)
    assert [(r.round, r.bytes_sent, r.unsent_after) for r in rounds] == [(0, 300, 0), (1, 100, 2)]
    assert rounds[1].start == 0.2 and math.isclose(rounds[1].duration, 0.1)


def test_calibration_reads_the_rounds_a_source_logged() -> None:
    unlimited = RealResult("qemu", "completed", total_time=0.2, downtime=0.01,
                           downtime_bytes=1_000_000)
    # the largest round's bytes over its sending time
    assert line_rate_from(unlimited, LOG) == pytest.approx(15528301 / 0.757)
    limited = RealResult("qemu", "completed", total_time=0.8, downtime=0.012,
                         setup_time=0.01, downtime_bytes=2_000_000)
    switchover, per_round, setup = costs_from(limited, LOG, 1e9)
    assert setup == 0.01
    assert switchover == pytest.approx(0.012 - 0.002)
    assert per_round == pytest.approx((0.8 - 0.012 - 0.01 - 0.759) / 2)
    with pytest.raises(LabError, match="calibration migration failed: boom"):
        line_rate_from(RealResult("qemu", "failed", error="boom"), LOG)
    with pytest.raises(LabError, match="no rounds logged"):
        line_rate_from(unlimited, "")


def test_downtime_to_the_microsecond_from_the_source_log() -> None:
    assert logged_downtime(LOG) == pytest.approx(0.075412)
    # an older source's line has whole milliseconds only: query-migrate's figure stays
    assert logged_downtime("migration: switchover: last dirty pages and device state, "
                           "2720662 bytes; downtime 75 ms\n") is None
    assert logged_downtime("") is None


def test_switchover_fit_is_robust_to_one_hiccup() -> None:
    # downtime = 3 ms + bytes at 1 GB/s, and one run 35 ms late
    points = [(1e6, 0.004), (2e6, 0.005), (8e6, 0.011), (9e6, 0.012), (1.5e6, 0.040)]
    fixed, rate = fit_switchover(points)
    assert fixed == pytest.approx(0.003) and rate == pytest.approx(1e9)
    # final copies of about the same size cannot tell the rate from the fixed part
    assert fit_switchover([(1e6, 0.004), (1.1e6, 0.005)]) is None
    # nor can a slope that noise tipped over
    assert fit_switchover([(1e6, 0.009), (8e6, 0.004)]) is None


def test_hold_calibration_sends_nothing_after_round_0_for_a_while() -> None:
    pol = CalibrateHold()
    unsent = np.ones(8, bool)

    def state(k: int, t: float) -> RoundState:
        return RoundState(k, t, 1e6, unsent, unsent, (), 0, 4096)
    first = pol.decide(state(0, 0.0))
    assert first.send is None and not first.stop_and_copy     # round 0: everything
    for k, t in ((1, 0.9), (2, 1.0), (50, 0.9 + HOLD_S - 0.01)):
        held = pol.decide(state(k, t))
        assert held.send is not None and held.send.size == 0 and not held.stop_and_copy
    assert pol.decide(state(51, 0.9 + HOLD_S + 0.001)).stop_and_copy


def test_validation_compares_medians_and_keeps_the_ranges() -> None:
    tr = Trace.from_masks(np.zeros((20, 8), bool), 0.05)
    real = [RealResult("qemu", "completed", total_time=t, downtime=d, bytes_sent=b, rounds=n)
            for t, d, b, n in ((1.0, 0.010, 100, 1), (3.0, 0.020, 300, 2), (2.0, 0.030, 200, 2))]
    sims = [SimResult("qemu", "", "", "completed", total_time=t, downtime=d, bytes_sent=b,
                      rounds=n)
            for t, d, b, n in ((2.2, 0.012, 210, 2), (1.8, 0.024, 190, 1),
                               (2.0, 0.030, 230, 2), (9.0, math.nan, 250, 3))]
    v = Validation(real[0], sims[0], tr, measured_runs=real, predicted_runs=sims)
    err = v.errors()
    # medians: real 2.0 s, 20 ms, 200 B, 2 rounds; simulated 2.1 s, 24 ms (NaN left
    # out), 220 B, 2 rounds
    assert err["total_time"] == pytest.approx(2.1 / 2.0 - 1)
    assert err["downtime"] == pytest.approx(0.024 / 0.020 - 1)
    assert err["bytes_sent"] == pytest.approx(220 / 200 - 1)
    assert err["rounds"] == 0.0
    rows = {r["metric"]: r for r in v.rows()}
    assert rows["total_time"]["measured_range"] == (1.0, 3.0)
    assert rows["total_time"]["predicted_range"] == (1.8, 9.0)
    assert rows["downtime"]["predicted_runs"] == 3
    text = report(v)
    assert "(1.000..3.000)" in text and "medians of 3 real migrations and 4 simulations" in text
    # one run each: the single figures, no ranges
    one = Validation(real[1], sims[0], tr)
    assert one.errors()["total_time"] == pytest.approx(2.2 / 3.0 - 1)
    assert "medians" not in report(one)


def test_replays_start_at_evenly_spread_points() -> None:
    tr = Trace.from_masks(np.zeros((20, 8), bool), 0.05)      # 1 s
    assert replay_starts(tr, 4) == pytest.approx([0.0, 0.25, 0.5, 0.75])
    assert replay_starts(tr, 0) == [0.0]


@pytest.mark.slow
def test_real_migration_reads_the_downtime_to_the_microsecond(tmp_path: Path) -> None:
    """A source logging its migration (-d migration) gives the lab its downtime in µs;
    query-migrate's whole milliseconds agree with it."""
    r = migrate(guest_path("dirty.elf"), "start=1 size=2 pattern=4", "16M", "qemu",
                workdir=str(tmp_path), warmup=0.2, progress=False,
                src_args=["-d", "migration"])
    assert r.status == "completed", r.error
    log = (tmp_path / "src.stderr").read_text()
    whole = re.findall(r"switchover: .*; downtime (\d+) ms \(", log)
    assert len(whole) == 1, log
    assert r.downtime == logged_downtime(log)
    assert int(whole[0]) <= r.downtime * 1e3 < int(whole[0]) + 1.1


@pytest.mark.slow
@pytest.mark.validate
def test_validate_hot_cold_guest() -> None:
    """Bytes and rounds are predicted closely on a quiet guest; the report shows them.
    Kept cheap for make test: 3 calibrations, 1 real run, 3 simulations."""
    v = validate(guest_path("dirty.elf"), "start=2 size=8 pattern=1 rate=100", "32M", "qemu",
                 10_000_000, duration=3.0, warmup=0.3, calibration_runs=3, runs=1,
                 replays=3)
    assert v.measured.status == "completed", v.measured.error
    assert v.predicted.status == "completed"
    assert len(v.measured_runs) == 1 and len(v.predicted_runs) == 3
    errors = v.errors()
    assert abs(errors["bytes_sent"]) < 0.25, report(v)
    assert v.measured.total_time > 0.3 and v.predicted.total_time > 0.3, report(v)
    assert v.measured.rounds >= 1 and v.predicted.rounds >= 1
    assert v.trace.busy is not None and 0 < (v.trace.mean_busy() or 0) < 1
    text = report(v)
    assert "total_time" in text and "downtime" in text and "%" in text


@pytest.mark.slow
@pytest.mark.validate
def test_validate_default_method_on_the_documented_guest() -> None:
    """validate's defaults (7 calibrations, 3 real runs, 5 simulations of each) on the
    documented hot/cold guest: medians of bytes and time within the documented 10%
    (with a margin: this runs on whatever machine), the same rounds."""
    v = validate(guest_path("dirty.elf"), "start=2 size=16 pattern=1 rate=100", "64M", "qemu",
                 20_000_000, duration=5.0)
    assert [r.status for r in v.measured_runs] == ["completed"] * 3, report(v)
    assert len(v.predicted_runs) == 15
    errors = v.errors()
    assert abs(errors["bytes_sent"]) < 0.15, report(v)
    assert abs(errors["total_time"]) < 0.15, report(v)
    assert errors["rounds"] == 0, report(v)
    assert abs(errors["downtime_bytes"]) < 0.15, report(v)
    assert "medians of 3 real migrations and 15 simulations" in report(v)
