"""When precopy throttles the guest: QEMU's auto-converge rule, sans-IO.

QEMU (``migration/ram.c``) looks at every dirty-bitmap sync that ends a period of more
than a second (``migration_bitmap_sync``).  For that period it compares

* ``bytes_dirty_period``: pages newly found dirty at the syncs of the period, x page size;
* ``bytes_dirty_threshold``: bytes put on the wire in the period x
  ``throttle-trigger-threshold`` / 100 (``migration_trigger_throttle``).

When the guest dirtied more than the threshold in two such periods (not necessarily
consecutive: the count is only reset when it fires), the guest is slowed down: with
``auto-converge``, ``mig_throttle_guest_down`` starts the vCPU throttle at
``cpu-throttle-initial`` or raises it by ``cpu-throttle-increment`` (with
``cpu-throttle-tailslow``, by no more than what would bring the dirty rate to the
threshold), capped at ``max-cpu-throttle``; with ``dirty-limit`` instead,
``migration_dirty_limit_guest`` puts every vCPU under the ``vcpu-dirty-limit`` quota.

:class:`ConvergeTracker` is fed the facts of each sync and answers what to do; it reads
no clock and touches no VM.  :mod:`pyvm.migration.control.precopy` calls it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Mapping

from pyvm.cpu_throttle import clamp

#: a period must last longer than this before it is judged (ms, migration_bitmap_sync)
PERIOD_MS = 1000


@dataclass(frozen=True)
class ThrottleParams:
    """The migration parameters the rule reads."""

    trigger_threshold: int = 50     # throttle-trigger-threshold, percent
    initial: int = 20               # cpu-throttle-initial
    increment: int = 10             # cpu-throttle-increment
    tailslow: bool = False          # cpu-throttle-tailslow
    maximum: int = 99               # max-cpu-throttle

    @classmethod
    def from_parameters(cls, p: Mapping[str, Any]) -> "ThrottleParams":
        return cls(int(p["throttle-trigger-threshold"]), int(p["cpu-throttle-initial"]),
                   int(p["cpu-throttle-increment"]), bool(p["cpu-throttle-tailslow"]),
                   int(p["max-cpu-throttle"]))


class Action(str, Enum):
    NONE = "none"
    THROTTLE = "throttle"           # auto-converge: set the vCPU throttle to ``percentage``
    DIRTY_LIMIT = "dirty-limit"     # dirty-limit: put every vCPU under vcpu-dirty-limit


@dataclass(frozen=True)
class Decision:
    action: Action = Action.NONE
    percentage: int = 0


def next_throttle(current: int, bytes_dirty_period: int, bytes_dirty_threshold: int,
                  p: ThrottleParams) -> int:
    """``mig_throttle_guest_down``: the throttle after ``current`` (0: not throttling).

    The tail-slow step uses QEMU's unsigned integer arithmetic: the ideal CPU share is
    truncated before the difference is taken.
    """
    if current <= 0:
        return clamp(p.initial)
    if not p.tailslow:
        inc = p.increment
    else:
        cpu_now = 100 - current
        cpu_ideal = int(cpu_now * (bytes_dirty_threshold * 1.0 / bytes_dirty_period))
        inc = min(cpu_now - cpu_ideal, p.increment)
    return clamp(min(current + inc, p.maximum))


class ConvergeTracker:
    """One migration's period counters (QEMU's ``RAMState`` fields of the same names)."""

    def __init__(self, now_ms: int, transferred: int) -> None:
        self.time_last_bitmap_sync = now_ms
        self.bytes_xfer_prev = transferred
        self.num_dirty_pages_period = 0
        self.dirty_rate_high_cnt = 0

    def after_sync(self, now_ms: int, new_dirty_pages: int, transferred: int,
                   page_size: int, params: ThrottleParams, auto_converge: bool,
                   dirty_limit: bool, current_throttle: int) -> Decision:
        """A sync found ``new_dirty_pages`` pages newly dirty; ``transferred`` bytes went on
        the wire since the migration began.  Returns what to do to the guest."""
        self.num_dirty_pages_period += new_dirty_pages
        if now_ms <= self.time_last_bitmap_sync + PERIOD_MS:
            return Decision()
        decision = self._trigger(transferred, page_size, params, auto_converge, dirty_limit,
                                 current_throttle)
        self.time_last_bitmap_sync = now_ms
        self.num_dirty_pages_period = 0
        self.bytes_xfer_prev = transferred
        return decision

    def _trigger(self, transferred: int, page_size: int, params: ThrottleParams,
                 auto_converge: bool, dirty_limit: bool, current: int) -> Decision:
        bytes_xfer_period = transferred - self.bytes_xfer_prev
        bytes_dirty_period = self.num_dirty_pages_period * page_size
        bytes_dirty_threshold = bytes_xfer_period * params.trigger_threshold // 100
        if bytes_dirty_period > bytes_dirty_threshold:
            self.dirty_rate_high_cnt += 1
            if self.dirty_rate_high_cnt >= 2:
                self.dirty_rate_high_cnt = 0
                if auto_converge:
                    return Decision(Action.THROTTLE, next_throttle(
                        current, bytes_dirty_period, bytes_dirty_threshold, params))
                if dirty_limit:
                    return Decision(Action.DIRTY_LIMIT)
        return Decision()
