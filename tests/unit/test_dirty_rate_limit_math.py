"""The arithmetic of calc-dirty-rate (migration/dirtyrate.c) and of pyvm's dirty-limit
controller, hand-computed."""

from __future__ import annotations

import numpy as np
import pytest

from pyvm.dirty_limit import EASE_STEP, next_percentage, rate_mb_s
from pyvm.dirty_meter import popcount, share_by_run_time
from pyvm.dirty_rate import bitmap_rate, convert_time, sampled_rate


def test_convert_time_truncates() -> None:
    assert convert_time(3, "second", "millisecond") == 3000
    assert convert_time(1999, "millisecond", "second") == 1
    assert convert_time(1999, "millisecond", "millisecond") == 1999


def test_sampled_rate_is_update_dirtyrate() -> None:
    # 64 of 512 samples changed over a 1024 MB block in 2000 ms: 64*1024*1000/(512*2000) = 64
    assert sampled_rate(64, 512, 1024, 2000) == 64
    assert sampled_rate(1, 3, 100, 1000) == 33            # integer division, as in C
    assert sampled_rate(0, 0, 100, 1000) == -1            # nothing sampled: no rate


def test_bitmap_rate_truncates_to_whole_mb_first() -> None:
    # 9000 pages = 35.16 MiB -> 35 MB, over 1000 ms
    assert bitmap_rate(9000, 1000) == 35
    assert bitmap_rate(256, 500) == 2                       # 1 MB in half a second


def test_popcount_and_shares() -> None:
    assert popcount(np.array([0b1011, 1 << 63], dtype=np.uint64)) == 4
    assert share_by_run_time(90, [2, 1, 0]) == [60.0, 30.0, 0.0]
    assert share_by_run_time(90, [0, 0]) == [0.0, 0.0]


def test_rate_mb_s() -> None:
    assert rate_mb_s(256, 1_000_000_000) == 1
    assert rate_mb_s(2560, 2_000_000_000) == 5
    assert rate_mb_s(100, 500_000_000) == pytest.approx(0.78125)     # not rounded down


def test_controller_aims_at_the_quota_and_eases_slowly() -> None:
    # free (0 %) at 40 MB/s, quota 10: 1 - 1.0 * 10/40 = 0.75 -> 75 %
    assert next_percentage(0, 40, 10) == 75
    # at 75 % still 20 MB/s: 1 - 0.25 * 10/20 = 0.875 -> 88 %
    assert next_percentage(75, 20, 10) == 88
    # barely over: always at least one point more
    assert next_percentage(50, 11, 10) == 55
    assert next_percentage(98, 50, 1) == 99
    # under the quota: eased by at most EASE_STEP points a period
    assert next_percentage(80, 2, 10) == 80 - EASE_STEP
    assert next_percentage(80, 9, 10) == 78                 # 1 - 0.2*10/9 = 0.778
    assert next_percentage(5, 0, 10) == 0


def test_a_vcpu_held_just_under_its_quota_is_not_eased() -> None:
    # at 99 % a vCPU dirtying 0.8 MB/s against a quota of 1 stays where it is; rounded
    # down to 0 it would be eased 10 points and run 11 times faster the next period
    assert next_percentage(99, 0.8, 1) == 99
    assert next_percentage(99, 0.0, 1) == 99 - EASE_STEP
