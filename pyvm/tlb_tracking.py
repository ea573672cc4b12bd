"""Dirty tracking through the vCPUs' TLB fill: the preferred method while dirty logging is on.

Three ways exist to learn which guest pages were written between two syncs; the machine
(:meth:`pyvm.machine.Machine.start_dirty_log`) takes the first that works here:

1. **TLB** (this module, native part ``pyvm/_tlbtrack.pyx``): the vCPUs' TLB entries for
   clean pages carry no write permission, so the first store to a page after a sync
   refills its entry through pyvm's fill, which marks the page; the sync flushes the
   TLBs.  Cost per page per round: a TLB refill, well under a microsecond.
2. **host-wp** (:func:`pyvm.fastpath.track_host_writes`): userfaultfd write-protect over
   the RAM's host mapping; every writer of the RAM is seen; cost per page per round: a
   host page fault on top of the refill (1.4 to 1.6 microseconds on the development
   machine, bench/first_write.py).
3. **write-hook**: a ``UC_HOOK_MEM_WRITE`` per vCPU; every guest store pays.

With the TLB method, writers other than the vCPUs' stores mark the bitmap themselves
(``RamBlock.write`` for devices; the native interrupt delivery; the page walk's
accessed and dirty bits are marked by the tracking fill).  ``PYVM_DIRTY_TRACKING=host-wp``
or ``=hook`` skips it; it needs the compiled extension and Unicorn's layout as
:mod:`pyvm.unicorn_tlb` finds it.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Protocol, Sequence

from unicorn import unicorn_const as UC

from pyvm.native_modules import load_native
from pyvm.unicorn_internals import CalibrationError, calibrate
from pyvm.unicorn_tlb import tlb_layout

_native: Any = load_native("pyvm._tlbtrack")


class TrackedBlock(Protocol):
    """What the tracker needs of a RAM block (:class:`pyvm.ram.RamBlock` has it)."""

    @property
    def gpa(self) -> int: ...

    @property
    def size(self) -> int: ...

    @property
    def host_address(self) -> int: ...

    @property
    def dirty(self) -> Any: ...


class TlbTracking:
    """The TLB write trackers of every vCPU engine of one machine, over its RAM blocks.

    Made, attached, re-armed and detached on the vCPU loop only (the engines must be
    stopped): :meth:`rearm` checks it.
    """

    def __init__(self, engines: Sequence[Any], blocks: Sequence[TrackedBlock]) -> None:
        layout = tlb_layout()
        ctx = calibrate()
        env = {name: ctx[name].offset - layout.context_header
               for name in ("cr0", "cr3", "cr4", "efer")}
        regions = tuple((b.gpa, b.size, b.host_address, int(b.dirty.words.ctypes.data))
                        for b in blocks)
        self._engines = list(engines)
        self._blocks = list(blocks)
        self._trackers = []
        for uc in self._engines:
            cpu = layout.cpu_of(uc)
            layout.check(uc, cpu)
            self._trackers.append(_native.TlbWriteTracker(
                cpu, layout.fill_slot(cpu), layout.fill_cpu, layout.env_off,
                layout.tlbf_off, layout.entry_bits, env["cr0"], env["cr3"], env["cr4"],
                env["efer"], regions, (uc, [b.dirty for b in blocks])))
        self._thread = threading.get_ident()
        self.attached = False

    def attach(self) -> None:
        """Wrap every engine's fill, flush its TLB, and re-arm at every bitmap fetch."""
        self.attached = True            # detach() undoes a partial attach too
        for t in self._trackers:
            t.attach()
        for b in self._blocks:
            b.dirty.rearm = self.rearm
        self.rearm()

    def rearm(self) -> None:
        """Drop every TLB entry of every engine (after the bitmaps were taken)."""
        if threading.get_ident() != self._thread:
            raise RuntimeError("the TLB write tracker was re-armed off the vCPU loop")
        for uc in self._engines:
            uc.ctl(UC.UC_CTL_TLB_FLUSH, UC.UC_CTL_IO_WRITE)

    def detach(self) -> None:
        """Give every engine its own fill back; flush their TLBs afterwards (entries made
        read-only by the tracker would only cost a refill each, but it is tidier)."""
        if not self.attached:
            return
        for b in self._blocks:
            b.dirty.rearm = None
        for t in self._trackers:
            t.detach()
        self.attached = False

    @property
    def stats(self) -> dict[str, int]:
        """Summed over the engines (see ``TlbWriteTracker.stats``)."""
        out: dict[str, int] = {}
        for t in self._trackers:
            for k, v in t.stats.items():
                out[k] = out.get(k, 0) + int(v)
        return out


def track_tlb_writes(engines: Sequence[Any], blocks: Sequence[TrackedBlock]) -> TlbTracking | None:
    """An attached :class:`TlbTracking`, or None where this method is not available
    (no compiled extension, ``PYVM_DIRTY_TRACKING`` asks for another, a Unicorn whose
    layout the probe does not recognise)."""
    if _native is None or os.environ.get("PYVM_DIRTY_TRACKING", "") in ("host-wp", "hook"):
        return None
    try:
        tracking = TlbTracking(engines, blocks)
    except CalibrationError:
        return None
    try:
        tracking.attach()
    except OverflowError:           # more engines tracked at once than the C side holds
        tracking.detach()
        return None
    return tracking
