"""Precopy slowing the guest down: auto-converge and dirty-limit applied to the VM.

:mod:`pyvm.migration.control.auto_converge` decides; this module acts on the machine
(the vCPU throttle, :meth:`pyvm.machine.Machine.set_cpu_throttle`, or the per-vCPU
dirty-page-rate limit of :mod:`pyvm.dirty_limit`) and undoes it when the migration
ends, completed, failed or cancelled (QEMU: ``cpu_throttle_stop`` in
``migrate_fd_cleanup``; the dirty limit is cancelled in ``migration_cleanup``'s
``ram_save_cleanup``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from pyvm import dirty_limit
from pyvm.migration.control.auto_converge import Action, ConvergeTracker, ThrottleParams

if TYPE_CHECKING:
    from pyvm.machine import Machine
    from pyvm.migration.control.manager import MigrationManager

PAGE = 4096


def _now_ms() -> int:
    return int(time.monotonic() * 1000)


class GuestSlowdown:
    """One migration's auto-converge or dirty-limit state."""

    def __init__(self, mgr: "MigrationManager", machine: "Machine", transferred: int) -> None:
        self.mgr = mgr
        self.machine = machine
        self.tracker = ConvergeTracker(_now_ms(), transferred)
        self.auto_converge = bool(mgr.caps["auto-converge"])
        self.dirty_limit = bool(mgr.caps["dirty-limit"])
        #: the highest throttle this migration applied (percent)
        self.peak_throttle = 0
        self._limited = False

    def after_sync(self, new_dirty_pages: int, transferred: int) -> None:
        """A dirty-bitmap sync of the iteration found ``new_dirty_pages`` new pages."""
        d = self.tracker.after_sync(_now_ms(), new_dirty_pages, transferred, PAGE,
                                    ThrottleParams.from_parameters(self.mgr.params.query()),
                                    self.auto_converge, self.dirty_limit,
                                    self.machine.cpu_throttle)
        log = self.machine.log
        if d.action is Action.THROTTLE:
            self.machine.set_cpu_throttle(d.percentage)
            self.peak_throttle = max(self.peak_throttle, self.machine.cpu_throttle)
            log.log("migration", f"migration: auto-converge: vCPU throttle "
                                 f"{self.machine.cpu_throttle}%")
        elif d.action is Action.DIRTY_LIMIT:
            quota = int(self.mgr.params["vcpu-dirty-limit"])
            period = int(self.mgr.params["x-vcpu-dirty-limit-period"])
            ctl = dirty_limit.controller_of(self.machine)
            if not (ctl.in_service and ctl.all_quota == quota):
                ctl.set_limit(None, quota, period_ms=period)
                self._limited = True
                log.log("migration", f"migration: dirty-limit: every vCPU limited to "
                                     f"{quota} MB/s")

    def stop(self) -> None:
        """The migration ended: take the throttle and the dirty limit off the guest."""
        if self.auto_converge:
            self.machine.set_cpu_throttle(0)
        if self._limited:
            dirty_limit.controller_of(self.machine).cancel_limit(None)
            self._limited = False


def start(mgr: "MigrationManager", machine: "Machine", transferred: int) -> GuestSlowdown | None:
    """The slowdown state of a migration that begins iterating (None: neither capability)."""
    if not (mgr.caps["auto-converge"] or mgr.caps["dirty-limit"]):
        return None
    return GuestSlowdown(mgr, machine, transferred)
