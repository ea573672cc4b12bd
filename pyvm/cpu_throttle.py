"""vCPU throttling: take a share of the guest's CPU time away, as QEMU's auto-converge does.

QEMU (``softmmu/cpu-throttle.c``, cpu_throttle_thread) lets a throttled vCPU run a
10 ms timeslice, then sleeps it for ``pct / (1 - pct)`` times that long, so the vCPU
runs ``1 - pct`` of the wall time.  pyvm's run loop does the same around its own time
slices: after a slice that ran ``t`` seconds, the loop owes a pause of
``t * pct / (100 - pct)`` seconds before it runs any vCPU again.  The pause is spent
waiting on the loop's condition, so requests from other threads (a dirty-bitmap sync,
a monitor command) are still served while the guest sleeps.

The migration engine sets the percentage per round (:meth:`Machine.set_cpu_throttle`)
and back to 0 when the migration ends, as QEMU's ``cpu_throttle_stop`` does.
"""

from __future__ import annotations

import time

#: QEMU's ``max-cpu-throttle`` upper bound (``migration/options.c``).
MAX_THROTTLE_PCT = 99


class CpuThrottle:
    """The throttle of one machine's run loop; set from any thread, read by the loop."""

    def __init__(self) -> None:
        self.pct = 0
        self._resume_at = 0.0

    def set(self, pct: int) -> None:
        """Take ``pct`` percent (0..99) of vCPU time away; 0 stops throttling."""
        if isinstance(pct, bool) or not isinstance(pct, int) \
                or not 0 <= pct <= MAX_THROTTLE_PCT:
            raise ValueError(f"cpu throttle {pct!r}: expected an integer from 0 to "
                             f"{MAX_THROTTLE_PCT}")
        self.pct = pct
        if pct == 0:
            self._resume_at = 0.0

    def charge(self, ran_s: float) -> None:
        """A vCPU slice ran ``ran_s`` seconds: owe the matching pause (run loop only)."""
        pct = self.pct
        if pct:
            self._resume_at = time.monotonic() + ran_s * pct / (100 - pct)

    def pause_left(self) -> float:
        """Seconds the loop must still keep every vCPU off the CPU (0 when none)."""
        if not self.pct or not self._resume_at:
            return 0.0
        return max(0.0, self._resume_at - time.monotonic())
