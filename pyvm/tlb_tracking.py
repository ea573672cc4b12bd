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

import numpy as np
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


class _Collector:
    """One block's pages written by the vCPUs since the last sync, as the block's
    ``DirtyBitmap.host_tracker``: ``fetch_and_clear`` (and the dirty-rate meter) call
    :meth:`collect_into`, the contract of host write-protect's tracker."""

    def __init__(self, tracking: "TlbTracking", words: np.ndarray) -> None:
        self._tracking = tracking
        self.words = words              # the C fill marks these; the bitmap's own are
        self.attached = True            # for RamBlock.write and the native delivery

    def collect_into(self, out: np.ndarray) -> int:
        """OR the pages written since the last call into ``out``, clear them, and drop
        every engine's TLB entries so that the next store to each page is seen again."""
        self._tracking.check_thread()
        if not self.attached:
            return 0
        found = int(np.count_nonzero(np.unpackbits(self.words.view(np.uint8))))
        np.bitwise_or(out, self.words, out=out)
        self.words[:] = 0
        self._tracking.flush()
        return found


class TlbTracking:
    """The TLB write trackers of every vCPU engine of one machine, over its RAM blocks.

    The C fill marks a bitmap of its own per block; a sync folds it into the block's
    dirty bitmap and flushes the TLBs (:class:`_Collector`), so the dirty-rate meter can
    count the vCPUs' writes apart from the migration's bitmap, as with host
    write-protect.  Made, attached and synced on the vCPU loop only (the engines must be
    stopped there): a sync from another thread raises.
    """

    def __init__(self, engines: Sequence[Any], blocks: Sequence[TrackedBlock]) -> None:
        layout = tlb_layout()
        ctx = calibrate()
        env = {name: ctx[name].offset - layout.context_header
               for name in ("cr0", "cr3", "cr4", "efer")}
        self._engines = list(engines)
        self._blocks = list(blocks)
        self._collectors = [_Collector(self, np.zeros_like(b.dirty.words)) for b in blocks]
        regions = tuple((b.gpa, b.size, b.host_address, int(c.words.ctypes.data))
                        for b, c in zip(self._blocks, self._collectors))
        self._trackers = []
        for uc in self._engines:
            cpu = layout.cpu_of(uc)
            layout.check(uc, cpu)
            self._trackers.append(_native.TlbWriteTracker(
                cpu, layout.fill_slot(cpu), layout.fill_cpu, layout.env_off,
                layout.tlbf_off, layout.entry_bits, env["cr0"], env["cr3"], env["cr4"],
                env["efer"], regions, (uc, self._collectors)))
        self._thread = threading.get_ident()
        self.attached = False

    def attach(self) -> None:
        """Wrap every engine's fill and flush its TLB."""
        for b in self._blocks:
            if b.dirty.host_tracker is not None:
                raise ValueError("the bitmap already has a host write tracker")
        self.attached = True            # detach() undoes a partial attach too
        for t in self._trackers:
            t.attach()
        for b, c in zip(self._blocks, self._collectors):
            b.dirty.host_tracker = c
        self.flush()

    def check_thread(self) -> None:
        if threading.get_ident() != self._thread:
            raise RuntimeError("the TLB write tracker was synced off the vCPU loop")

    def flush(self) -> None:
        """Drop every TLB entry of every engine (after the bitmaps were taken)."""
        self.check_thread()
        for uc in self._engines:
            uc.ctl(UC.UC_CTL_TLB_FLUSH, UC.UC_CTL_IO_WRITE)

    def detach(self) -> None:
        """Give every engine its own fill back; the pages written since the last sync
        stay marked in the bitmaps.  Flush the TLBs afterwards, on the loop (entries
        the tracker made read-only would only cost a refill each)."""
        if not self.attached:
            return
        for t in self._trackers:
            t.detach()
        for b, c in zip(self._blocks, self._collectors):
            if b.dirty.host_tracker is c:
                b.dirty.host_tracker = None
            np.bitwise_or(b.dirty.words, c.words, out=b.dirty.words)
            c.words[:] = 0
            c.attached = False
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
