"""The source side of multifd: the main channel plus ``multifd-channels`` page channels.

QEMU's multifd (migration/multifd.c, QEMU 8.2) re-told:

- the main channel carries the whole stream as usual, with the zero pages as ``ZERO``
  records (8.2 finds zero pages on the main thread and never puts them in packets);
- after the main channel, one connection per page channel is opened to the same address;
  each starts with its initial packet (magic, version, the VM's uuid, its id);
- non-zero pages are cut into packets of at most 128 pages of one block and handed to
  the channels; each channel has its own sender thread that gathers, compresses (one
  zlib/zstd stream per channel) and writes its packets; the socket writes and the
  compression run without the GIL, so channels work in parallel;
- a round ends with a ``SYNC`` packet on every channel and, once every channel has sent it,
  ``RAM_SAVE_FLAG_MULTIFD_FLUSH`` in the main stream (8.2's default,
  ``multifd-flush-after-each-section`` off): the destination waits at that mark until
  every channel has delivered the round's pages.

Threads: every sender thread belongs to its :class:`MultifdChannel`, which stops and joins
them in :meth:`MultifdChannel.close`; ``shutdown()`` (migrate_cancel) shuts every socket, so
a blocked write returns at once.  The first failure of any channel fails the migration with
the transport's text.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from pyvm.migration.control.channel import PageRun, StreamChannel, zero_mask
from pyvm.migration.control.status import MigrationStats
from pyvm.migration.stream.constants import RAM_SAVE_FLAG_MULTIFD_FLUSH, TARGET_PAGE_SIZE
from pyvm.migration.stream.multifd_compression import PageCompressor, compressor
from pyvm.migration.stream.multifd_format import (MULTIFD_FLAG_NOCOMP, MULTIFD_FLAG_SYNC,
                                                  PAGES_PER_PACKET, encode_initial_packet,
                                                  encode_packet)
from pyvm.migration.transports.base import Chunk, RecordChannel, TransportError
from pyvm.migration.transports.socket_transport import SocketOutgoing
from pyvm.migration.transports.zero_copy import NOT_AVAILABLE, ZeroCopySocketOutgoing

#: The record that tells the destination to wait for every channel's SYNC (ram.c).
MULTIFD_FLUSH_RECORD = RAM_SAVE_FLAG_MULTIFD_FLUSH.to_bytes(8, "big")

#: Packets a sender may have queued before the main thread waits for it.
MAX_QUEUED = 4

#: Pages examined (zero scan) per step of :meth:`MultifdChannel.send_pages`.
STEP_PAGES = 4 * PAGES_PER_PACKET

#: How often a waiting main thread looks at the senders' state (seconds).
POLL = 0.2


@dataclass(frozen=True)
class MultifdConfig:
    """The capability and parameters the channels are built from, read at migrate time."""

    channels: int
    compression: str = "none"
    zlib_level: int = 1
    zstd_level: int = 1
    uuid: bytes = bytes(16)
    zero_copy: bool = False
    #: where ``multifd-bytes`` is counted (query-migrate's current statistics)
    stats: Callable[[], MigrationStats] | None = None


@dataclass(frozen=True)
class _Job:
    packet_num: int
    block: str = ""
    mem: np.ndarray | None = None           # the block's bytes (uint8)
    pages: np.ndarray | None = None         # page indices, ascending

    @property
    def sync(self) -> bool:
        return self.pages is None


class _Sender:
    """One page channel and the thread that writes its packets."""

    def __init__(self, channel_id: int, pipe: RecordChannel,
                 compress: PageCompressor | None) -> None:
        self.id = channel_id
        self.pipe = pipe
        self._compress = compress
        self._flag = MULTIFD_FLAG_NOCOMP if compress is None else compress.flag
        self._gather = (np.empty((PAGES_PER_PACKET, TARGET_PAGE_SIZE), dtype=np.uint8)
                        if compress is not None else None)
        self._jobs: deque[_Job | None] = deque()
        self._busy = False
        self._cond = threading.Condition()
        self.error: BaseException | None = None
        #: page bytes before compression, and bytes of page data written
        self.raw_bytes = 0
        self.data_bytes = 0
        self.thread = threading.Thread(target=self._run, name=f"multifd-send-{channel_id}",
                                       daemon=True)

    # -- main thread ----------------------------------------------------------------------------
    def put(self, job: _Job, cancelled: Callable[[], bool]) -> None:
        with self._cond:
            while len(self._jobs) >= MAX_QUEUED and self.error is None and not cancelled():
                self._cond.wait(POLL)
            self._raise()
            self._jobs.append(job)
            self._cond.notify_all()

    def wait_idle(self, cancelled: Callable[[], bool]) -> None:
        with self._cond:
            while (self._jobs or self._busy) and self.error is None and not cancelled():
                self._cond.wait(POLL)
            self._raise()

    def stop(self) -> None:
        with self._cond:
            self._jobs.append(None)
            self._cond.notify_all()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    # -- its own thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs:
                    self._cond.wait()
                job = self._jobs.popleft()
                if job is None:
                    return
                self._busy = True
            try:
                self._send(job)
            except BaseException as err:  # noqa: BLE001 - reported to the main thread
                with self._cond:
                    self.error = err.with_traceback(None)
                    self._jobs.clear()
                    self._busy = False
                    self._cond.notify_all()
                return
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _send(self, job: _Job) -> None:
        if job.pages is None or job.mem is None:
            self.pipe.write(encode_packet(MULTIFD_FLAG_SYNC, job.packet_num, "",
                                          np.zeros(0, dtype=np.int64), 0))
            return
        pages = job.pages
        n = int(pages.size)
        offsets = pages * TARGET_PAGE_SIZE
        self.raw_bytes += n * TARGET_PAGE_SIZE
        if self._compress is not None and self._gather is not None:
            buf = self._gather[:n]
            # np.take copies outside the GIL; the copy also keeps the compressor's input
            # stable while the guest writes (multifd-zlib.c copies each page for that reason)
            np.take(job.mem.reshape(-1, TARGET_PAGE_SIZE), pages, axis=0, out=buf)
            data = self._compress.compress(buf.data.cast("B"))
            header = encode_packet(self._flag, job.packet_num, job.block, offsets, len(data))
            self.pipe.writev((header, data))
            self.data_bytes += len(data)
            return
        header = encode_packet(self._flag, job.packet_num, job.block, offsets,
                               n * TARGET_PAGE_SIZE)
        if isinstance(self.pipe, ZeroCopySocketOutgoing):
            # the header is a Python object and goes normally; guest RAM without a copy
            # (io/channel-socket.c, multifd.c: header first, then the pages zero-copy)
            self.pipe.write(header)
            self.pipe.write_zero_copy(list(_page_views(job.mem, pages)))
        else:
            self.pipe.writev([header, *_page_views(job.mem, pages)])
        self.data_bytes += n * TARGET_PAGE_SIZE


def _page_views(mem: np.ndarray, pages: np.ndarray) -> list[memoryview]:
    """Memoryviews of guest RAM for ``pages``, one per run of consecutive pages."""
    data = mem.data
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [pages.size]))
    views = []
    for s, e in zip(starts.tolist(), ends.tolist()):
        first = int(pages[s]) * TARGET_PAGE_SIZE
        views.append(data[first:first + (e - s) * TARGET_PAGE_SIZE])
    return views


class MultifdChannel:
    """A :class:`~pyvm.migration.control.channel.Channel` over a main pipe and page channels."""

    def __init__(self, main: RecordChannel, senders: Sequence[_Sender],
                 stats: Callable[[], MigrationStats] | None = None) -> None:
        self.main = StreamChannel(main)
        self.stats = stats
        self.senders = list(senders)
        self._next = 0
        self._packet_num = 0
        self._cancel = threading.Event()
        for s in self.senders:
            s.thread.start()

    @classmethod
    def open(cls, connect: Callable[[], RecordChannel], config: MultifdConfig) -> "MultifdChannel":
        """Connect the main channel, then each page channel (QEMU's order), and send each
        page channel's initial packet.  A failure closes what was opened."""
        main = connect()
        opened: list[RecordChannel] = []
        try:
            for i in range(config.channels):
                pipe = connect()
                if config.zero_copy:
                    if not isinstance(pipe, SocketOutgoing) or pipe.kind != "socket":
                        pipe.close()
                        raise TransportError(NOT_AVAILABLE)
                    pipe = ZeroCopySocketOutgoing.adopt(pipe)
                opened.append(pipe)
                pipe.write(encode_initial_packet(config.uuid, i))
            senders = [_Sender(i, pipe, compressor(config.compression, config.zlib_level,
                                                   config.zstd_level))
                       for i, pipe in enumerate(opened)]
        except BaseException:
            for pipe in (main, *opened):
                try:
                    pipe.shutdown()
                    pipe.close()
                except TransportError:
                    pass
            raise
        return cls(main, senders, config.stats)

    # -- Channel ----------------------------------------------------------------------------
    @property
    def bytes_moved(self) -> int:
        return self.main.bytes_moved + sum(s.pipe.bytes_written for s in self.senders)

    @property
    def multifd_bytes(self) -> int:
        """Bytes written on the page channels (query-migrate's ``multifd-bytes``)."""
        return sum(s.pipe.bytes_written for s in self.senders)

    @property
    def compression_ratio(self) -> float | None:
        raw = sum(s.raw_bytes for s in self.senders)
        data = sum(s.data_bytes for s in self.senders)
        return raw / data if data else None

    @property
    def note(self) -> str | None:
        return f"multifd: {len(self.senders)} channels"

    def write_stream(self, chunks: Sequence[Chunk]) -> None:
        self.main.write_stream(chunks)

    def send_pages(self, run: PageRun) -> Iterator[tuple[int, int]]:
        mem = np.frombuffer(run.block.buffer, dtype=np.uint8)
        indices = run.pages
        for s in range(0, indices.size, STEP_PAGES):
            idx = indices[s:s + STEP_PAGES]
            if run.known_zero is not None:
                known = run.known_zero[s:s + STEP_PAGES]
                zero = known.copy()
                zero[~known] = zero_mask(mem, idx[~known])
            else:
                zero = zero_mask(mem, idx)
            zeros = idx[zero]
            if zeros.size:
                for _ in self.main.send_pages(PageRun(run.block, run.index, zeros,
                                                      np.ones(zeros.size, dtype=bool))):
                    pass
            normal = idx[~zero]
            for p in range(0, normal.size, PAGES_PER_PACKET):
                self._queue(_Job(self._packet_num, run.block.name, mem,
                                 normal[p:p + PAGES_PER_PACKET]))
                self._packet_num += 1
            self._count()
            yield idx.size, int(zeros.size)

    def end_round(self) -> None:
        # multifd_send_sync_main: a SYNC packet on every channel, wait until each went out,
        # then the flush mark in the main stream (ram.c, flush-after-each-section off).
        for sender in self.senders:
            sender.put(_Job(self._packet_num), self._cancel.is_set)
            self._packet_num += 1
        for sender in self.senders:
            sender.wait_idle(self._cancel.is_set)
        self._check_cancel()
        for sender in self.senders:
            # multifd_zero_copy_flush: every zero-copy send done before the bitmap sync
            if isinstance(sender.pipe, ZeroCopySocketOutgoing) and sender.pipe.flush_zero_copy():
                if self.stats is not None:
                    self.stats().dirty_sync_missed_zero_copy += 1
        self._count()
        self.main.write_stream([MULTIFD_FLUSH_RECORD])

    def flush(self) -> None:
        self.main.flush()

    def shutdown(self) -> None:
        self._cancel.set()
        self.main.shutdown()
        for s in self.senders:
            s.pipe.shutdown()

    def close(self) -> None:
        for s in self.senders:
            s.stop()
        for s in self.senders:
            s.thread.join()
        error: BaseException | None = None
        for s in self.senders:
            try:
                s.pipe.close()
            except TransportError as err:
                error = error or err
        self.main.close()
        if error is not None:
            raise error

    # -- helpers ----------------------------------------------------------------------------
    def _count(self) -> None:
        if self.stats is not None:
            self.stats().multifd_bytes = self.multifd_bytes

    def _queue(self, job: _Job) -> None:
        # The next channel in turn; a full queue waits (QEMU waits for a free channel).
        sender = self.senders[self._next]
        self._next = (self._next + 1) % len(self.senders)
        sender.put(job, self._cancel.is_set)
        self._check_cancel()

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise TransportError("multifd: migration cancelled")


__all__ = ["MULTIFD_FLUSH_RECORD", "MultifdChannel", "MultifdConfig"]
