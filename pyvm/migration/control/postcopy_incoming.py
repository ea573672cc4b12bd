"""The destination of a postcopy migration: commands, page placement, faults, return path.

QEMU's design (docs/devel/migration/postcopy.rst, migration/postcopy-ram.c, savevm.c),
as pyvm runs it:

- ``OPEN_RETURN_PATH``: the destination writes back on the same socket; ``PING`` is
  answered with ``PONG``.
- ``POSTCOPY_ADVISE``: page sizes are checked; the ``postcopy-ram`` capability must be on
  here too.
- ``POSTCOPY_RAM_DISCARD``: pages the source dirtied after sending them are dropped
  (``MADV_DONTNEED`` on private memory, ``MADV_REMOVE`` on shared memory) so that they are
  missing again.
- ``PACKAGED``: its nested stream (``LISTEN``, every device, ``RUN``) is read inline.
- ``POSTCOPY_LISTEN``: every migrated RAM block is registered with userfaultfd
  (:mod:`pyvm.userfault`) in MISSING mode and the fault thread starts; from now on the
  pages that arrive are placed with ``UFFDIO_COPY``/``UFFDIO_ZEROPAGE``, which wakes any
  vCPU waiting for them.  Status ``postcopy-active``.
- ``POSTCOPY_RUN``: the guest starts here while its RAM is still arriving.
- ``QEMU_VM_EOF``: every page is here; the registration ends, ``SHUT`` goes back to the
  source, status ``completed``.

Threads: the load thread (:mod:`pyvm.migration.control.incoming`) reads the stream and
places pages; the fault thread (owned here, joined by :meth:`close`) reads fault events
and asks the source for the pages with ``REQ_PAGES``.  A vCPU blocked on a missing page
holds up only the run-loop thread: neither the load thread, the fault thread nor the
monitor's migration commands wait on the loop while postcopy runs.  A fault on a page
the source sent during precopy as a zero page that this process never populated is
resolved here with a zero page, without a round trip.

If the connection is lost after ``RUN``, the guest's state is split between the hosts:
the destination goes to ``postcopy-paused`` and neither side resumes on its own.
"""

from __future__ import annotations

import errno
import mmap
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Callable

import numpy as np

from pyvm.migration.control.manager import MigrationManager
from pyvm.migration.control.postcopy_blocktime import BlocktimeContext
from pyvm.migration.control.postcopy_preempt import PreemptReceiver
from pyvm.migration.control.status import MigrationStatus
from pyvm.migration.errors import StreamFormatError, StreamMismatchError, UnsupportedFeatureError
from pyvm.migration.stream import postcopy_commands as pc
from pyvm.migration.stream.constants import TARGET_PAGE_SIZE
from pyvm.migration.stream.return_path import ReturnPathEncoder, bitmap_bytes
from pyvm.migration.transports.base import IncomingChannel
from pyvm.migration.transports.socket_transport import SocketIncoming
from pyvm.userfault import PageFault, Userfault

if TYPE_CHECKING:
    from pyvm.migration.stream.decoder import StreamDecoder
    from pyvm.machine import Machine
    from pyvm.ram import RamBlock

PAGE = TARGET_PAGE_SIZE
#: seconds the load waits at EOF for the preempt channel's end
PREEMPT_END_TIMEOUT = 30.0
_MADV_REMOVE = getattr(mmap, "MADV_REMOVE", 9)          # asm-generic/mman-common.h


class _Block:
    """One registered RAM block: where it is, what was discarded, what was placed."""

    def __init__(self, block: "RamBlock") -> None:
        self.block = block
        self.base = block.host_address
        self.size = block.size
        self.discarded = np.zeros(block.npages, dtype=bool)
        self.placed = np.zeros(block.npages, dtype=bool)
        self.requested = np.zeros(block.npages, dtype=bool)


class PostcopyDestination:
    """Handles the postcopy commands of one incoming stream (``decoder.on_command``)."""

    def __init__(self, mgr: MigrationManager, machine: "Machine", decoder: "StreamDecoder",
                 channel: Callable[[], object], set_status: Callable[[MigrationStatus], None],
                 start_guest: Callable[[], None],
                 accept_more: Callable[[], IncomingChannel] | None = None) -> None:
        self.mgr = mgr
        #: the next connection on the migration listener (postcopy-preempt's channel)
        self._accept_more = accept_more
        self.preempt: PreemptReceiver | None = None
        #: preempt receivers stopped but perhaps not yet joined (see join_preempt)
        self._retired_preempt: list[PreemptReceiver] = []
        self.machine = machine
        self.decoder = decoder
        self._channel = channel
        self._set_status = set_status
        self._start_guest = start_guest
        self._rp: socket.socket | None = None
        self._rp_lock = threading.Lock()
        self._rp_enc = ReturnPathEncoder()
        self._uffd: Userfault | None = None
        self._blocks: dict[str, _Block] = {}
        self._stop = threading.Event()
        self._fault_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.advised = False
        self.listening = False
        self.running = False          # the guest was started here (RUN)
        self.requests = 0
        self.fault_error: BaseException | None = None
        #: postcopy-blocktime accounting (None unless the capability is on here)
        self.blocktime: BlocktimeContext | None = None
        self._clock_start = time.monotonic()

    # -- commands --------------------------------------------------------------------------------
    def handle(self, cmd: int, payload: bytes) -> None:
        command = pc.parse_command(cmd, payload)
        if isinstance(command, pc.OpenReturnPath):
            self._open_return_path()
        elif isinstance(command, pc.Ping):
            if self._rp is None:
                raise UnsupportedFeatureError(f"CMD_PING (0x{command.value:x}) received with no "
                                              "return path", errno=errno.EPERM)
            self._send_rp(self._rp_enc.pong(command.value))
        elif isinstance(command, pc.PostcopyAdvise):
            self._advise(command)
        elif isinstance(command, pc.RamDiscard):
            self._discard(command)
        elif isinstance(command, pc.Packaged):
            pass                    # the nested stream follows and is read as it comes
        elif isinstance(command, pc.PostcopyListen):
            self._listen()
        elif isinstance(command, pc.PostcopyRun):
            self._run()
        elif isinstance(command, pc.RecvBitmap):
            self._recv_bitmap(command.block)
        elif isinstance(command, pc.PostcopyResume):
            self._resume()
        else:
            raise UnsupportedFeatureError(f"MIG_CMD 0x{cmd:x} unknown (len 0x{len(payload):x})",
                                          detail=f"pyvm does not implement {type(command).__name__}")

    def _open_return_path(self) -> None:
        channel = self._channel()
        if not isinstance(channel, SocketIncoming):
            raise UnsupportedFeatureError("CMD_OPEN_RETURN_PATH failed",
                                          detail="the return path needs a socket transport")
        self._rp = socket.socket(fileno=os.dup(channel.fileno()))

    def _send_rp(self, data: bytes) -> None:
        rp = self._rp
        if rp is None:
            raise OSError(errno.EPIPE, "the return path is closed")
        with self._rp_lock:
            rp.sendall(data)

    def _advise(self, advise: pc.PostcopyAdvise) -> None:
        if advise.host_page_summary == 0 and advise.target_page_size == 0:
            if self.mgr.caps["postcopy-ram"]:
                raise StreamMismatchError("RAM postcopy is enabled but have 0 byte advise")
            return
        if not self.mgr.caps["postcopy-ram"]:
            raise StreamMismatchError("RAM postcopy is disabled but have 16 byte advise")
        pc.check_advise(advise, os.sysconf("SC_PAGE_SIZE"))
        if self._rp is None:
            raise StreamMismatchError("Postcopy needs a return path")
        for block in self.machine.ram:
            if not self.mgr.block_ignored(block):
                self._blocks[block.name] = _Block(block)
        if self.mgr.caps["postcopy-blocktime"] and self.blocktime is None:
            # postcopy-ram.c ufd_check_and_apply: the context comes with the advise.
            # Every vCPU runs on the machine's one loop thread (see postcopy_blocktime).
            self.blocktime = BlocktimeContext(len(self.machine.cpus), threads=1)
        self.advised = True
        self._start_preempt()

    def _start_preempt(self) -> None:
        """postcopy-preempt: take the source's second connection and read it."""
        if not self.mgr.caps["postcopy-preempt"] or self._accept_more is None:
            return
        self._stop_preempt()
        self.preempt = PreemptReceiver(self._accept_more, self.place)
        self.preempt.start()

    def _stop_preempt(self, join: bool = False) -> None:
        receiver = self.preempt
        if receiver is None:
            return
        receiver.stop()
        if receiver not in self._retired_preempt:
            self._retired_preempt.append(receiver)
        if join:
            # A receiver still waiting for its connection ends when the listener closes:
            # join_preempt, once it has.
            receiver.join(5 if receiver.connected.is_set() else 0)

    def join_preempt(self, timeout: float = 5) -> None:
        """After the migration listener closed: join every preempt thread this load
        started (one still waiting for a connection ends with the listener)."""
        retired, self._retired_preempt = self._retired_preempt, []
        for receiver in retired:
            receiver.join(timeout)

    def _discard(self, discard: pc.RamDiscard) -> None:
        if not self.advised or self.listening:
            raise StreamFormatError("CMD_POSTCOPY_RAM_DISCARD in wrong postcopy state")
        b = self._blocks.get(discard.block)
        if b is None:
            raise StreamMismatchError(f"postcopy_ram_discard_range: Could not find RAM block "
                                      f"'{discard.block}'")
        advice = _MADV_REMOVE if b.block.backend.shared else mmap.MADV_DONTNEED
        for start, length in discard.ranges:
            if start % PAGE or length % PAGE or start + length > b.size:
                raise StreamFormatError(f"ram_discard_range: Overrun block '{discard.block}' "
                                        f"(0x{start:x}/0x{length:x}/0x{b.size:x})")
            b.block.backend.mm.madvise(advice, start, length)
            b.discarded[start // PAGE:(start + length) // PAGE] = True

    def _listen(self) -> None:
        if not self.advised:
            raise StreamFormatError("CMD_POSTCOPY_LISTEN in wrong postcopy state")
        if self.machine.dirty_logging:
            # The host write tracker holds its own userfaultfd on guest RAM.
            self.machine.stop_dirty_log()
        uffd = Userfault(thread_ids=True)
        try:
            for b in self._blocks.values():
                uffd.register_missing(b.base, b.size)
        except OSError:
            uffd.close()
            raise
        self._uffd = uffd
        self.listening = True
        ram = self.decoder.ram
        assert ram is not None, "the RAM section is set up before postcopy listens"
        ram.placer = self.place
        self.decoder.stop_at_eof = True
        self._fault_thread = threading.Thread(target=self._fault_loop, name="postcopy-faults",
                                              daemon=True)
        self._fault_thread.start()
        self._set_status(MigrationStatus.POSTCOPY_ACTIVE)

    def _run(self) -> None:
        if not self.listening:
            raise StreamFormatError("CMD_POSTCOPY_RUN in wrong postcopy state")
        self.running = True
        self._start_guest()

    # -- recovery (migrate-recover) -----------------------------------------------------------
    def reconnect(self) -> None:
        """A new connection from the source: the return path goes over it from now on."""
        old, self._rp = self._rp, None
        if old is not None:
            old.close()
        self._open_return_path()
        self._rp_enc.forget_block()
        if self.preempt is not None:
            self._start_preempt()           # the source connects a new preempt channel

    def disconnect(self) -> None:
        """The connection failed: end the return path too, so that the source sees it."""
        rp, self._rp = self._rp, None
        if rp is not None:
            try:
                rp.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            rp.close()
        self._stop_preempt()

    def _recv_bitmap(self, name: str) -> None:
        # savevm.c loadvm_handle_recv_bitmap -> ram.c ramblock_recv_bitmap_send
        if self.mgr.status is not MigrationStatus.POSTCOPY_RECOVER:
            raise StreamFormatError("CMD_RECV_BITMAP received in wrong state")
        b = self._blocks.get(name)
        if b is None:
            raise StreamMismatchError(f"ramblock_recv_bitmap_send: invalid block name: {name}")
        with self._lock:
            present = ~b.discarded | b.placed
        bits = np.packbits(present, bitorder="little")
        words = np.zeros(bitmap_bytes(b.block.npages), dtype=np.uint8)
        words[:bits.size] = bits
        self._send_rp(self._rp_enc.recv_bitmap(name, words.view("<u8")))

    def _resume(self) -> None:
        # savevm.c loadvm_postcopy_handle_resume
        if self.mgr.status is not MigrationStatus.POSTCOPY_RECOVER:
            raise StreamFormatError("CMD_POSTCOPY_RESUME received in wrong state")
        self._set_status(MigrationStatus.POSTCOPY_ACTIVE)
        self._send_rp(self._rp_enc.resume_ack())
        # Pages asked for while the connection was down are asked for again.
        with self._lock:
            again = [(b, np.flatnonzero(b.requested & ~b.placed)) for b in self._blocks.values()]
        for b, pages in again:
            for index in pages:
                self._send_rp(self._rp_enc.req_pages(b.block.name, int(index) * PAGE, PAGE))

    # -- pages ---------------------------------------------------------------------------------
    def place(self, name: str, offset: int, page: memoryview | bytes | None) -> None:
        """The load thread (or the preempt thread): a page, placed atomically."""
        b = self._blocks.get(name)
        uffd = self._uffd
        if b is None or uffd is None:
            return
        index = offset // PAGE
        if page is None:
            uffd.zeropage(b.base + offset)
        else:
            uffd.copy(b.base + offset, page)
        self._placed(b, index)

    def _placed(self, b: _Block, index: int) -> None:
        with self._lock:
            b.placed[index] = True
            if self.blocktime is not None:
                # postcopy-ram.c qemu_ufd_copy_ioctl -> mark_postcopy_blocktime_end
                self.blocktime.end(b.base + index * PAGE, self._now_ms())

    def _now_ms(self) -> float:
        return (time.monotonic() - self._clock_start) * 1000

    def _fault_vcpu(self, fault: PageFault) -> int:
        """The index of the vCPU that raised ``fault``, -1 if no vCPU did
        (postcopy-ram.c get_mem_fault_cpu_index).  The faulting vCPU stays inside the
        emulator until its page comes, so the loop thread's running vCPU is it."""
        if fault.thread_id != getattr(self.machine, "loop_native_id", None):
            return -1
        cpu = self.machine.running_cpu
        return -1 if cpu is None else cpu.index

    def _fault_loop(self) -> None:
        uffd = self._uffd
        assert uffd is not None
        try:
            while not self._stop.is_set():
                for fault in uffd.read_faults(timeout=0.1):
                    self._on_fault(uffd, fault)
        except BaseException as err:  # noqa: BLE001 - recorded; the load thread reports it
            if not self._stop.is_set():
                self.fault_error = err

    def _on_fault(self, uffd: Userfault, fault: PageFault) -> None:
        for b in self._blocks.values():
            if b.base <= fault.address < b.base + b.size:
                break
        else:
            return
        index = (fault.address - b.base) // PAGE
        with self._lock:
            if self.blocktime is not None:
                self.blocktime.begin(self._fault_vcpu(fault), fault.address, self._now_ms(),
                                     bool(b.placed[index]))
            if b.placed[index] or b.requested[index]:
                return
            if not b.discarded[index]:
                # Received during precopy as a zero page this process never populated.
                local_zero = True
            else:
                local_zero = False
                b.requested[index] = True
        if local_zero:
            uffd.zeropage(fault.address)
            self._placed(b, index)
            return
        self.requests += 1
        try:
            self._send_rp(self._rp_enc.req_pages(b.block.name, index * PAGE, PAGE))
        except OSError:
            pass                    # the connection is gone: postcopy pauses (load thread)

    # -- end -----------------------------------------------------------------------------------
    def finish(self) -> None:
        """EOF: every page is here; end the registration, tell the source, completed."""
        receiver = self.preempt
        if receiver is not None:
            # The source ends the preempt channel before the main stream's EOF: the
            # requested pages still in flight on it land before the count below.
            if not receiver.wait_end(PREEMPT_END_TIMEOUT):
                raise StreamFormatError("postcopy preempt channel did not end: "
                                        f"{receiver.error or 'timed out'}")
            if receiver.connected.is_set():
                self.machine.log.log("migration", (
                    f"migration: postcopy preempt channel ended: {receiver.pages} pages"))
        missing = sum(int(np.count_nonzero(b.discarded & ~b.placed)) for b in self._blocks.values())
        if missing:
            raise StreamFormatError(f"postcopy ended with {missing} pages never received")
        self._end_registration()
        self._send_rp(self._rp_enc.shut(False))
        self._set_status(MigrationStatus.COMPLETED)

    def _end_registration(self) -> None:
        self._stop.set()
        if self._fault_thread is not None:
            self._fault_thread.join(5)
        if self._uffd is not None:
            self._uffd.close()
            self._uffd = None

    def close(self) -> None:
        """Any end (the VM closes, the load failed): wake every waiter, join the thread."""
        self._stop_preempt(join=True)
        self._end_registration()
        rp, self._rp = self._rp, None
        if rp is not None:
            try:
                rp.close()
            except OSError:
                pass
