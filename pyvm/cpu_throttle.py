"""vCPU throttling: each vCPU sleeps a share of its run time.

QEMU's rule (``system/cpu-throttle.c``, ``cpu_throttle_thread``): with a throttle of
``pct`` percent, a vCPU sleeps ``pct / (1 - pct)`` times a 10 ms time slice for every
time slice it runs, so it runs ``1 - pct`` of the wall-clock time.  QEMU's timer fires
every ``10 ms / (1 - pct)`` and queues that sleep on every vCPU thread; pyvm's vCPUs
share one host thread (see :mod:`pyvm.machine`), so the run loop charges each vCPU for
the time it ran and keeps a vCPU that owes sleep off the CPU until its wake time.  The
loop meanwhile runs the other vCPUs, device timers and monitor work, or waits in its
idle wait: a throttled vCPU never blocks the monitor.

Two sources set a throttle: a VM-wide percentage (auto-converge, ``cpu_throttle_set``
in QEMU) and a percentage per vCPU (the dirty-page-rate limit,
:mod:`pyvm.dirty_limit`).  A vCPU obeys the larger of the two.

This module is pure bookkeeping: it reads no clock and sleeps on nothing; the run
loop passes the times in.
"""

from __future__ import annotations

#: ``CPU_THROTTLE_TIMESLICE_NS`` (system/cpu-throttle.c)
TIMESLICE_NS = 10_000_000
#: ``CPU_THROTTLE_PCT_MIN`` / ``CPU_THROTTLE_PCT_MAX``
PCT_MIN = 1
PCT_MAX = 99


def sleep_per_timeslice_ns(pct: int) -> int:
    """Nanoseconds a vCPU sleeps per 10 ms time slice it ran, at ``pct`` percent.

    QEMU: ``throttle_ratio * CPU_THROTTLE_TIMESLICE_NS + 1`` with
    ``throttle_ratio = pct / (1 - pct)`` (the 1 ns corrects a double's rounding).
    """
    if pct <= 0:
        return 0
    p = min(pct, PCT_MAX) / 100
    return int(p / (1 - p) * TIMESLICE_NS + 1)


def clamp(pct: int) -> int:
    """``cpu_throttle_set``'s range: 0 stays 0 (off), others become 1..99."""
    if pct <= 0:
        return 0
    return max(PCT_MIN, min(PCT_MAX, pct))


class CpuThrottle:
    """The throttle state of ``ncpus`` vCPUs (one run loop's)."""

    def __init__(self, ncpus: int) -> None:
        self._global = 0
        self._vcpu = [0] * ncpus
        self._ran_ns = [0] * ncpus
        self._wake_ns = [0] * ncpus
        #: total nanoseconds each vCPU was made to sleep
        self.slept_ns = [0] * ncpus

    # -- settings (any thread; plain int stores) --------------------------------------------
    @property
    def percentage(self) -> int:
        """The VM-wide throttle (0: off)."""
        return self._global

    def set_percentage(self, pct: int) -> None:
        self._global = clamp(pct)
        if not self._global:
            self._release()

    def vcpu_percentage(self, index: int) -> int:
        return self._vcpu[index]

    def set_vcpu_percentage(self, index: int, pct: int) -> None:
        self._vcpu[index] = clamp(pct)
        if not self.effective(index):
            self._ran_ns[index] = 0
            self._wake_ns[index] = 0

    def effective(self, index: int) -> int:
        """The percentage vCPU ``index`` obeys now."""
        return max(self._global, self._vcpu[index])

    @property
    def active(self) -> bool:
        return bool(self._global) or any(self._vcpu)

    def _release(self) -> None:
        for i in range(len(self._vcpu)):
            if not self._vcpu[i]:
                self._ran_ns[i] = 0
                self._wake_ns[i] = 0

    # -- the run loop ------------------------------------------------------------------------
    def charge(self, index: int, ran_ns: int, now_ns: int) -> None:
        """vCPU ``index`` ran ``ran_ns``: for each whole time slice run, it owes the sleep
        its percentage gives, starting at ``now_ns``."""
        pct = self.effective(index)
        if not pct:
            self._ran_ns[index] = 0
            return
        ran = self._ran_ns[index] + max(0, ran_ns)
        slices, self._ran_ns[index] = divmod(ran, TIMESLICE_NS)
        if slices:
            sleep = slices * sleep_per_timeslice_ns(pct)
            self._wake_ns[index] = now_ns + sleep
            self.slept_ns[index] += sleep

    def wake_ns(self, index: int) -> int:
        """When vCPU ``index`` may run again (0 or a past time: now)."""
        return self._wake_ns[index] if self.effective(index) else 0
