"""QEMU's auto-converge rule (migration/ram.c), hand-computed cases."""

from __future__ import annotations

from pyvm.migration.control.auto_converge import (Action, ConvergeTracker, ThrottleParams,
                                                  next_throttle)

MiB = 1 << 20
PAGE = 4096
P = ThrottleParams()          # QEMU's defaults: threshold 50, initial 20, increment 10, max 99


def test_defaults_are_qemus() -> None:
    assert ThrottleParams.from_parameters({
        "throttle-trigger-threshold": 50, "cpu-throttle-initial": 20,
        "cpu-throttle-increment": 10, "cpu-throttle-tailslow": False,
        "max-cpu-throttle": 99}) == P


def test_next_throttle_starts_at_initial_then_steps_to_the_cap() -> None:
    assert next_throttle(0, 10, 5, P) == 20
    assert next_throttle(20, 10, 5, P) == 30
    assert next_throttle(95, 10, 5, P) == 99
    capped = ThrottleParams(maximum=45)
    assert next_throttle(40, 10, 5, capped) == 45


def test_tailslow_steps_no_more_than_the_ideal() -> None:
    slow = ThrottleParams(tailslow=True)
    # cpu_now = 100 - 60 = 40; ideal = trunc(40 * 45/50) = 36; inc = min(4, 10) = 4
    assert next_throttle(60, 50 * MiB, 45 * MiB, slow) == 64
    # far over the threshold: the increment caps the step
    # cpu_now = 70; ideal = trunc(70 * 1/10) = 7; inc = min(63, 10) = 10
    assert next_throttle(30, 10 * MiB, 1 * MiB, slow) == 40


def _sync(t: ConvergeTracker, ms: int, pages: int, xfer: int, throttle: int = 0,
          auto: bool = True, limit: bool = False) -> tuple[Action, int]:
    d = t.after_sync(ms, pages, xfer, PAGE, P, auto, limit, throttle)
    return d.action, d.percentage


def test_two_high_periods_trigger_and_reset_the_count() -> None:
    t = ConvergeTracker(now_ms=0, transferred=0)
    # period 1 (1.5 s): 8 MiB sent, 2048 pages (8 MiB) dirtied > 4 MiB threshold: count 1
    assert _sync(t, 1500, 2048, 8 * MiB) == (Action.NONE, 0)
    assert t.dirty_rate_high_cnt == 1
    # period 2: again high -> throttle starts at 20 %, count back to 0
    assert _sync(t, 3000, 2048, 16 * MiB) == (Action.THROTTLE, 20)
    assert t.dirty_rate_high_cnt == 0
    # period 3 low (256 pages = 1 MiB <= 4 MiB): the count does not move
    assert _sync(t, 4500, 256, 24 * MiB, throttle=20) == (Action.NONE, 0)
    assert t.dirty_rate_high_cnt == 0
    # periods 4 and 5 high -> 30 %
    assert _sync(t, 6000, 2048, 32 * MiB, throttle=20) == (Action.NONE, 0)
    assert _sync(t, 7500, 2048, 40 * MiB, throttle=20) == (Action.THROTTLE, 30)


def test_syncs_within_a_second_accumulate_into_one_period() -> None:
    t = ConvergeTracker(now_ms=0, transferred=0)
    assert _sync(t, 400, 1000, 2 * MiB) == (Action.NONE, 0)
    assert _sync(t, 900, 1000, 3 * MiB) == (Action.NONE, 0)      # still the same period
    assert t.num_dirty_pages_period == 2000
    # 1.2 s: 3000 pages (11.7 MiB) against 4 MiB x 50 % -> high (count 1); counters reset
    assert _sync(t, 1200, 1000, 4 * MiB) == (Action.NONE, 0)
    assert t.dirty_rate_high_cnt == 1 and t.num_dirty_pages_period == 0
    assert t.bytes_xfer_prev == 4 * MiB


def test_exactly_at_the_threshold_is_not_high() -> None:
    t = ConvergeTracker(now_ms=0, transferred=0)
    # 1024 pages = 4 MiB dirtied; 8 MiB sent x 50 % = 4 MiB: not above
    _sync(t, 1100, 1024, 8 * MiB)
    assert t.dirty_rate_high_cnt == 0


def test_dirty_limit_instead_of_the_throttle() -> None:
    t = ConvergeTracker(now_ms=0, transferred=0)
    _sync(t, 1500, 4096, 8 * MiB, auto=False, limit=True)
    assert _sync(t, 3000, 4096, 16 * MiB, auto=False, limit=True) == (Action.DIRTY_LIMIT, 0)
