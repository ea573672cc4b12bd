"""The source of a migration with ``postcopy-ram``: precopy first, then postcopy.

QEMU's order (migration/migration.c ``migration_thread`` and ``postcopy_start``,
migration/ram.c, docs/devel/migration/postcopy.rst):

1. After the header: ``OPEN_RETURN_PATH``, ``PING 1`` and ``POSTCOPY_ADVISE`` (page
   sizes); a return-path thread reads the destination's messages from the same socket.
2. Precopy rounds as usual.  If a round converges on its own the migration completes as
   precopy.  ``migrate-start-postcopy`` makes it switch after the current round.
3. Switch: the vCPUs stop, the dirty bitmap is synced once more; the pages dirty now were
   sent before and are stale on the destination: ``POSTCOPY_RAM_DISCARD`` drops them there.
   Then one ``PACKAGED`` command carries ``POSTCOPY_LISTEN``, every device and
   ``globalstate``, and ``POSTCOPY_RUN``: the guest runs on the destination from here.
   Status ``postcopy-active``; ``downtime`` is the time from the stop until the package
   is out.
4. The stale pages follow in a ``ram`` section, the pages the destination asks for
   (``REQ_PAGES``) before the others; ``postcopy-requests`` counts the requests and
   ``postcopy-bytes`` the bytes sent after the switch.  Then the ``ram`` END section and
   ``QEMU_VM_EOF`` (no vmdesc after postcopy), and the source waits for the destination's
   ``SHUT``: ``completed``, and the source VM is in ``postmigrate``.

A failure after the switch leaves the source in ``postcopy-paused``: the guest's state is
split between the hosts, so the source never resumes the guest itself.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from pyvm.migration.control.channel import Channel, PageRun, StreamChannel
from pyvm.migration.control.manager import MigrationManager
from pyvm.migration.control.precopy import MigrationCancelled, Precopy
from pyvm.migration.control.status import MigrationStatus
from pyvm.errors import PyvmError
from pyvm.migration.errors import MigrationError
from pyvm.migration.stream.preempt_pages import EOS_RECORD
from pyvm.migration.stream import postcopy_commands as pc
from pyvm.migration.stream.constants import TARGET_PAGE_SIZE
from pyvm.migration.stream.return_path import (Pong, RecvBitmap, ReqPages, ResumeAck,
                                                ReturnPathDecoder, Shut)
from pyvm.migration.transports import AbortSignal
from pyvm.migration.transports.socket_transport import SocketOutgoing

if TYPE_CHECKING:
    from pyvm.machine import Machine
    from pyvm.ram import RamBlock

PAGE = TARGET_PAGE_SIZE
#: pages sent between two looks at the page requests
BACKGROUND_BATCH = 32


def _ranges(indices: np.ndarray) -> list[tuple[int, int]]:
    """Sorted page indices as (byte start, byte length) runs."""
    if indices.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [indices.size]))
    return [(int(indices[s]) * PAGE, int(e - s) * PAGE) for s, e in zip(starts, ends)]


class PostcopySource(Precopy):
    """An outgoing migration that may switch to postcopy (``migrate-start-postcopy``)."""

    def __init__(self, manager: MigrationManager, machine: "Machine",
                 open_channel: Callable[[], Channel], abort: AbortSignal) -> None:
        super().__init__(manager, machine, open_channel, abort)
        self.start_requested = threading.Event()
        self.in_postcopy = False
        self._requests: "queue.Queue[ReqPages]" = queue.Queue()
        self._shut = threading.Event()
        self._shut_failed = False
        self._rp_sock: socket.socket | None = None
        self._rp_thread: threading.Thread | None = None
        self._rp_error: BaseException | None = None
        self._rp_done = threading.Event()
        self.pongs: list[int] = []
        self._bitmaps: dict[str, np.ndarray] = {}
        self._rp_event = threading.Event()
        self._resume_acked = threading.Event()
        self._todo: list[tuple["RamBlock", np.ndarray]] = []
        self._sent: dict[str, np.ndarray] = {}
        # postcopy-preempt: the channel for requested pages, written by the return-path
        # thread under _urgent_lock (migration/ram.c ram_save_queue_pages ->
        # ram_save_host_page_urgent since QEMU 8.0)
        self._preempt: Channel | None = None
        self._preempt_open = False          # False once its EOS went out
        self._preempt_bytes = 0             # bytes of preempt channels closed before
        self._urgent_lock = threading.Lock()
        #: pages sent on the preempt channel
        self.preempt_pages = 0

    def request_postcopy(self) -> None:
        """Any thread (``migrate-start-postcopy``): switch after the current round."""
        self.start_requested.set()

    # -- setup: return path and advise ---------------------------------------------------------
    def _after_configuration(self) -> None:
        channel = self._channel()
        pipe = channel.pipe if isinstance(channel, StreamChannel) else None
        if not isinstance(pipe, SocketOutgoing):
            raise RuntimeError("Unable to open return-path for postcopy")
        self._start_return_path(pipe)
        self._send([pc.encode_command(pc.OpenReturnPath()), pc.encode_command(pc.Ping(1)),
                    pc.encode_command(pc.PostcopyAdvise(os.sysconf("SC_PAGE_SIZE"), PAGE))])
        self._open_preempt()

    # -- postcopy-preempt -------------------------------------------------------------------------
    def _open_preempt(self) -> None:
        """postcopy-preempt: a second connection to the same address, right after the
        main one (migration.c migrate_fd_connect -> postcopy_preempt_setup)."""
        if not self.mgr.caps["postcopy-preempt"]:
            return
        self._channel().flush()             # the destination accepts it after the advise
        channel = self.open_channel()
        with self._urgent_lock:
            self._preempt, self._preempt_open = channel, True

    def _send_urgent(self, req: ReqPages) -> bool:
        """The return-path thread: send requested pages on the preempt channel now.
        False when there is no preempt channel (the migration thread serves them)."""
        with self._urgent_lock:
            channel = self._preempt
            if channel is None or not self._preempt_open or not self.in_postcopy:
                return False
            block = next((b for b in self._blocks() if b.name == req.block), None)
            if block is None:
                return True
            pages = np.arange(req.start // PAGE, (req.start + req.length) // PAGE, dtype=np.int64)
            run = PageRun(self._codec_blocks[block.name], self._block_index[block.name], pages)
            for npages, nzero in channel.send_pages(run):
                self.stats.duplicate += nzero
                self.stats.normal += npages - nzero
                self.stats.normal_bytes = self.stats.normal * PAGE
            channel.flush()
            self.stats.postcopy_requests += 1
            self.preempt_pages += int(pages.size)
            mask = self._sent.get(block.name)
            if mask is not None:
                mask[pages] = True
            return True

    def _end_preempt(self) -> None:
        """Before the main stream's EOF: the preempt channel's EOS
        (ram.c postcopy_preempt_shutdown_file)."""
        with self._urgent_lock:
            if self._preempt is not None and self._preempt_open:
                self._preempt.write_stream([EOS_RECORD])
                self._preempt.flush()
                self._preempt_open = False

    def _close_preempt(self, abort: bool) -> None:
        with self._urgent_lock:
            channel, self._preempt = self._preempt, None
            self._preempt_open = False
            if channel is not None:
                self._preempt_bytes += channel.bytes_moved
        if channel is None:
            return
        try:
            if abort:
                channel.shutdown()
            channel.close()
        except Exception:  # noqa: BLE001 - a failing preempt channel is reported by the main one
            if not abort:
                raise

    def _transferred(self) -> int:
        preempt = self._preempt
        return super()._transferred() + self._preempt_bytes + (
            preempt.bytes_moved if preempt is not None else 0)

    def _start_return_path(self, pipe: SocketOutgoing) -> None:
        self._rp_sock = socket.socket(fileno=os.dup(pipe.fileno()))
        self._rp_error = None
        self._rp_done.clear()
        self._rp_thread = threading.Thread(target=self._rp_loop, name="migration-return-path",
                                           daemon=True)
        self._rp_thread.start()

    def _rp_loop(self) -> None:
        sock = self._rp_sock
        assert sock is not None
        blocks = {b.name: b.npages for b in self._blocks()}
        decoder = ReturnPathDecoder(blocks.get)
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                for msg in decoder.feed(data):
                    if isinstance(msg, ReqPages):
                        if not self._send_urgent(msg):
                            self._requests.put(msg)
                    elif isinstance(msg, Pong):
                        self.pongs.append(msg.value)
                    elif isinstance(msg, Shut):
                        self._shut_failed = msg.failed
                        self._shut.set()
                    elif isinstance(msg, RecvBitmap):
                        self._bitmaps[msg.block] = msg.words
                        self._rp_event.set()
                    elif isinstance(msg, ResumeAck):
                        self._resume_acked.set()
                    else:
                        raise MigrationError(f"Received unexpected return-path message {msg!r}")
        except (OSError, MigrationError, PyvmError) as err:
            self._rp_error = err
        finally:
            self._rp_done.set()

    def _leave_precopy(self) -> bool:
        return self.start_requested.is_set()

    def _policy_wants_postcopy(self) -> None:
        self.start_requested.set()             # as migrate-start-postcopy would

    # -- the switch and the rest -----------------------------------------------------------------
    def _complete(self) -> None:
        if not self.start_requested.is_set():
            super()._complete()
            return
        self._postcopy_start()
        self._postcopy_pages()
        self._postcopy_end()

    def _postcopy_start(self) -> None:
        self._stop_vm()
        self.mgr.set_status(MigrationStatus.POSTCOPY_ACTIVE)
        self._sync()
        self.in_postcopy = True
        self._switch_bytes = self._transferred()
        commands: list[Any] = []
        for block, idx in self._pending:
            commands += pc.discard_commands(block.name, _ranges(idx))
        self._send(commands)

        def save_devices() -> list[Any]:
            return self.enc.device_sections(
                (obj.idstr, obj.instance_id, obj) for obj in self.machine.migratable())
        nested: list[Any] = [pc.encode_command(pc.PostcopyListen())]
        nested += self.machine.run_on_loop(save_devices)
        runstate = "running" if self._was_running else self.mgr.runstate_at_start.value
        nested += self.enc.globalstate(runstate)
        nested.append(pc.encode_command(pc.PostcopyRun()))
        blob = b"".join(bytes(c) for c in nested)
        self._send([pc.packaged(blob)])
        self._channel().flush()
        assert self._stop_time is not None
        self.mgr.downtime_ms = int((time.monotonic() - self._stop_time) * 1000)
        self.stats.downtime_bytes += self._transferred() - self._switch_bytes
        # The source's RAM does not change any more: dirty logging ends (after the
        # downtime: the guest runs on the destination already).
        self.machine.stop_dirty_log()
        self.machine.log.log("migration", (
            f"migration: postcopy: {sum(i.size for _, i in self._pending)} pages discarded, "
            f"device state sent; downtime {self.mgr.downtime_ms} ms"))

    _switch_bytes = 0

    def _postcopy_pages(self) -> None:
        if not self._todo:
            self._todo = [(block, idx) for block, idx in self._pending if idx.size]
            self._sent = {b.name: np.zeros(b.npages, dtype=bool) for b, _ in self._todo}
        blocks = {b.name: b for b, _ in self._todo}
        sent = self._sent
        self._send(self.enc.ram_section_begin(final=False))
        self._pc_start, self._pc_bytes = time.monotonic(), 0
        for block, idx in self._todo:
            pos = 0
            while pos < idx.size:
                self._serve_requests(blocks, sent)
                batch = idx[pos:pos + BACKGROUND_BATCH]
                pos += BACKGROUND_BATCH
                batch = batch[~sent[block.name][batch]]
                if batch.size:
                    before = self._transferred()
                    self._send_run(block, batch)
                    sent[block.name][batch] = True
                    self._postcopy_rate_limit(self._transferred() - before)
        self._serve_requests(blocks, sent)
        self._end_round()
        self.stats.remaining = 0

    def _postcopy_rate_limit(self, nbytes: int) -> None:
        """``max-postcopy-bandwidth`` (0: unlimited) for the background pages; requested
        pages are never held back (migration/migration.c migration_rate_set)."""
        bw = int(self.mgr.params["max-postcopy-bandwidth"])
        if not bw:
            return
        self._pc_bytes += nbytes
        due = self._pc_start + self._pc_bytes / bw
        wait = due - time.monotonic()
        if wait > 0 and self.cancel_requested.wait(wait):
            raise MigrationCancelled()

    _pc_bytes = 0
    _pc_start = 0.0

    def _serve_requests(self, blocks: dict[str, "RamBlock"], sent: dict[str, np.ndarray]) -> None:
        self._check_cancel()
        if self._rp_error is not None:
            raise RuntimeError(f"Detected IO failure for postcopy. Migration paused. "
                               f"({self._rp_error})")
        while True:
            try:
                req = self._requests.get_nowait()
            except queue.Empty:
                return
            self.stats.postcopy_requests += 1
            block = blocks.get(req.block) or next(
                (b for b in self._blocks() if b.name == req.block), None)
            if block is None:
                continue
            pages = np.arange(req.start // PAGE, (req.start + req.length) // PAGE, dtype=np.int64)
            self._send_run(block, pages)
            mask = sent.get(block.name)
            if mask is not None:
                mask[pages] = True

    def _send_run(self, block: "RamBlock", pages: np.ndarray) -> None:
        run = PageRun(self._codec_blocks[block.name], self._block_index[block.name], pages)
        for npages, nzero in self._channel().send_pages(run):
            self.stats.duplicate += nzero
            self.stats.normal += npages - nzero
            self.stats.normal_bytes = self.stats.normal * PAGE
        self._channel().flush()
        self.stats.transferred = self._transferred()
        self.stats.postcopy_bytes = self._transferred() - self._switch_bytes

    def _postcopy_end(self) -> None:
        self._final_section = True
        self._end_preempt()
        self._send(self.enc.ram_section_begin(final=True))
        self._send(self.enc.ram_eos())
        self._send(self.enc.eof_and_vmdesc(send_vmdesc=False))
        self._channel().flush()
        self.stats.postcopy_bytes = self._transferred() - self._switch_bytes
        # The destination says SHUT once every page has landed (migration.c
        # await_return_path_close_on_source); requests may still come until then.
        while not self._shut.wait(0.05):
            self._check_cancel()
            if self._rp_done.is_set() and not self._shut.is_set():
                raise RuntimeError("Detected IO failure for postcopy. Migration paused.")
        if self._shut_failed:
            raise RuntimeError("RP: Sibling indicated error 1")

    # -- recovery (migrate with resume: true) ------------------------------------------------
    def resume(self, open_channel: Callable[[], Channel], abort: AbortSignal) -> None:
        """Prepare to carry on a paused postcopy over a new channel (:meth:`resume_run`)."""
        self.open_channel = open_channel
        self.abort = abort
        self.cancel_requested.clear()
        self.mgr.error_desc = None
        self.mgr.set_status(MigrationStatus.POSTCOPY_RECOVER)

    def resume_run(self) -> None:
        """Thread body of a recovery: migration.c postcopy_do_resume, ram.c
        ram_dirty_bitmap_sync_all: ask the destination which pages it holds, resume, send
        the rest."""
        try:
            channel = self.channel = self.open_channel()
            pipe = channel.pipe if isinstance(channel, StreamChannel) else None
            if not isinstance(pipe, SocketOutgoing):
                raise RuntimeError("Unable to open return-path for postcopy")
            self.enc.abandon_ram_section()      # the old channel broke off inside it
            self._bitmaps.clear()
            self._shut.clear()
            self._resume_acked.clear()
            self._start_return_path(pipe)
            self._close_preempt(abort=True)
            self._open_preempt()
            names = [b.name for b in self._blocks()]
            self._send([pc.encode_command(pc.RecvBitmap(n)) for n in names])
            self._channel().flush()
            self._wait_rp(lambda: all(n in self._bitmaps for n in names))
            for block, idx in self._todo:
                words = self._bitmaps[block.name]
                present = np.unpackbits(words.astype("<u8").view(np.uint8),
                                        bitorder="little")[:block.npages].astype(bool)
                # a page the destination lacks goes again, even if it was sent once
                self._sent[block.name][idx] = present[idx]
            self._send([pc.encode_command(pc.PostcopyResume())])
            self._channel().flush()
            self._wait_rp(self._resume_acked.is_set)
            self.mgr.set_status(MigrationStatus.POSTCOPY_ACTIVE)
            self._postcopy_pages()
            self._postcopy_end()
            channel.close()
            self.mgr.total_time_ms = int((time.monotonic() - self.mgr.start_time) * 1000)
            self._finish_ok()
        except Exception as err:  # noqa: BLE001 - every failure pauses again
            self._abort(str(err) or type(err).__name__)

    def _wait_rp(self, done: Callable[[], bool]) -> None:
        while not done():
            self._check_cancel()
            if self._rp_done.is_set() and not done():
                raise RuntimeError(f"Detected IO failure for postcopy. Migration paused. "
                                   f"({self._rp_error or 'the return path closed'})")
            self._rp_event.wait(0.05)
            self._rp_event.clear()

    def pause(self) -> None:
        """``migrate-pause`` on the source: cut the channel; the thread pauses."""
        channel = self.channel
        if channel is not None:
            channel.shutdown()
        preempt = self._preempt
        if preempt is not None:
            preempt.shutdown()

    # -- ends ------------------------------------------------------------------------------------
    def _join_return_path(self) -> None:
        sock, self._rp_sock = self._rp_sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._rp_thread is not None:
            self._rp_thread.join(10)
        if sock is not None:
            sock.close()

    def _finish_ok(self) -> None:
        self._join_return_path()
        self._close_preempt(abort=False)
        if self.in_postcopy:
            self.machine.log.log("migration", (
                f"migration: postcopy: {self.stats.postcopy_requests} page requests, "
                f"{self.preempt_pages} pages sent on the preempt channel"))
        super()._finish_ok()

    def _abort(self, error: str | None) -> None:
        if not self.in_postcopy:
            self._join_return_path()
            self._close_preempt(abort=True)
            super()._abort(error)
            return
        # After the switch the guest lives on the destination: never resume it here
        # (migration.c postcopy_pause).
        if self.channel is not None:
            try:
                self.channel.shutdown()
                self.channel.close()
            except Exception:  # noqa: BLE001 - already failing
                pass
        self._join_return_path()
        self._close_preempt(abort=True)
        self.mgr.error_desc = error or "cancelled during postcopy"
        self.mgr.set_status(MigrationStatus.POSTCOPY_PAUSED)


__all__ = ["MigrationCancelled", "PostcopySource"]
