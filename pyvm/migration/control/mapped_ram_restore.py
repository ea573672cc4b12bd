"""Parallel restore of a mapped-ram file: ``multifd-channels`` threads read the pages.

With ``multifd`` and ``mapped-ram`` on the destination, QEMU 9 does not read the pages
region of a block through the main channel: ``read_ramblock_mapped_ram`` (migration/ram.c)
walks the block's bitmap, cuts each run of set bits into pieces of at most
``MAPPED_RAM_LOAD_BUF_SIZE`` and hands every piece to the next free multifd channel, whose
thread reads it into guest RAM with one positioned read (migration/file.c
``multifd_file_recv_data``).  The main channel goes on after the region.

pyvm does the same: :class:`ParallelPageReader` owns ``channels`` threads, each with a
descriptor of its own on the file (opened ``O_DIRECT`` when the ``direct-io`` parameter is
set: slots are 4 KiB aligned in the file and in guest RAM, as O_DIRECT wants); they take
pieces from a shared queue and ``preadv`` them straight into guest RAM (the read leaves
the GIL, so the channels copy in parallel).  The load thread waits for a block's pieces,
then the stream skips the region with a seek instead of reading it.  Every thread is
started and joined within :meth:`ParallelPageReader.read_block`; a short read fails the
load with QEMU's texts.  Without multifd QEMU reads the same pieces on the load thread
with positioned reads (``qemu_get_buffer_at``); pyvm then uses one such thread, and its
errors name no multifd channel.  For example::

    (pc.ram) failed to read page 0from file offset 100000: multifd recv (1): read 0x0,
    expected 0x100000
"""

from __future__ import annotations

import errno as errno_codes
import itertools
import os
import threading
from dataclasses import dataclass

import numpy as np

from pyvm.migration.errors import MigrationError, StreamFormatError
from pyvm.migration.stream.constants import TARGET_PAGE_BITS

#: migration/ram.c MAPPED_RAM_LOAD_BUF_SIZE: the largest piece one channel reads at once
MAPPED_RAM_LOAD_BUF_SIZE = 0x100000
_PIECE_PAGES = MAPPED_RAM_LOAD_BUF_SIZE >> TARGET_PAGE_BITS


def pieces(present: np.ndarray) -> list[tuple[int, int]]:
    """(first page, page count) of every piece: each run of set bits, cut at
    MAPPED_RAM_LOAD_BUF_SIZE bytes, in file order."""
    bits = np.asarray(present, dtype=np.int8)
    if not bits.size:
        return []
    edges = np.diff(np.concatenate(([0], bits, [0])))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    out: list[tuple[int, int]] = []
    for start, end in zip(starts.tolist(), ends.tolist()):
        for first in range(start, end, _PIECE_PAGES):
            out.append((first, min(_PIECE_PAGES, end - first)))
    return out


@dataclass
class _Failure:
    channel: int
    first: int              # page offset in the block (bytes)
    file_offset: int
    got: int
    wanted: int
    reason: str | None      # strerror of a failed read, None for a short one


class ParallelPageReader:
    """``channels`` reader threads over ``filename`` (the file the main channel reads).

    Any thread may call :meth:`stop`; :meth:`read_block` then ends early with an error."""

    def __init__(self, filename: str, channels: int, direct_io: bool = False,
                 main_fd: int | None = None, multifd: bool = True) -> None:
        self.filename = filename
        #: without multifd QEMU reads on the load thread (qemu_get_buffer_at): one thread,
        #: and its errors do not name a multifd channel
        self.multifd = multifd
        self.main_fd = main_fd
        self.channels = max(1, int(channels))
        self.direct_io = direct_io
        self._stopping = threading.Event()
        #: pages read, per channel (for tests and the bench)
        self.pages_read = [0] * self.channels

    def stop(self) -> None:
        self._stopping.set()

    def skip_input(self, n: int) -> None:
        """Move the main channel ``n`` bytes on (past a pages region read by the threads)."""
        if self.main_fd is None:
            raise MigrationError("mapped-ram: no seekable main channel", errno=errno_codes.EINVAL)
        try:
            os.lseek(self.main_fd, n, os.SEEK_CUR)
        except OSError as err:
            raise MigrationError(f"Unable to seek to offset {n} whence {os.SEEK_CUR} in file: "
                                 f"{os.strerror(err.errno or 0)}",
                                 errno=err.errno or errno_codes.EIO) from err

    def _open(self) -> int:
        flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECT if self.direct_io else 0)
        try:
            return os.open(self.filename, flags)
        except OSError as err:
            raise MigrationError(f"Could not open '{self.filename}': "
                                 f"{os.strerror(err.errno or 0)}",
                                 errno=err.errno or errno_codes.EIO) from err

    def read_block(self, name: str, view: memoryview, pages_offset: int,
                   present: np.ndarray) -> int:
        """Read every page whose bit is set into ``view`` (the block's RAM), from its slot
        at ``pages_offset + page * 4096``; returns the number of pages read.  Raises
        MigrationError with QEMU's texts when a piece cannot be read whole."""
        work = pieces(present)
        if not work:
            return 0
        nthreads = min(self.channels, len(work))
        fds = []
        try:
            for _ in range(nthreads):
                fds.append(self._open())
        except MigrationError:
            for fd in fds:
                os.close(fd)
            raise
        taken = itertools.count()         # next() is atomic under the GIL: a shared queue
        failures: list[_Failure] = []
        lock = threading.Lock()
        ram = view.cast("B") if view.format != "B" else view

        def channel(index: int, fd: int) -> None:
            done = 0
            try:
                while not self._stopping.is_set() and not failures:
                    i = next(taken)
                    if i >= len(work):
                        break
                    first, count = work[i]
                    start = first << TARGET_PAGE_BITS
                    size = count << TARGET_PAGE_BITS
                    got, reason = 0, None
                    while got < size:
                        try:
                            n = os.preadv(fd, [ram[start + got:start + size]],
                                          pages_offset + start + got)
                        except OSError as err:
                            reason = os.strerror(err.errno or 0)
                            break
                        if n == 0:
                            break
                        got += n
                    if got < size:
                        with lock:
                            failures.append(_Failure(index, start, pages_offset + start, got,
                                                     size, reason))
                        break
                    done += count
            except Exception as err:  # noqa: BLE001 - reported by the load thread
                with lock:
                    failures.append(_Failure(index, 0, pages_offset, 0, 0, repr(err)))
            finally:
                self.pages_read[index] += done

        threads = [threading.Thread(target=channel, args=(i, fd), daemon=True,
                                    name=f"mapped-ram-load/{i}")
                   for i, fd in enumerate(fds)]
        try:
            for t in threads:
                t.start()
        finally:
            for t in threads:
                if t.ident is not None:
                    t.join()
            for fd in fds:
                os.close(fd)
            if ram is not view:
                ram.release()
        if failures:
            f = min(failures, key=lambda x: x.first)
            if f.reason is not None:
                cause = f.reason
            else:
                cause = f"read 0x{f.got:x}, expected 0x{f.wanted:x}"
            if self.multifd:
                cause = f"multifd recv ({f.channel}): {cause}"
            # ram.c read_ramblock_mapped_ram: RAM_ADDR_FMT is "%" PRIx64 with no separator
            # before "from" (QEMU's own text)
            raise StreamFormatError(f"({name}) failed to read page {f.first:x}"
                                    f"from file offset {f.file_offset:x}: {cause}",
                                    errno=errno_codes.EIO)
        if self._stopping.is_set():
            raise MigrationError("load of mapped-ram pages stopped", errno=errno_codes.EINTR)
        return int(sum(count for _, count in work))


__all__ = ["MAPPED_RAM_LOAD_BUF_SIZE", "ParallelPageReader", "pieces"]
