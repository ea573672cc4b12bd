"""Measuring how fast the guest dirties memory: ``calc-dirty-rate`` (QEMU migration/dirtyrate.c).

A measurement runs on its own thread for ``calc-time`` (50 ms to 60 s) and ends in
status ``measured`` with ``dirty-rate`` in MB/s (MiB per second, truncated as QEMU does):

``page-sampling`` (the default)
    ``sample-pages`` pages per GiB of each RAM block of at least 128 KiB are picked at
    random and hashed; after ``calc-time`` they are hashed again.  The share of sampled
    pages that changed, times the RAM size, over the time, is the rate
    (``update_dirtyrate``).  QEMU hashes with xxHash since 8.1 and with CRC-32 before;
    pyvm uses CRC-32 (zlib): any hash that sees a change does.  Pages rewritten with
    the same bytes and pages written more than once count once, so the figure is the
    rate of *distinct* pages changed over the period.
``dirty-bitmap``
    pyvm's dirty log (:mod:`pyvm.dirty_meter`) counts the pages written during the
    period.  It is a separate client of the log, so it can run beside a migration.
``dirty-ring``
    needs KVM's per-vCPU dirty ring; pyvm refuses it with QEMU's text, as QEMU does
    on TCG.

The calculator owns its thread: :func:`shutdown` (the VM closing) stops and joins it.
"""

from __future__ import annotations

import threading
import time
import zlib
from typing import TYPE_CHECKING, Any

import numpy as np

from pyvm.dirty_meter import PAGE_SIZE, DirtyMeter
from pyvm.errors import PyvmError
from pyvm.per_machine import PerMachine

if TYPE_CHECKING:
    from pyvm.machine import Machine

# migration/dirtyrate.h
DEFAULT_SAMPLE_PAGES = 512          # DIRTYRATE_DEFAULT_SAMPLE_PAGES, per GiB
MIN_RAMBLOCK_SIZE = 128 << 10       # MIN_RAMBLOCK_SIZE << 10 (bytes, as QEMU compares)
MIN_CALC_TIME_MS = 50
MAX_CALC_TIME_MS = 60000
MIN_SAMPLE_PAGE_COUNT = 128
MAX_SAMPLE_PAGE_COUNT = 16384

MODES = ("page-sampling", "dirty-ring", "dirty-bitmap")     # DirtyRateMeasureMode
STATUSES = ("unstarted", "measuring", "measured")           # DirtyRateStatus
TIME_UNITS = ("second", "millisecond")                      # TimeUnit


class DirtyRateError(PyvmError):
    """calc-dirty-rate refused, with QEMU's text."""


def convert_time(value: int, unit_from: str, unit_to: str) -> int:
    """``convert_time_unit``: seconds <-> milliseconds, truncating toward zero."""
    if unit_from == unit_to:
        return value
    if unit_from == "second":
        return value * 1000
    return int(value / 1000)


def sampled_rate(dirty_samples: int, sample_count: int, block_mb: int, msec: int) -> int:
    """``update_dirtyrate``: MB/s from the sampled pages that changed."""
    if sample_count <= 0 or msec <= 0:
        return -1
    return dirty_samples * block_mb * 1000 // (sample_count * msec)


def bitmap_rate(pages: int, msec: int) -> int:
    """``do_calculate_dirtyrate``: whole MB dirtied, per second."""
    if msec <= 0:
        return -1
    return ((pages * PAGE_SIZE) >> 20) * 1000 // msec


class DirtyRateCalc:
    """One VM's dirty-rate measurement (the last one's result stays until the next)."""

    def __init__(self, machine: "Machine") -> None:
        self.machine = machine
        self.status = "unstarted"
        self.mode = "page-sampling"
        self.start_time = 0              # seconds since the epoch (QEMU_CLOCK_HOST)
        self.calc_time_ms = 0
        self.sample_pages = 0
        self.dirty_rate = -1
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, calc_time: int, unit: str | None, sample_pages: int | None,
              mode: str | None) -> None:
        """``qmp_calc_dirty_rate``: checks in QEMU's order, then the measuring thread."""
        with self._lock:
            if self.status == "measuring":
                raise DirtyRateError("the dirty rate is already being measured.")
            calc_ms = convert_time(calc_time, unit or "second", "millisecond")
            if not MIN_CALC_TIME_MS <= calc_ms <= MAX_CALC_TIME_MS:
                raise DirtyRateError(f"Calculation time is out of range [{MIN_CALC_TIME_MS}ms, "
                                     f"{MAX_CALC_TIME_MS}ms].")
            mode = mode or "page-sampling"
            if sample_pages is not None and mode != "page-sampling":
                raise DirtyRateError("sample-pages is used only in page-sampling mode")
            if sample_pages is not None:
                if not MIN_SAMPLE_PAGE_COUNT <= sample_pages <= MAX_SAMPLE_PAGE_COUNT:
                    raise DirtyRateError(f"sample-pages is out of range[{MIN_SAMPLE_PAGE_COUNT}, "
                                         f"{MAX_SAMPLE_PAGE_COUNT}].")
            else:
                sample_pages = DEFAULT_SAMPLE_PAGES
            if mode == "dirty-ring":
                # QEMU: only with KVM's dirty ring (kvm_dirty_ring_enabled)
                raise DirtyRateError(f"mode {mode} is not enabled, use other method instead.")
            previous = self._thread
            self.mode = mode
            self.status = "measuring"
            self.dirty_rate = -1
            self.start_time = int(time.time())
            self.calc_time_ms = calc_ms
            self.sample_pages = sample_pages
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, args=(mode, calc_ms, sample_pages),
                                            name="dirty-rate", daemon=True)
        if previous is not None:
            previous.join(10)        # the last measurement has ended (status measured)
        self._thread.start()

    def query(self, unit: str | None = None) -> dict[str, Any]:
        """``query-dirty-rate`` (``DirtyRateInfo``), members in schema order."""
        unit = unit or "second"
        with self._lock:
            out: dict[str, Any] = {}
            measured = self.status == "measured"
            if measured:
                out["dirty-rate"] = self.dirty_rate
            sample_pages = self.sample_pages
            if measured and self.mode != "page-sampling":
                sample_pages = 0
            out.update({"status": self.status, "start-time": self.start_time,
                        "calc-time": convert_time(self.calc_time_ms, "millisecond", unit),
                        "calc-time-unit": unit, "sample-pages": sample_pages,
                        "mode": self.mode})
            return out

    def shutdown(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(10)

    # -- the measuring thread ----------------------------------------------------------------
    def _wait(self, calc_ms: int, started: float) -> int:
        """``dirty_stat_wait``: sleep out the period; the milliseconds it really took."""
        left = calc_ms / 1000 - (time.monotonic() - started)
        if left > 0:
            self._stop.wait(left)
        return max(calc_ms, int((time.monotonic() - started) * 1000))

    def _run(self, mode: str, calc_ms: int, sample_pages: int) -> None:
        rate = -1
        msec = calc_ms
        try:
            if mode == "dirty-bitmap":
                rate, msec = self._by_bitmap(calc_ms)
            else:
                rate, msec = self._by_sampling(calc_ms, sample_pages)
        except Exception as err:  # noqa: BLE001 - the VM is closing: report no rate
            self.machine.log.log("migration", f"dirty rate: measurement failed: {err}")
        with self._lock:
            self.dirty_rate = rate
            self.calc_time_ms = msec
            self.status = "measured"

    def _by_bitmap(self, calc_ms: int) -> tuple[int, int]:
        meter = DirtyMeter(self.machine)
        meter.start()
        try:
            started = time.monotonic()
            msec = self._wait(calc_ms, started)
            pages, _ = meter.read()
        finally:
            meter.stop()
        return bitmap_rate(pages, msec), msec

    def _by_sampling(self, calc_ms: int, per_gib: int) -> tuple[int, int]:
        rng = np.random.default_rng()
        samples = []
        started = time.monotonic()
        for block in self.machine.ram:
            if block.size < MIN_RAMBLOCK_SIZE:
                continue
            count = (block.size * per_gib) >> 30
            npages = block.size // PAGE_SIZE
            if count == 0 or npages == 0:
                continue
            # g_rand_int_range(0, pages - 1): the last page is never picked, as in QEMU
            vfn = rng.integers(0, max(1, npages - 1), size=count)
            samples.append((block, vfn, _hashes(block.mem, vfn), (block.size >> 20)))
        msec = self._wait(calc_ms, started)
        dirty = total = block_mb = 0
        for block, vfn, before, mb in samples:
            dirty += int(np.count_nonzero(_hashes(block.mem, vfn) != before))
            total += int(vfn.size)
            block_mb += mb
        return sampled_rate(dirty, total, block_mb, msec), msec


def _hashes(mem: Any, vfn: np.ndarray) -> np.ndarray:
    out = np.empty(vfn.size, dtype=np.uint32)
    for i, page in enumerate(vfn.tolist()):
        off = page * PAGE_SIZE
        out[i] = zlib.crc32(mem[off:off + PAGE_SIZE])
    return out


_PER_MACHINE: "PerMachine[Machine, DirtyRateCalc]" = PerMachine(DirtyRateCalc)


def calc_of(machine: "Machine") -> DirtyRateCalc:
    """The machine's dirty-rate calculator, created on first use."""
    return _PER_MACHINE.of(machine)


def shutdown(machine: "Machine") -> None:
    """Stop the machine's measuring thread, if it ever had one."""
    _PER_MACHINE.shutdown(machine)
