"""The source side of a migration: precopy on its own thread.

The algorithm (QEMU's ``migration_thread`` + ``ram_save_*``, re-told):

1. **setup** — header, configuration section, the ``ram`` START section (block list);
   dirty logging starts with every page marked, so round 1 sends all of RAM.  The first
   bitmap sync counts as pass 1.
2. **iterate** — send the dirty pages (zero pages as ``ZERO`` records, found by the native
   scan; others as ``PAGE`` records straight from guest RAM) in a PART section, honouring
   ``max-bandwidth``; then sync the bitmap again.  The bandwidth measured over the round
   and ``downtime-limit`` decide: when what is left to send fits in the allowed downtime,
   switch over.
3. **switchover** — stop the vCPUs (``finish-migrate``, STOP), sync once more, send the last
   pages in the END section, every device and vCPU as a FULL section, ``globalstate``,
   EOF and the vmdesc trailer.  The source ends in ``postmigrate``.

On any error or cancel the channel is shut, dirty logging stops, and a guest that was
running runs again; guest RAM is only ever read.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from pyvm.fastpath import RecordBatch, bitmap_to_indices, find_zero_pages_at
from pyvm.migration.stream import ram_format
from pyvm.migration.stream.encoder import StreamEncoder
from pyvm.migration.control.status import MigrationStatus
from pyvm.runstate import RunState

if TYPE_CHECKING:
    from pyvm.machine import Machine
    from pyvm.migration.control.manager import MigrationManager
    from pyvm.ram import RamBlock

PAGE = 4096
RAM_HOOK_RECORD = (0x80).to_bytes(8, "big")   # RAM_SAVE_FLAG_HOOK (migration/ram.c)
BATCH_PAGES = 256              # PAGE records per write (1 MiB), pages per rdma write batch
RATE_WINDOW = 0.1              # seconds: QEMU's BUFFER_DELAY rate-limit window


class MigrationCancelled(Exception):
    """Raised inside the thread when migrate_cancel asked it to stop."""


@dataclass
class _Round:
    started: float
    bytes_before: int
    pages: int = 0


def zero_mask(mem: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """``mask[i]`` True when page ``indices[i]`` of ``mem`` is all zero (scanned natively).

    The scan stops at a page's first non-zero bytes, so data pages cost a cache line or
    two, not the whole page.
    """
    mask = np.zeros(indices.size, dtype=np.uint8)
    if indices.size:
        find_zero_pages_at(mem, np.ascontiguousarray(indices, dtype=np.int64), mask)
    return mask.view(bool)


class Precopy:
    """One outgoing migration; :meth:`run` is the thread body."""

    def __init__(self, manager: "MigrationManager", machine: "Machine",
                 open_channel: Callable[[], Any]) -> None:
        self.mgr = manager
        self.machine = machine
        self.open_channel = open_channel
        self.channel: Any = None
        self.cancel_requested = threading.Event()
        self.continue_event = threading.Event()
        self.enc = StreamEncoder(checksum=manager.caps["x-checksum"])
        self._final_section = False
        self.stats = manager.stats
        self._pending: list[tuple["RamBlock", np.ndarray]] = []
        self._batch = RecordBatch(BATCH_PAGES)
        self._window_start = 0.0
        self._window_bytes = 0
        self._stopped_vm = False
        self._was_running = False
        self.mode = manager.params.mode.value

    # -- thread body ------------------------------------------------------------------------
    def run(self) -> None:
        mgr = self.mgr
        start = time.monotonic()
        mgr.start_time = start
        try:
            self.channel = self.open_channel()
            if self.enc.checksum and hasattr(self.channel, "write_pages"):
                raise RuntimeError("x-checksum is not supported with rdma: RDMA writes "
                                   "pages outside the stream")
            provider = getattr(self.channel, "provider", None)
            if provider:
                self.machine.log.log("migration", f"rdma: libfabric provider {provider}")
            if self.cancel_requested.is_set():
                raise MigrationCancelled()
            self._setup()
            mgr.setup_time_ms = int((time.monotonic() - start) * 1000)
            if self.mode == "cpr-reboot":
                mgr.set_status(MigrationStatus.ACTIVE)
                self._complete()
            else:
                mgr.set_status(MigrationStatus.ACTIVE)
                self._iterate()
                self._complete()
            self.channel.close()
            mgr.total_time_ms = int((time.monotonic() - start) * 1000)
            self._finish_ok()
        except MigrationCancelled:
            self._abort(None)
        except Exception as err:  # noqa: BLE001 - every failure becomes 'failed' + error-desc
            if self.cancel_requested.is_set():
                self._abort(None)
            else:
                self._abort(str(err) or type(err).__name__)

    # -- phases ------------------------------------------------------------------------------
    def _blocks(self) -> list["RamBlock"]:
        return [b for b in self.machine.ram if not self.mgr.block_ignored(b)]

    def _setup(self) -> None:
        m = self.machine
        caps = self.mgr.stream_capabilities()
        self._send(self.enc.header())
        self._send(self.enc.configuration(m.machine_type, caps))
        ignore_shared = "x-ignore-shared" in caps
        codec_blocks = [ram_format.RamBlock(b.name, b.size, b.gpa, b.mem, self.mgr.block_ignored(b))
                        for b in m.ram]
        self._codec_blocks = {b.name: cb for b, cb in zip(m.ram, codec_blocks)}
        self._block_index = {b.name: i for i, b in enumerate(self._blocks())}
        self._send(self.enc.ram_setup(codec_blocks, ignore_shared))
        self.stats.total = sum(b.size for b in self._blocks())
        if self.mode == "cpr-reboot":
            # The VM stops first and no dirty tracking is needed: one pass over stopped RAM.
            self._stop_vm()
            for b in self._blocks():
                b.dirty.fetch_and_clear()
            return
        m.start_dirty_log(self._blocks())
        self._sync(first=True)

    def _iterate(self) -> None:
        params = self.mgr.params
        while True:
            self._check_cancel()
            rnd = _Round(time.monotonic(), self.channel.bytes_written)
            self._send(self.enc.ram_section_begin(final=False))
            for block, idx in self._pending:
                self._send_pages(block, idx, rnd)
            self._pending = []
            self._end_round()
            elapsed = max(time.monotonic() - rnd.started, 1e-6)
            sent = self.channel.bytes_written - rnd.bytes_before
            bandwidth = sent / elapsed                                    # bytes/s
            self.stats.mbps = bandwidth * 8 / 1e6
            self.stats.pages_per_second = int(rnd.pages / elapsed)
            self._sync()
            remaining = self.stats.remaining
            avail = params["avail-switchover-bandwidth"] or bandwidth
            limit_ms = params.downtime_limit
            self.mgr.expected_downtime_ms = int(remaining / max(avail, 1) * 1000)
            self.machine.log.log("migration", (
                f"migration: round {self.stats.dirty_sync_count - 1}: sent {sent} bytes "
                f"({rnd.pages} pages) in {elapsed * 1000:.0f} ms, {bandwidth * 8 / 1e6:.1f} Mbps; "
                f"dirty {remaining // PAGE} pages; expected downtime "
                f"{self.mgr.expected_downtime_ms} ms"))
            if remaining <= avail * limit_ms / 1000:
                return

    def _complete(self) -> None:
        self._stop_vm()
        if self.mgr.caps["pause-before-switchover"]:
            self.mgr.set_status(MigrationStatus.PRE_SWITCHOVER)
            while not self.continue_event.wait(0.1):
                self._check_cancel()
            self.mgr.set_status(MigrationStatus.DEVICE)
        downtime_start = time.monotonic()
        before = self.channel.bytes_written
        if self.mode == "cpr-reboot":
            self._pending = [(b, np.arange(b.npages, dtype=np.int64)) for b in self._blocks()]
        else:
            self._sync()
        self._final_section = True
        self._send(self.enc.ram_section_begin(final=True))
        rnd = _Round(time.monotonic(), before)
        for block, idx in self._pending:
            self._send_pages(block, idx, rnd, limit=False)
        self._end_round()
        self.stats.remaining = 0

        def save_devices() -> list[Any]:
            return self.enc.device_sections(
                (obj.idstr, obj.instance_id, obj) for obj in self.machine.migratable())
        self._send(self.machine.run_on_loop(save_devices))
        runstate = "running" if self._was_running else self.mgr.runstate_at_start.value
        self._send(self.enc.globalstate(runstate))
        self._send(self.enc.eof_and_vmdesc())
        self.channel.flush()
        self.stats.downtime_bytes += self.channel.bytes_written - before
        self.mgr.downtime_ms = int((time.monotonic() - downtime_start) * 1000)
        if self._stop_time is not None:
            self.mgr.downtime_ms = int((time.monotonic() - self._stop_time) * 1000)
        self.machine.log.log("migration", (
            f"migration: switchover: last dirty pages and device state, "
            f"{self.channel.bytes_written - before} bytes; downtime {self.mgr.downtime_ms} ms"))

    def pending_pages(self) -> list[tuple["RamBlock", np.ndarray]]:
        """Pages found dirty at the last sync, sent during the current round (a snapshot)."""
        return list(self._pending)

    # -- helpers ------------------------------------------------------------------------------
    _stop_time: float | None = None

    def _stop_vm(self) -> None:
        def stop() -> None:
            self._was_running = self.machine.runstate.running
            if self._was_running:
                self.machine.runstate.set(RunState.FINISH_MIGRATE)
                self._stopped_vm = True
        self.machine.run_on_loop(stop)
        self._stop_time = time.monotonic()

    def _sync(self, first: bool = False) -> None:
        """Take the dirty bitmaps; pages still pending from the last sync stay pending."""
        unsent = {block.name: idx for block, idx in self._pending}
        pending = []
        total = 0
        # Unicorn calls the write hook just *before* it performs the store.  Taking the
        # bitmap between two time slices guarantees that every store whose mark we take
        # has landed in RAM, so the page we then send carries it.
        blocks = self._blocks()
        words = self.machine.run_on_loop(lambda: [b.dirty.fetch_and_clear() for b in blocks])
        for block, w in zip(blocks, words):
            idx = bitmap_to_indices(w, block.npages)
            if block.name in unsent:
                # Merged through a page mask: cheaper than sorting, and with no first-use
                # set-up cost (np.union1d pays one on its first call, which fell in the downtime).
                mask = np.zeros(block.npages, dtype=bool)
                mask[idx] = True
                mask[unsent[block.name]] = True
                idx = np.flatnonzero(mask)
            if idx.size:
                pending.append((block, idx))
                total += idx.size
        self._pending = pending
        now = time.monotonic()
        if not first and self._last_sync:
            self.stats.dirty_pages_rate = int(total / max(now - self._last_sync, 1e-6))
        self._last_sync = now
        self.stats.remaining = total * PAGE
        self.stats.dirty_sync_count += 1
        self.mgr.emit_pass(self.stats.dirty_sync_count)

    _last_sync = 0.0

    def _send_pages(self, block: "RamBlock", indices: np.ndarray, rnd: _Round,
                    limit: bool = True) -> None:
        cb = self._codec_blocks[block.name]
        # Pages the process never populated are zero without reading them (reading
        # untouched memory costs a page fault each); the rest are scanned while packed.
        known_zero = None
        if indices.size:
            first = int(indices.min())
            unpopulated = block.unpopulated(first, int(indices.max()) + 1 - first)
            if unpopulated is not None:
                known_zero = unpopulated[indices - first]
        if hasattr(self.channel, "write_pages"):
            self._send_rdma(block, indices, known_zero, rnd, limit)
            return
        if self.enc.checksum:
            self._send_checked_batches(block, indices, known_zero, rnd, limit)
            return
        # Each pending entry is a different block, so a fresh record writer names the block
        # in its first record exactly as the encoder would after the section header.
        #
        # Records are laid out natively (zero pages found on the way), 256 PAGE records
        # or ~100,000 ZERO records at a time, and the channel writes each batch with
        # writev/sendmsg: headers from the batch's buffer, page bytes straight from guest
        # RAM, no copy.  Every channel but rdma's is a RecordChannel.
        start = 0
        while start < indices.size:
            self._check_cancel()
            before = self._transferred()
            end, _, nzero = self.enc.ram_batch(self._batch, cb, indices, start, known_zero)
            self.channel.write_records(self._batch)
            self.stats.transferred = self._transferred()
            self._account(end - start, nzero, rnd, before, limit)
            start = end

    def _send_checked_batches(self, block: "RamBlock", indices: np.ndarray,
                              known_zero: np.ndarray | None, rnd: _Round, limit: bool) -> None:
        """x-checksum: each batch of pages is a RAM section of its own, so that its CRC-32C
        (pyvm.migration.integrity) is checked before the destination loads the next one.
        Pages go through the encoder, which copies them while summing."""
        cb = self._codec_blocks[block.name]
        for s in range(0, indices.size, BATCH_PAGES):
            self._check_cancel()
            idx = indices[s:s + BATCH_PAGES]
            mask = zero_mask(block.mem, idx)
            if known_zero is not None:
                mask = mask | known_zero[s:s + BATCH_PAGES]
            before = self._transferred()
            self._send(self.enc.ram_pages(cb, idx, mask))
            self._send(self.enc.ram_eos())
            self._send(self.enc.ram_section_begin(final=self._final_section))
            self.stats.transferred = self._transferred()
            self._account(idx.size, int(np.count_nonzero(mask)), rnd, before, limit)

    def _account(self, npages: int, nzero: int, rnd: _Round, before: int, limit: bool) -> None:
        """Statistics (and the bandwidth limit) after ``npages`` pages went out."""
        self.stats.duplicate += nzero
        self.stats.normal += npages - nzero
        self.stats.normal_bytes = self.stats.normal * PAGE
        rnd.pages += npages
        self.stats.remaining = max(0, self.stats.remaining - npages * PAGE)
        sent = self._transferred() - before
        if self.machine.runstate.running:
            self.stats.precopy_bytes += sent
        elif limit:
            self.stats.downtime_bytes += sent
        if limit:
            self._rate_limit(sent)

    def _send_rdma(self, block: "RamBlock", indices: np.ndarray, known_zero: np.ndarray | None,
                   rnd: _Round, limit: bool) -> None:
        """One-sided RDMA writes straight into the destination's registered block; zero
        pages go as COMPRESS messages so unregistered memory stays untouched.  No
        PAGE/ZERO record for these pages enters the stream."""
        index = self._block_index[block.name]
        if known_zero is not None and known_zero.any():
            # All known-zero pages at once: their runs merge into a few COMPRESS messages.
            self._check_cancel()
            before = self._transferred()
            zeros = indices[known_zero]
            self.channel.write_zero_pages(index, zeros * PAGE, PAGE)
            self.stats.transferred = self._transferred()
            self._account(zeros.size, zeros.size, rnd, before, limit)
            indices = indices[~known_zero]
        for s in range(0, indices.size, BATCH_PAGES):
            self._check_cancel()
            idx = indices[s:s + BATCH_PAGES]
            mask = zero_mask(block.mem, idx)
            before = self._transferred()
            offsets = idx * PAGE
            if mask.any():
                self.channel.write_zero_pages(index, offsets[mask], PAGE)
            if not mask.all():
                self.channel.write_pages(index, offsets[~mask], PAGE)
            self.stats.transferred = self._transferred()
            self._account(idx.size, int(np.count_nonzero(mask)), rnd, before, limit)

    def _end_round(self) -> None:
        """Close a RAM section; with rdma, first wait for the round's writes to land and
        mark the round in the stream (RAM_SAVE_FLAG_HOOK), as QEMU's rdma does."""
        if hasattr(self.channel, "round_finished"):
            self.channel.round_finished()
            self._send([RAM_HOOK_RECORD])
        self._send(self.enc.ram_eos())

    def _transferred(self) -> int:
        return self.channel.bytes_written + getattr(self.channel, "rdma_bytes", 0)

    def _rate_limit(self, nbytes: int) -> None:
        bw = self.mgr.params.max_bandwidth
        if not bw:
            return
        now = time.monotonic()
        if now - self._window_start >= RATE_WINDOW:
            self._window_start, self._window_bytes = now, 0
        self._window_bytes += nbytes
        budget = bw * RATE_WINDOW
        if self._window_bytes >= budget:
            # One batch (up to 256 pages) can exceed a whole window's budget at low
            # bandwidths: wait as many windows as the bytes sent need, not just one.
            wait = self._window_start + RATE_WINDOW * self._window_bytes / budget - now
            if wait > 0 and self.cancel_requested.wait(wait):
                raise MigrationCancelled()
            self._window_start, self._window_bytes = time.monotonic(), 0

    def _send(self, chunks: list[Any]) -> None:
        if chunks:
            self.channel.writev(chunks)
            self.stats.transferred = self._transferred()

    def _check_cancel(self) -> None:
        if self.cancel_requested.is_set():
            raise MigrationCancelled()

    # -- ends ----------------------------------------------------------------------------------
    def _finish_ok(self) -> None:
        m = self.machine
        if self.mode != "cpr-reboot":
            m.stop_dirty_log()
        m.run_on_loop(lambda: m.runstate.set(RunState.POSTMIGRATE))
        self.mgr.set_status(MigrationStatus.COMPLETED)

    def _abort(self, error: str | None) -> None:
        m = self.machine
        if self.channel is not None:
            try:
                self.channel.shutdown()
                self.channel.close()
            except Exception:  # noqa: BLE001 - already failing; the first error is reported
                pass
        try:
            if m.dirty_logging:
                m.stop_dirty_log()
        finally:
            if self._stopped_vm:
                m.run_on_loop(lambda: m.runstate.set(RunState.RUNNING))
            if error is None:
                self.mgr.set_status(MigrationStatus.CANCELLED)
            else:
                self.mgr.error_desc = error
                self.mgr.set_status(MigrationStatus.FAILED)

    def cancel(self) -> None:
        self.cancel_requested.set()
        self.continue_event.set()
        ch = self.channel
        if ch is not None:
            try:
                ch.shutdown()
            except Exception:  # noqa: BLE001 - best effort to unblock a write
                pass
