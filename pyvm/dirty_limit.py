"""The dirty-page-rate limit: ``set-vcpu-dirty-limit`` and friends (QEMU system/dirtylimit.c).

A vCPU with a quota (MB/s) that dirties memory faster is slowed down until it is under.
QEMU measures each vCPU's rate with KVM's dirty ring and makes a vCPU sleep a little each
time its ring fills (``dirtylimit_set_throttle``), so QEMU offers the limit only on KVM
with ``dirty-ring-size``.  pyvm has its own dirty log for every guest
(:mod:`pyvm.dirty_meter`), so it offers the limit everywhere and slows a vCPU with the
vCPU throttle (:mod:`pyvm.cpu_throttle`) instead of per-ring-full sleeps:

* every period (``x-vcpu-dirty-limit-period`` during a migration with ``dirty-limit``,
  one second otherwise: QEMU's ``DIRTYLIMIT_CALC_TIME_MS``) the controller thread reads
  the pages each vCPU dirtied and its rate in MB/s (MiB, as QEMU counts);
* a vCPU over its quota gets the throttle that would bring it to the quota if its
  rate is proportional to its run time: ``1 - (1 - p) * quota / rate``; a vCPU under its
  quota has its throttle eased by at most 10 points per period (so a bursty guest does
  not swing between free and stopped);
* a throttled vCPU that did not run at all in a period (at 99% it runs one 10 ms time
  slice a second, longer than a 500 ms period) taught the controller nothing: its
  throttle stays.

The controller owns its thread: the last ``cancel-vcpu-dirty-limit`` (or the VM closing,
:func:`shutdown`) stops and joins it, and takes every throttle off.
"""

from __future__ import annotations

import math
import threading
import time
from typing import TYPE_CHECKING, Any

from pyvm.cpu_throttle import PCT_MAX
from pyvm.dirty_meter import PAGE_SIZE, DirtyMeter, share_by_run_time
from pyvm.errors import PyvmError
from pyvm.per_machine import PerMachine

if TYPE_CHECKING:
    from pyvm.machine import Machine

#: QEMU's DIRTYLIMIT_CALC_TIME_MS: the measuring period outside a migration
DEFAULT_PERIOD_MS = 1000
#: throttle points a vCPU under its quota gets back per period
EASE_STEP = 10


class DirtyLimitError(PyvmError):
    """A dirty-limit command refused, with QEMU's text."""


def rate_mb_s(pages: float, period_ns: int) -> float:
    """The dirty rate in MB/s (MiB per second), unrounded: the controller works on
    this; ``query-vcpu-dirty-limit`` reports it in whole MB/s, as QEMU does."""
    if period_ns <= 0:
        return 0.0
    return pages * PAGE_SIZE / (1 << 20) * 1e9 / period_ns


def next_percentage(current: int, rate: float, quota: int) -> int:
    """The throttle of a vCPU that dirtied ``rate`` MB/s at ``current`` percent.

    ``rate`` is not rounded down: a vCPU held at 99% that still dirties 0.8 MB/s against
    a quota of 1 is where it should be, not idle (rounded to 0 it would be eased, run
    ten times faster the next period and swing between the two)."""
    if rate > quota:
        ideal = 1.0 - (1.0 - current / 100) * quota / rate
        return min(PCT_MAX, max(current + 1, math.ceil(ideal * 100)))
    if rate <= 0:
        return max(0, current - EASE_STEP)
    ideal = 1.0 - (1.0 - current / 100) * quota / rate
    return max(0, max(current - EASE_STEP, math.ceil(ideal * 100)))


class DirtyLimitController:
    """One VM's dirty-page-rate limits."""

    def __init__(self, machine: "Machine") -> None:
        self.machine = machine
        n = len(machine.cpus)
        self.quota = [0] * n           # MB/s; 0: no limit
        self.current = [0] * n         # MB/s measured in the last period
        self.period_ms = DEFAULT_PERIOD_MS
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._meter: DirtyMeter | None = None

    @property
    def in_service(self) -> bool:
        return any(self.quota)

    @property
    def all_quota(self) -> int | None:
        """The quota when every vCPU has the same one (as the migration sets it)."""
        q = set(self.quota)
        return q.pop() if len(q) == 1 else None

    def check_index(self, index: int | None) -> list[int]:
        """The vCPUs ``index`` names (None: all); QEMU's text for a bad one."""
        if index is None:
            return list(range(len(self.quota)))
        if not 0 <= index < len(self.quota):
            raise DirtyLimitError("incorrect cpu index specified")
        return [index]

    # -- commands ------------------------------------------------------------------------
    def set_limit(self, index: int | None, quota: int, period_ms: int | None = None) -> None:
        """``set-vcpu-dirty-limit``: ``index`` None means every vCPU; quota 0 cancels."""
        targets = self.check_index(index)
        if not quota:
            self.cancel_limit(index)
            return
        with self._lock:
            for i in targets:
                self.quota[i] = quota
            if period_ms is not None:
                self.period_ms = period_ms
            if self._thread is None:
                self._stop.clear()
                self._meter = DirtyMeter(self.machine)
                self._meter.start()
                self._thread = threading.Thread(target=self._run, name="dirty-limit",
                                                daemon=True)
                self._thread.start()

    def cancel_limit(self, index: int | None) -> None:
        """``cancel-vcpu-dirty-limit``."""
        targets = self.check_index(index)
        with self._lock:
            for i in targets:
                self.quota[i] = 0
                self.current[i] = 0
                self.machine.set_vcpu_throttle(i, 0)
            idle = not self.in_service
            if idle:
                self.period_ms = DEFAULT_PERIOD_MS
        if idle:
            self._halt()

    def query(self) -> list[dict[str, Any]]:
        """``query-vcpu-dirty-limit``: the vCPUs that have a limit."""
        with self._lock:
            return [{"cpu-index": i, "limit-rate": q, "current-rate": self.current[i]}
                    for i, q in enumerate(self.quota) if q]

    def throttle_percentages(self) -> list[int]:
        return [self.machine.throttle.vcpu_percentage(i) for i in range(len(self.quota))]

    def shutdown(self) -> None:
        with self._lock:
            self.quota = [0] * len(self.quota)
        self._halt()

    # -- the controller thread -------------------------------------------------------------
    def _halt(self) -> None:
        """Stop and join the thread, take the throttles and the meter off (lock not held:
        the thread takes it once per period)."""
        with self._lock:
            thread, self._thread = self._thread, None
            meter, self._meter = self._meter, None
            self._stop.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(10)
        for i in range(len(self.quota)):
            self.machine.set_vcpu_throttle(i, 0)
        if meter is not None:
            try:
                meter.stop()
            except Exception:  # noqa: BLE001 - the VM may be closing; nothing left to undo
                pass

    def _run(self) -> None:
        meter = self._meter
        assert meter is not None
        last = time.monotonic_ns()
        while not self._stop.wait(self.period_ms / 1000):
            try:
                pages, run = meter.read()
            except Exception:  # noqa: BLE001 - the loop is gone (VM closing): stop measuring
                return
            now = time.monotonic_ns()
            period_ns, last = now - last, now
            shares = share_by_run_time(pages, run)
            with self._lock:
                if self._stop.is_set():
                    return
                for i, quota in enumerate(self.quota):
                    rate = rate_mb_s(shares[i], period_ns)
                    self.current[i] = int(rate)
                    if not quota:
                        continue
                    pct = self.machine.throttle.vcpu_percentage(i)
                    if pct and run[i] <= 0:
                        continue                # asleep the whole period: nothing learned
                    self.machine.set_vcpu_throttle(i, next_percentage(pct, rate, quota))


_PER_MACHINE: "PerMachine[Machine, DirtyLimitController]" = PerMachine(DirtyLimitController)


def controller_of(machine: "Machine") -> DirtyLimitController:
    """The machine's dirty-limit controller, created on first use."""
    return _PER_MACHINE.of(machine)


def shutdown(machine: "Machine") -> None:
    """Stop the machine's controller thread, if it ever had one."""
    _PER_MACHINE.shutdown(machine)
