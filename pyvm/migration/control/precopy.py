"""The source side of a migration: precopy on its own thread.

The algorithm (QEMU's ``migration_thread`` + ``ram_save_*``, re-told):

1. **setup** — header, configuration section, the ``ram`` START section (block list);
   dirty logging starts with every page marked, so round 1 sends all of RAM.  The first
   bitmap sync counts as pass 1.
2. **iterate** — send the dirty pages (zero pages as ``ZERO`` records, found by the native
   scan; others as ``PAGE`` records straight from guest RAM) in a PART section, honouring
   ``max-bandwidth``; then sync the bitmap again.  The bandwidth measured over the round
   and ``downtime-limit`` decide: when what is left to send fits in the allowed downtime,
   switch over.  That rule is the default *policy*: after every sync the policy named by
   ``x-policy`` (:mod:`pyvm.migration.policy`, run by ``policy_runner``) chooses the
   pages of the next round, their order, the vCPU throttle, or the switchover.
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

from pyvm.fastpath import bitmap_to_indices
from pyvm.migration.control.channel import (BATCH_PAGES, Channel, PageRun, PlacementChannel,
                                             zero_mask)
from pyvm.migration.control import guest_slowdown
from pyvm.migration.control.manager import MigrationManager
from pyvm.migration.control.policy_runner import PolicyRunner
from pyvm.migration.control.mapped_ram_channel import MappedRamChannel
from pyvm.migration.control import mapped_ram_channel, xbzrle_channel
from pyvm.migration.control.status import MigrationStatus
from pyvm.migration.control.xbzrle_channel import XbzrleCounters
from pyvm.migration.stream import ram_format
from pyvm.migration.stream.encoder import StreamEncoder
from pyvm.migration.transports import AbortSignal
from pyvm.runstate import RunState

if TYPE_CHECKING:
    from pyvm.machine import Machine
    from pyvm.ram import RamBlock

PAGE = 4096
RATE_WINDOW = 0.1              # seconds: QEMU's BUFFER_DELAY rate-limit window


class MigrationCancelled(Exception):
    """Raised inside the thread when migrate_cancel asked it to stop."""


@dataclass
class _Round:
    started: float
    bytes_before: int
    pages: int = 0


class Precopy:
    """One outgoing migration; :meth:`run` is the thread body."""

    def __init__(self, manager: MigrationManager, machine: "Machine",
                 open_channel: Callable[[], Channel], abort: AbortSignal) -> None:
        self.mgr = manager
        self.machine = machine
        self.open_channel = open_channel
        #: wakes a connect or a blocked write when migrate_cancel comes
        self.abort = abort
        self.channel: Channel | None = None
        self.cancel_requested = threading.Event()
        self.continue_event = threading.Event()
        self.enc = StreamEncoder(checksum=manager.caps["x-checksum"])
        self._final_section = False
        self.stats = manager.stats
        self._pending: list[tuple["RamBlock", np.ndarray]] = []
        self._codec_blocks: dict[str, ram_format.StreamBlock] = {}
        self._block_index: dict[str, int] = {}
        self._window_start = 0.0
        self._window_bytes = 0
        self._stopped_vm = False
        self._was_running = False
        self.mode = manager.params.mode.value
        #: auto-converge / dirty-limit state (pyvm.migration.control.guest_slowdown)
        self.slowdown: guest_slowdown.GuestSlowdown | None = None
        self._new_dirty_pages = 0
        self._runner: PolicyRunner | None = None     # the migration policy (x-policy)
        self._dirty_words: list[np.ndarray] = []     # the last sync's bitmaps

    # -- thread body ------------------------------------------------------------------------
    def run(self) -> None:
        mgr = self.mgr
        start = time.monotonic()
        mgr.start_time = start
        try:
            channel = self.channel = self.open_channel()
            if mgr.caps["xbzrle"] and self.mode != "cpr-reboot":
                mgr.xbzrle = XbzrleCounters(mgr.params["xbzrle-cache-size"])
                channel = self.channel = xbzrle_channel.wrap(
                    channel, mgr.params["xbzrle-cache-size"], mgr.xbzrle, self.stats,
                    lambda: self.stats.dirty_sync_count, lambda: self._final_section)
            if mgr.caps["mapped-ram"]:
                if self.enc.checksum:
                    raise RuntimeError("x-checksum is not supported with mapped-ram")
                multifd = mgr.caps["multifd"]
                channel = self.channel = mapped_ram_channel.wrap(
                    channel, mgr.params["multifd-channels"] if multifd else 1,
                    multifd and mgr.params["direct-io"])
            if channel.note:
                self.machine.log.log("migration", channel.note)
            if self.enc.checksum and isinstance(channel, PlacementChannel):
                raise RuntimeError("x-checksum is not supported with rdma: RDMA writes "
                                   "pages outside the stream")
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
            channel.close()
            mgr.total_time_ms = int((time.monotonic() - start) * 1000)
            self._finish_ok()
        except MigrationCancelled:
            self._abort(None)
        except Exception as err:  # noqa: BLE001 - every failure becomes 'failed' + error-desc
            if self.cancel_requested.is_set():
                self._abort(None)
            else:
                self._abort(str(err) or type(err).__name__)
        finally:
            if self._runner is not None and self._runner.throttle_pct:
                self.machine.set_cpu_throttle(0)     # QEMU's cpu_throttle_stop
            # helpers a cancel left inside a call that cannot be interrupted (the rdma
            # lookup): this thread owns them and ends only after them
            self.abort.join_adopted()

    # -- phases ------------------------------------------------------------------------------
    def _blocks(self) -> list["RamBlock"]:
        return [b for b in self.machine.ram if not self.mgr.block_ignored(b)]

    def _setup(self) -> None:
        m = self.machine
        caps = self.mgr.stream_capabilities()
        self._send(self.enc.header())
        self._send(self.enc.configuration(m.machine_type, caps))
        self._after_configuration()
        ignore_shared = "x-ignore-shared" in caps
        codec_blocks = [ram_format.StreamBlock(b.name, b.size, b.gpa, b.mem, self.mgr.block_ignored(b))
                        for b in m.ram]
        self._codec_blocks = {b.name: cb for b, cb in zip(m.ram, codec_blocks)}
        self._block_index = {b.name: i for i, b in enumerate(self._blocks())}
        channel = self._channel()
        trailer = channel.block_trailer if isinstance(channel, MappedRamChannel) else None
        self._send(self.enc.ram_setup(codec_blocks, ignore_shared, trailer))
        self.stats.total = sum(b.size for b in self._blocks())
        if self.mode == "cpr-reboot":
            # The VM stops first and no dirty tracking is needed: one pass over stopped RAM.
            self._stop_vm()
            for b in self._blocks():
                b.dirty.fetch_and_clear()
            return
        self._runner = PolicyRunner.from_parameters(
            self.mgr.params["x-policy"] or "", self._blocks(), self.mgr.params,
            postcopy_capable=self.mgr.caps["postcopy-ram"])
        m.start_dirty_log(self._blocks())
        self._sync(first=True)
        self.slowdown = guest_slowdown.start(self.mgr, m, self._transferred())

    def _iterate(self) -> None:
        params = self.mgr.params
        runner = self._runner
        assert runner is not None, "_setup made it"
        bandwidth = runner.setup.link.bandwidth
        while True:
            self._check_cancel()
            # The policy decides every round (pyvm.migration.policy): QEMU's by default.
            decision = runner.decide(self._pending, self._dirty_words, bandwidth)
            if decision.postcopy:
                self._policy_wants_postcopy()
            if decision.stop_and_copy or self._leave_precopy():
                return
            if decision.throttle_pct != runner.throttle_pct:
                runner.throttle_pct = decision.throttle_pct
                self.machine.set_cpu_throttle(decision.throttle_pct)
            send, unsent = runner.plan(decision, self._pending)
            rnd = _Round(time.monotonic(), self._transferred())
            self._send(self.enc.ram_section_begin(final=False))
            for block, idx in send:
                self._send_pages(block, idx, rnd)
            self._pending = unsent
            self._end_round()
            elapsed = max(time.monotonic() - rnd.started, 1e-6)
            sent = self._transferred() - rnd.bytes_before    # every byte moved, rdma's too
            bandwidth = sent / elapsed                                    # bytes/s
            self.stats.mbps = bandwidth * 8 / 1e6
            self.stats.pages_per_second = int(rnd.pages / elapsed)
            self._sync()
            if self.slowdown is not None:
                self.slowdown.after_sync(self._new_dirty_pages, self._transferred())
            remaining = self.stats.remaining
            runner.end_round(rnd.started, elapsed, rnd.pages, sent, self._dirty_words,
                             remaining // PAGE)
            avail = params["avail-switchover-bandwidth"] or bandwidth
            self.mgr.expected_downtime_ms = int(remaining / max(avail, 1) * 1000)
            self.machine.log.log("migration", (
                f"migration: round {self.stats.dirty_sync_count - 1}: sent {sent} bytes "
                f"({rnd.pages} pages) in {elapsed * 1000:.0f} ms, {bandwidth * 8 / 1e6:.1f} Mbps; "
                f"dirty {remaining // PAGE} pages; expected downtime "
                f"{self.mgr.expected_downtime_ms} ms"))

    def _after_configuration(self) -> None:
        """Commands that follow the header (postcopy: return path, advise)."""

    def _leave_precopy(self) -> bool:
        """True to stop iterating before convergence (postcopy was asked for)."""
        return False

    def _policy_wants_postcopy(self) -> None:
        """The policy answered "postcopy" (allowed only with ``postcopy-ram`` on, when the
        migration runs as :class:`~pyvm.migration.control.postcopy_source.PostcopySource`)."""
        raise RuntimeError("postcopy asked for by a migration without postcopy-ram")

    def _complete(self) -> None:
        self._stop_vm()
        if self.mgr.caps["pause-before-switchover"]:
            self.mgr.set_status(MigrationStatus.PRE_SWITCHOVER)
            while not self.continue_event.wait(0.1):
                self._check_cancel()
            self.mgr.set_status(MigrationStatus.DEVICE)
        downtime_start = time.monotonic()
        before = self._transferred()
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
        self._channel().flush()
        self.stats.downtime_bytes += self._transferred() - before
        stopped = downtime_start if self._stop_time is None else self._stop_time
        exact_ms = (time.monotonic() - stopped) * 1e3
        self.mgr.downtime_ms = int(exact_ms)
        # the log also gives the downtime in microseconds (pyvm-lab validate reads it)
        self.machine.log.log("migration", (
            f"migration: switchover: last dirty pages and device state, "
            f"{self._transferred() - before} bytes; downtime {self.mgr.downtime_ms} ms "
            f"({exact_ms:.3f} ms)"))

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
        self._dirty_words = words
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
        self._new_dirty_pages = total - sum(int(idx.size) for idx in unsent.values())
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
        if self.enc.checksum:
            self._send_checked_batches(block, indices, known_zero, rnd, limit)
            return
        run = PageRun(cb, self._block_index[block.name], indices, known_zero)
        channel = self._channel()
        self._check_cancel()
        before = self._transferred()
        for npages, nzero in channel.send_pages(run):
            self.stats.transferred = after = self._transferred()
            self._account(npages, nzero, rnd, after - before, limit)
            self._check_cancel()
            before = after

    def _send_checked_batches(self, block: "RamBlock", indices: np.ndarray,
                              known_zero: np.ndarray | None, rnd: _Round, limit: bool) -> None:
        """x-checksum: each batch of pages is a RAM section of its own, so that its CRC-32C
        (pyvm.migration.stream.integrity) is checked before the destination loads the next one.
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
            self.stats.transferred = after = self._transferred()
            self._account(idx.size, int(np.count_nonzero(mask)), rnd, after - before, limit)

    def _account(self, npages: int, nzero: int, rnd: _Round, sent: int, limit: bool) -> None:
        """Statistics (and the bandwidth limit) after ``npages`` pages (``sent`` bytes)
        went out."""
        self.stats.duplicate += nzero
        self.stats.normal += npages - nzero
        self.stats.normal_bytes = self.stats.normal * PAGE
        rnd.pages += npages
        self.stats.remaining = max(0, self.stats.remaining - npages * PAGE)
        if self.machine.runstate.running:
            self.stats.precopy_bytes += sent
        elif limit:
            self.stats.downtime_bytes += sent
        if limit:
            self._rate_limit(sent)

    def _end_round(self) -> None:
        """Close a RAM section once the channel says the round's pages have landed."""
        self._channel().end_round()
        self._send(self.enc.ram_eos())

    def _channel(self) -> Channel:
        assert self.channel is not None, "the channel is opened first"
        return self.channel

    def _transferred(self) -> int:
        return self._channel().bytes_moved

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
            self._channel().write_stream(chunks)
            self.stats.transferred = self._transferred()

    def _check_cancel(self) -> None:
        if self.cancel_requested.is_set():
            raise MigrationCancelled()

    # -- ends ----------------------------------------------------------------------------------
    def _finish_ok(self) -> None:
        m = self.machine
        if self.slowdown is not None:
            self.slowdown.stop()
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
            if self.slowdown is not None:
                self.slowdown.stop()
            if m.dirty_logging:
                m.stop_dirty_log()
            if self._stopped_vm:
                m.run_on_loop(lambda: m.runstate.set(RunState.RUNNING))
        except Exception as err:  # noqa: BLE001 - the status below must still be reported
            if error is not None:
                error = f"{error}; then {err or type(err).__name__}"
        if error is None:
            self.mgr.set_status(MigrationStatus.CANCELLED)
        else:
            self.mgr.error_desc = error
            self.mgr.set_status(MigrationStatus.FAILED)

    def cancel(self) -> None:
        """Any thread: stop the migration (the thread ends in ``cancelled``)."""
        self.cancel_requested.set()
        self.continue_event.set()
        self.abort.trigger()
        ch = self.channel
        if ch is not None:
            try:
                ch.shutdown()
            except Exception:  # noqa: BLE001 - best effort to unblock a write
                pass
