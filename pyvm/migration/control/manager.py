"""Migration state of one VM: capabilities, parameters, blockers, the current migration.

The commands (:mod:`pyvm.migration.control.service`) call into this object; the source
thread (:mod:`pyvm.migration.control.precopy`) and the destination
(:mod:`pyvm.migration.control.incoming`) report status changes through
:meth:`MigrationManager.set_status`, which emits ``MIGRATION`` events when the ``events``
capability is on, as QEMU does.

The manager owns the migration threads: :meth:`MigrationManager.shutdown` stops the
current outgoing migration (it ends ``cancelled``) and the incoming one, and joins their
threads.  It knows them only through :class:`OutgoingJob` and :class:`IncomingJob`, so it
sits below the modules that implement them.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np

from pyvm.errors import PyvmError
from pyvm.migration.control.blockers import BlockerRegistry
from pyvm.migration.control.capabilities import MigrationCapabilities
from pyvm.migration.control.parameters import MigrationParameters
from pyvm.migration.control.status import (MigrationStats, MigrationStatus, SourceSnapshot,
                                   XbzrleCacheStats, build_migration_info)
from pyvm.migration.control.xbzrle_channel import XbzrleCounters
from pyvm.runstate import RunState

if TYPE_CHECKING:
    from pyvm.machine import Machine
    from pyvm.ram import RamBlock

#: capabilities this build implements (others are refused by name)
IMPLEMENTED_CAPABILITIES = {"events", "pause-before-switchover", "x-ignore-shared", "rdma-pin-all",
                            "zero-blocks", "validate-uuid", "return-path", "x-checksum",
                            "auto-converge", "dirty-limit", "postcopy-ram", "multifd",
                            "zero-copy-send", "xbzrle", "mapped-ram",
                            "postcopy-blocktime", "postcopy-preempt"}

ACTIVE_STATES = {MigrationStatus.SETUP, MigrationStatus.ACTIVE, MigrationStatus.CANCELLING,
                 MigrationStatus.PRE_SWITCHOVER, MigrationStatus.DEVICE,
                 MigrationStatus.POSTCOPY_ACTIVE, MigrationStatus.POSTCOPY_PAUSED,
                 MigrationStatus.POSTCOPY_RECOVER}


#: seconds :meth:`MigrationManager.shutdown` waits for each thread
JOIN_TIMEOUT = 10.0


class MigrationCommandError(PyvmError):
    """A migration command refused, with QEMU's text."""


class OutgoingJob(Protocol):
    """The source side of one migration (:class:`pyvm.migration.control.precopy.Precopy`)."""

    continue_event: threading.Event

    def cancel(self) -> None:
        """Any thread: make the migration thread stop; it reports ``cancelled``."""

    def pending_pages(self) -> list[tuple["RamBlock", np.ndarray]]:
        """Pages found dirty at the last sync, still being sent this round (a snapshot)."""


class IncomingJob(Protocol):
    """One incoming migration (:class:`pyvm.migration.control.incoming.IncomingMigration`)."""

    status: MigrationStatus | None

    def query(self) -> dict[str, Any]:
        """``query-migrate`` on the destination."""

    def stop(self) -> None:
        """Any thread: stop waiting or loading (the VM is going away)."""

    def join(self, timeout: float | None = None) -> None:
        """Wait for the load thread to end."""


class MigrationManager:
    def __init__(self, machine: "Machine") -> None:
        self.machine = machine
        self.caps = MigrationCapabilities(implemented=IMPLEMENTED_CAPABILITIES)
        self.params = MigrationParameters()
        self.blockers = BlockerRegistry()
        self.lock = threading.RLock()
        self.status = MigrationStatus.NONE
        self.stats = MigrationStats()
        #: the xbzrle counters of the current (or last) outgoing migration
        self.xbzrle: XbzrleCounters | None = None
        self.error_desc: str | None = None
        self.precopy: OutgoingJob | None = None
        self.incoming: IncomingJob | None = None
        #: the thread of the current (or last) outgoing migration; joined by shutdown()
        self.thread: threading.Thread | None = None
        self.start_time = 0.0
        self.setup_time_ms = 0
        self.total_time_ms = 0
        self.downtime_ms = 0
        self.expected_downtime_ms = 0
        self.runstate_at_start = RunState.RUNNING
        self.uri_error = False
        self.socket_address: list[dict[str, Any]] | None = None
        self.on_status: list[Callable[[MigrationStatus], None]] = []
        #: None: no -incoming; True: -incoming defer, waiting for migrate-incoming
        self.deferred_incoming: bool | None = None
        self.address: Any = None

    # -- threads -----------------------------------------------------------------------------------
    def start_outgoing(self, job: OutgoingJob, body: Callable[[], None]) -> None:
        """Run ``body`` (the job's thread body) on the migration thread."""
        previous = self.thread
        if previous is not None:
            # The last migration ended (commands refuse while one is active); its thread
            # may still be returning from its final status change (which takes the lock).
            previous.join(JOIN_TIMEOUT)
        with self.lock:
            self.precopy = job
            self.thread = threading.Thread(target=body, name="migration", daemon=True)
            self.thread.start()

    def shutdown(self, timeout: float = JOIN_TIMEOUT) -> None:
        """Stop every migration thread of this VM and join it (the VM is closing)."""
        with self.lock:
            job, thread, incoming = self.precopy, self.thread, self.incoming
        if job is not None and thread is not None and thread.is_alive():
            job.cancel()
        if incoming is not None:
            incoming.stop()
        if thread is not None:
            thread.join(timeout)
        if incoming is not None:
            incoming.join(timeout)

    # -- status and events ----------------------------------------------------------------------
    def set_status(self, status: MigrationStatus) -> None:
        with self.lock:
            self.status = status
        if self.caps["events"]:
            self.machine.events.emit("MIGRATION", {"status": status.value})
        for fn in list(self.on_status):
            fn(status)

    def emit_pass(self, n: int) -> None:
        if self.caps["events"]:
            self.machine.events.emit("MIGRATION_PASS", {"pass": n})

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATES

    # -- what the stream carries ----------------------------------------------------------------
    def stream_capabilities(self) -> list[str]:
        """Enabled capabilities that are validated by the destination (configuration section)."""
        return self.caps.validated()

    def block_ignored(self, block: "RamBlock") -> bool:
        """x-ignore-shared: a shared, file-backed block is not sent (QEMU: migrate_ram_is_ignored)."""
        return self.caps["x-ignore-shared"] and block.backend.named_file

    # -- query-migrate ------------------------------------------------------------------------------
    def query(self) -> dict[str, Any]:
        with self.lock:
            if self.incoming is not None:
                return self.incoming.query()
            snap = SourceSnapshot(status=self.status, ram=self.stats, setup_time=self.setup_time_ms,
                                  total_time=self._total_time(), downtime=self.downtime_ms,
                                  expected_downtime=self.expected_downtime_ms,
                                  error_desc=self.error_desc,
                                  cpu_throttle_percentage=self.machine.cpu_throttle or None,
                                  xbzrle_cache=self._xbzrle_stats())
            return build_migration_info(snap, None, self.blockers.reasons())

    def _xbzrle_stats(self) -> XbzrleCacheStats | None:
        """``xbzrle-cache`` while the capability is on (migration.c populate_ram_info)."""
        if not self.caps["xbzrle"]:
            return None
        stats = self.xbzrle.snapshot() if self.xbzrle is not None else XbzrleCacheStats()
        stats.cache_size = self.params["xbzrle-cache-size"]
        return stats

    def _total_time(self) -> int:
        if self.status in (MigrationStatus.COMPLETED,):
            return self.total_time_ms
        if self.start_time:
            return int((time.monotonic() - self.start_time) * 1000)
        return 0
