"""Counting the pages a guest dirties, with pyvm's dirty log, beside a migration.

The dirty-page rate (``calc-dirty-rate`` in ``dirty-bitmap`` mode, :mod:`pyvm.dirty_rate`)
and the dirty-page-rate limit (:mod:`pyvm.dirty_limit`) need to know how many pages the
guest wrote in a period.  QEMU keeps a separate dirty-log client for them
(``GLOBAL_DIRTY_DIRTY_RATE``, ``GLOBAL_DIRTY_LIMIT`` in ``include/exec/memory.h``) so
that measuring never takes a page away from a migration; pyvm does the same: the meter
is a client of :meth:`pyvm.machine.Machine.start_dirty_log`, and while a migration also
uses the log, every page the meter reads is put back into the bitmap for the
migration's next sync.

Host write-protect (userfaultfd, the usual tracker) reports every page written since
the meter's last read, whether the migration has sent it or not.  With the write-hook
fallback, a page still marked for the migration cannot be seen being written again, so
during a migration the meter undercounts pages the guest rewrites before the
migration's next sync.

Per vCPU: pyvm's vCPUs run in turn on one host thread and the log is per page, not per
vCPU, so a vCPU's share of the pages dirtied in a period is its share of the run time
in that period (exact with one vCPU).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pyvm.machine import Machine

PAGE_SIZE = 4096
CLIENT = "dirty-rate"
#: seconds a read waits for the vCPU loop (it answers between two time slices)
READ_TIMEOUT = 5.0


def popcount(words: np.ndarray) -> int:
    return int(np.unpackbits(words.view(np.uint8)).sum())


class DirtyMeter:
    """Reads of "pages dirtied since the last read" for one machine.

    :meth:`start` and :meth:`stop` bracket its use; :meth:`read` runs on the vCPU loop
    (between time slices) and may be called from any thread.
    """

    def __init__(self, machine: "Machine") -> None:
        self.machine = machine
        self.blocks = list(machine.ram)
        self._prev_words: dict[str, np.ndarray] = {}
        self._prev_run = list(machine.cpu_run_ns)
        self.started = False

    def start(self) -> None:
        self.machine.start_dirty_log(self.blocks, client=CLIENT)
        self.started = True
        self.read()          # a freshly attached log marks every page: not a guest write

    def stop(self) -> None:
        if self.started:
            self.started = False
            if self.machine.exit_code is None:      # an ended VM's log goes with it
                self.machine.stop_dirty_log(client=CLIENT)

    def read(self) -> tuple[int, list[int]]:
        """(pages dirtied since the last read, nanoseconds each vCPU ran since then)."""
        m = self.machine

        def take() -> tuple[int, list[int]]:
            migrating = "migration" in m.dirty_log_clients()
            total = 0
            for block in self.blocks:
                bitmap = block.dirty
                tracker = bitmap.host_tracker
                if not migrating:
                    self._prev_words.pop(block.name, None)
                    total += popcount(bitmap.fetch_and_clear())
                elif tracker is not None:
                    seen = np.zeros_like(bitmap.words)
                    tracker.collect_into(seen)
                    total += popcount(seen)
                    np.bitwise_or(bitmap.words, seen, out=bitmap.words)
                else:
                    words = bitmap.fetch_and_clear()
                    prev = self._prev_words.get(block.name)
                    # the first read beside a migration cannot tell its marks from writes
                    total += popcount(words & ~prev) if prev is not None else 0
                    np.bitwise_or(bitmap.words, words, out=bitmap.words)
                    self._prev_words[block.name] = words
            return total, list(m.cpu_run_ns)

        if m.exit_code is not None:
            raise RuntimeError("the VM has ended")
        pages, run = m.run_on_loop(take, timeout=READ_TIMEOUT)
        delta = [now - before for now, before in zip(run, self._prev_run)]
        self._prev_run = run
        return pages, delta


def share_by_run_time(pages: int, run_ns: list[int]) -> list[float]:
    """Pages dirtied per vCPU, each vCPU's share being its share of the run time."""
    total = sum(run_ns)
    if total <= 0:
        return [0.0] * len(run_ns)
    return [pages * r / total for r in run_ns]
