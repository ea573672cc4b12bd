"""Postcopy blocktime: how long vCPUs waited for pages on the destination (sans-IO).

QEMU's ``postcopy-blocktime`` capability (qapi/migration.json, since 3.0) and its
accounting in migration/postcopy-ram.c (``PostcopyBlocktimeContext``,
``mark_postcopy_blocktime_begin`` / ``mark_postcopy_blocktime_end``):

- **begin**: the fault thread reads a fault raised by a vCPU; the vCPU's fault time and
  address are recorded and, if it was not waiting already, the count of vCPUs down goes
  up.  ``last_begin`` is the time of the latest fault.  If the page turns out to be
  already there (placed between the fault and this look), the vCPU is not waiting after
  all and the record is undone.
- **end**: a page is placed (``UFFDIO_COPY``/``UFFDIO_ZEROPAGE``, which wakes the
  waiters); every vCPU waiting on that address gets ``now - its fault time`` added to its
  own blocktime and is no longer down.  If at that moment *every* vCPU thread was down,
  ``now - last_begin`` is added to the total: the total is the time during which the
  whole guest stood still, not the sum over vCPUs.

Times are milliseconds; QEMU keeps them as ``uint32`` and reports ``postcopy-blocktime``
and ``postcopy-vcpu-blocktime`` as ``uint32`` (``get_postcopy_total_blocktime``,
``get_vcpu_blocktime_list``).

pyvm runs every vCPU on one loop thread, so a vCPU blocked on a page holds all of them:
``threads`` (the number of vCPU threads, 1 in pyvm) is the "all vCPUs down" threshold,
exactly as QEMU's ``smp_cpus_down == smp_cpus`` is with one thread per vCPU.  The vCPU a
fault is charged to is the one that was inside the emulator on that thread.
"""

from __future__ import annotations

_UINT32 = 0xFFFFFFFF


class BlocktimeContext:
    """The blocktime counters of one incoming postcopy migration.

    Not thread safe: the caller serialises :meth:`begin` and :meth:`end` (pyvm's
    destination calls both under the lock that guards its received-page bitmap).
    """

    def __init__(self, vcpus: int, threads: int | None = None) -> None:
        if vcpus <= 0:
            raise ValueError("a machine has at least one vCPU")
        self.vcpus = vcpus
        self.threads = vcpus if threads is None else threads
        self._fault_time: list[float | None] = [None] * vcpus
        self._fault_addr: list[int | None] = [None] * vcpus
        self._vcpu_ms = [0.0] * vcpus
        self._total_ms = 0.0
        self._last_begin = 0.0
        self._down = 0

    def begin(self, cpu: int, address: int, now_ms: float, already_received: bool) -> None:
        """A fault of vCPU ``cpu`` on the page at ``address`` was read at ``now_ms``."""
        if not 0 <= cpu < self.vcpus:
            return                      # QEMU: a thread that is no vCPU is not counted
        if self._fault_addr[cpu] is None:
            self._down += 1
        self._last_begin = now_ms
        self._fault_time[cpu] = now_ms
        self._fault_addr[cpu] = address
        if already_received:
            self._fault_addr[cpu] = None
            self._fault_time[cpu] = None
            self._down -= 1

    def end(self, address: int, now_ms: float) -> None:
        """The page at ``address`` was placed at ``now_ms``; its waiters wake."""
        affected = 0
        everyone_down = False
        for cpu in range(self.vcpus):
            started = self._fault_time[cpu]
            if self._fault_addr[cpu] != address or started is None:
                continue
            self._fault_addr[cpu] = None
            self._fault_time[cpu] = None
            affected += 1
            if not everyone_down and self._down >= self.threads:
                everyone_down = True
            self._vcpu_ms[cpu] += now_ms - started
        self._down -= affected
        if everyone_down:
            self._total_ms += now_ms - self._last_begin

    @property
    def total_ms(self) -> int:
        """``postcopy-blocktime``: ms during which every vCPU thread waited for a page."""
        return int(self._total_ms) & _UINT32

    @property
    def vcpu_ms(self) -> list[int]:
        """``postcopy-vcpu-blocktime``: ms each vCPU waited for pages, by vCPU index."""
        return [int(ms) & _UINT32 for ms in self._vcpu_ms]


def format_uint32_list(values: list[int]) -> str:
    """A ``uint32List`` as QEMU's string output visitor prints it with ``human`` off
    (qapi/string-output-visitor.c, used by migration/migration-hmp-cmds.c for
    ``postcopy vcpu blocktime``): the values go into a sorted range list where
    overlapping and adjacent ranges merge (util/range.c ``range_list_insert``), so the
    output is the set of distinct values, ascending, with runs written ``a-b``."""
    parts: list[str] = []
    ordered = sorted(set(values))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)
