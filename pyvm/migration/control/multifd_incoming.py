"""The destination side of multifd: accept the main and the page channels, receive pages.

QEMU's destination (migration/migration.c ``migration_ioc_process_incoming``,
migration/multifd.c ``multifd_recv_new_channel``, ``multifd_recv_thread``,
``multifd_recv_sync_main``, QEMU 8.2) re-told:

- connections are accepted until the main channel and every page channel are there; the
  first four bytes tell them apart ("QEVM" starts the main stream, the multifd magic a page
  channel, whose initial packet then names its id and must carry this VM's uuid).  With
  TLS the first connection is the main channel: the source completes its handshake before
  it connects the others, and writes nothing on it until they are connected;
- one receiver thread per page channel reads packets, checks them
  (:func:`pyvm.migration.stream.multifd_format.decode_packet`) and writes their pages into
  guest RAM -- straight from the socket without compression, after inflating with zlib/zstd;
- ``RAM_SAVE_FLAG_MULTIFD_FLUSH`` in the main stream is a barrier: the loader waits until
  every channel has read its ``SYNC`` packet, then lets them all go on.  So a page a channel
  writes in one round can never land after the main stream's record for the same page in a
  later round, nor the other way round.

A bad packet or a channel that fails stops every channel and the main channel; the load
then fails with the channel's text (QEMU's).  Pages only ever go into guest RAM, inside the
block the packet names.  Threads belong to :class:`MultifdIncoming`; :meth:`stop` wakes and
:meth:`join` joins them.
"""

from __future__ import annotations

import threading
from typing import Callable

import numpy as np

from pyvm.errors import PyvmError
from pyvm.migration.errors import MigrationError
from pyvm.migration.stream.constants import TARGET_PAGE_SIZE
from pyvm.migration.stream.multifd_compression import (MAX_COMPRESSED, PageDecompressor,
                                                       decompressor, method_flag)
from pyvm.migration.stream.multifd_format import (INIT_PACKET_SIZE, MAIN_CHANNEL_MAGIC,
                                                  MULTIFD_FLAG_COMPRESSION_MASK, PACKET_SIZE,
                                                  MultifdPacketError, decode_initial_packet,
                                                  decode_packet)
from pyvm.migration.transports import IncomingChannel, TransportError

#: ``block_memory(name)``: the writable bytes (uint8) of the local block, None when unknown.
BlockMemory = Callable[[str], "np.ndarray | None"]


class MultifdLoadError(MigrationError):
    """A page channel failed; the text is the channel's (QEMU's)."""


def read_exact(channel: IncomingChannel, view: memoryview) -> bool:
    """Fill ``view``; False at end of input before the first byte, an error inside it."""
    got = 0
    while got < view.nbytes:
        n = channel.readinto(view[got:])
        if n == 0:
            if got == 0:
                return False
            raise TransportError("Unable to read from socket: unexpected end of input")
        got += n
    return True


class _Prefixed:
    """The main channel with the four bytes read to recognise it put back in front."""

    def __init__(self, channel: IncomingChannel, prefix: bytes) -> None:
        self.channel = channel
        self._prefix = prefix

    def read(self, n: int) -> bytes:
        if self._prefix:
            out, self._prefix = self._prefix[:n], self._prefix[n:]
            return out
        return self.channel.read(n)

    def readinto(self, buf: memoryview | bytearray) -> int:
        if self._prefix:
            n = min(len(buf), len(self._prefix))
            buf[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        return self.channel.readinto(buf)

    def close(self) -> None:
        self.channel.close()

    def shutdown(self) -> None:
        self.channel.shutdown()


class _Receiver:
    """One page channel and its thread."""

    def __init__(self, owner: "MultifdIncoming", channel_id: int, channel: IncomingChannel,
                 decompress: PageDecompressor | None) -> None:
        self.owner = owner
        self.id = channel_id
        self.channel = channel
        self._decompress = decompress
        self._flag = method_flag(owner.compression)
        self.packets = 0
        self.ended = False
        self.thread = threading.Thread(target=self._run, name=f"multifd-recv-{channel_id}",
                                       daemon=True)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as err:  # noqa: BLE001 - handed to the loader
            self.owner._channel_failed(self, err)
        finally:
            self.ended = True
            self.owner._wake()

    def _loop(self) -> None:
        header = bytearray(PACKET_SIZE)
        view = memoryview(header)
        owner = self.owner
        while True:
            try:
                if not read_exact(self.channel, view):
                    return                  # the source closed the channel at the end
            except TransportError:
                if owner.stopping:
                    return
                raise
            packet = decode_packet(header, owner.block_length)
            self.packets += 1
            if packet.normal_pages:
                self._receive_pages(packet.block, packet.offsets, packet.flags,
                                    packet.next_packet_size)
            if packet.sync:
                if not owner._arrive_at_sync():
                    return

    def _receive_pages(self, block: str, offsets: np.ndarray, flags: int, size: int) -> None:
        mem = self.owner.block_memory(block)
        if mem is None:   # (decode_packet checked the name against the same lookup)
            raise MultifdPacketError(f"multifd: unknown ram block {block}")
        received = flags & MULTIFD_FLAG_COMPRESSION_MASK
        if received != self._flag:
            raise MultifdPacketError(f"multifd {self.id}: flags received {received:x} flags "
                                     f"expected {self._flag:x}")
        n = int(offsets.size)
        if self._decompress is None:
            # Straight from the socket into guest RAM, one read per run of pages.
            data = mem.data
            pages = offsets // TARGET_PAGE_SIZE
            breaks = np.flatnonzero(np.diff(pages) != 1) + 1
            starts = np.concatenate(([0], breaks)).tolist()
            ends = np.concatenate((breaks, [n])).tolist()
            for s, e in zip(starts, ends):
                first = int(offsets[s])
                if not read_exact(self.channel, data[first:first + (e - s) * TARGET_PAGE_SIZE]):
                    raise TransportError("Unable to read from socket: unexpected end of input")
            return
        if size > MAX_COMPRESSED:
            raise MultifdPacketError(f"multifd {self.id}: received packet with size {size} "
                                     f"and expected a size of at most {MAX_COMPRESSED}")
        compressed = bytearray(size)
        if size and not read_exact(self.channel, memoryview(compressed)):
            raise TransportError("Unable to read from socket: unexpected end of input")
        out = self._decompress.decompress(bytes(compressed), n * TARGET_PAGE_SIZE)
        pages = np.frombuffer(out, dtype=np.uint8).reshape(n, TARGET_PAGE_SIZE)
        mem.reshape(-1, TARGET_PAGE_SIZE)[offsets // TARGET_PAGE_SIZE] = pages


class MultifdIncoming:
    """Accepts ``channels`` page channels beside the main one and runs their receivers."""

    def __init__(self, channels: int, compression: str, uuid: bytes,
                 block_memory: BlockMemory, first_is_main: bool = False) -> None:
        self.channels = channels
        self.first_is_main = first_is_main
        self.compression = compression
        self.uuid = uuid
        self.block_memory = block_memory
        self.receivers: list[_Receiver] = []
        self.main: IncomingChannel | None = None
        self.error: BaseException | None = None
        self.stopping = False
        self._cond = threading.Condition()
        self._arrived = 0
        self._generation = 0
        self._pending: list[IncomingChannel] = []

    def block_length(self, name: str) -> int | None:
        mem = self.block_memory(name)
        return None if mem is None else int(mem.nbytes)

    # -- accepting ----------------------------------------------------------------------------
    def opener(self, accept: Callable[[], IncomingChannel],
               close_listener: Callable[[], None]) -> Callable[[], IncomingChannel]:
        """The load thread's opener: every channel, then the listener is closed."""
        def open_all() -> IncomingChannel:
            try:
                return self.open(accept)
            finally:
                close_listener()
        return open_all

    def open(self, accept: Callable[[], IncomingChannel]) -> IncomingChannel:
        """Accept until the main channel and every page channel are connected; start the
        receivers; return the main channel."""
        main: IncomingChannel | None = None
        found: dict[int, IncomingChannel] = {}
        try:
            while main is None or len(found) < self.channels:
                conn = accept()
                with self._cond:
                    self._pending.append(conn)
                    if self.stopping:
                        raise TransportError("multifd: the incoming migration was stopped")
                if main is None and self.first_is_main:
                    main = conn
                    continue
                magic = bytearray(4)
                if not read_exact(conn, memoryview(magic)):
                    raise TransportError("Unable to read from socket: unexpected end of input")
                if bytes(magic) == MAIN_CHANNEL_MAGIC and main is None:
                    main = _Prefixed(conn, bytes(magic))
                    continue
                rest = bytearray(INIT_PACKET_SIZE - 4)
                if not read_exact(conn, memoryview(rest)):
                    raise TransportError("Unable to read from socket: unexpected end of input")
                channel_id = decode_initial_packet(bytes(magic) + bytes(rest), self.uuid,
                                                   self.channels)
                if channel_id in found:
                    raise MultifdPacketError(f"multifd: channel {channel_id} connected twice")
                found[channel_id] = conn
        except BaseException:
            self._close_pending()
            raise
        self.main = main
        self.receivers = [_Receiver(self, i, found[i], decompressor(self.compression, i))
                          for i in range(self.channels)]
        for r in self.receivers:
            r.thread.start()
        return main

    def _close_pending(self) -> None:
        with self._cond:
            pending, self._pending = self._pending, []
        for conn in pending:
            try:
                conn.shutdown()
                conn.close()
            except PyvmError:
                pass

    # -- the barrier --------------------------------------------------------------------------
    def _arrive_at_sync(self) -> bool:
        """A receiver read SYNC: wait until the loader reaches the flush mark (False: stop)."""
        with self._cond:
            generation = self._generation
            self._arrived += 1
            self._cond.notify_all()
            while self._generation == generation and not self.stopping and self.error is None:
                self._cond.wait()
            return not self.stopping and self.error is None

    def flush(self) -> None:
        """The loader read ``RAM_SAVE_FLAG_MULTIFD_FLUSH`` (multifd_recv_sync_main)."""
        with self._cond:
            while self._arrived < self.channels:
                if self.error is not None:
                    break
                if any(r.ended for r in self.receivers):
                    self.error = MultifdLoadError(
                        "multifd: a channel was closed before the migration ended")
                    break
                self._cond.wait(0.5)
            if self.error is not None:
                raise self._error_for_loader()
            self._arrived = 0
            self._generation += 1
            self._cond.notify_all()

    def _error_for_loader(self) -> MigrationError:
        err = self.error
        if isinstance(err, MigrationError):
            return MultifdLoadError(*err.lines, errno=err.errno)
        return MultifdLoadError(str(err) or type(err).__name__)

    # -- failures and the end -----------------------------------------------------------------
    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _channel_failed(self, receiver: _Receiver, err: BaseException) -> None:
        with self._cond:
            if self.error is None and not self.stopping:
                self.error = err.with_traceback(None)
            self._cond.notify_all()
        # multifd_recv_terminate_threads: every channel stops, and so does the main load
        self._shutdown_channels()

    def _shutdown_channels(self) -> None:
        targets: list[IncomingChannel] = [r.channel for r in self.receivers]
        if self.main is not None:
            targets.append(self.main)
        for ch in targets:
            try:
                ch.shutdown()
            except PyvmError:
                pass

    @property
    def failure(self) -> MigrationError | None:
        """What a page channel reported, as the load error to print (None: nothing)."""
        with self._cond:
            return None if self.error is None else self._error_for_loader()

    def stop(self) -> None:
        """Any thread: end every receiver (the load is over or the VM is closing)."""
        with self._cond:
            self.stopping = True
            self._cond.notify_all()
        self._shutdown_channels()
        with self._cond:
            pending = list(self._pending)
        for conn in pending:
            try:
                conn.shutdown()
            except PyvmError:
                pass

    def join(self, timeout: float | None = None) -> None:
        for r in self.receivers:
            if r.thread.ident is not None:
                r.thread.join(timeout)
        for r in self.receivers:
            try:
                r.channel.close()
            except PyvmError:
                pass


__all__ = ["MultifdIncoming", "MultifdLoadError", "read_exact"]
