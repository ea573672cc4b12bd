"""The ``mapped-ram`` capability: a file where every page has a fixed place.

The layout is :mod:`pyvm.migration.stream.mapped_ram`.  :class:`MappedRamChannel` takes
the place of the file's :class:`~pyvm.migration.control.channel.StreamChannel`:

- stream bytes are written with ``pwrite`` at a file position that follows the stream,
  except that after each block's header (written by :meth:`block_trailer` while the
  ``ram`` START section is encoded) the stream jumps over the block's bitmap and pages
  region (QEMU ``qemu_set_offset(file, pages_offset + used_length)``);
- a page is written to its slot (``pages_offset + index * 4096``) with ``pwritev``, as
  often as it is sent, so a guest that keeps writing never makes the file grow; a zero page
  is not written, only its bit cleared (migration/ram.c ``save_zero_page``);
- the bitmaps go to their places when the stream is flushed at the end
  (``ram_save_file_bmap``); the sections carry only their EOS.

With ``multifd`` on, ``multifd-channels`` threads write the pages of each batch in
parallel (``pwritev`` releases the GIL); there are no multifd packets in a mapped-ram file.
With ``multifd`` and the ``direct-io`` parameter (QEMU 9.1 ``migrate_direct_io``) they
write through an ``O_DIRECT`` descriptor.
The threads belong to the channel and are joined by :meth:`close`.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from pyvm.migration.control.address import FileMigrationAddress, MigrationAddress
from pyvm.migration.control.channel import BATCH_PAGES, Channel, PageRun, StreamChannel, zero_mask
from pyvm.migration.stream import mapped_ram
from pyvm.migration.stream.constants import TARGET_PAGE_BITS, TARGET_PAGE_SIZE
from pyvm.migration.stream.ram_format import StreamBlock
from pyvm.migration.stream.writer import StreamWriter
from pyvm.migration.transports.base import Chunk, TransportError, as_views
from pyvm.migration.transports.file_transport import FileOutgoing

#: pages written per batch and thread (1 MiB, as the byte pipes' batches): precopy
#: accounts and rate-limits between batches, and a batch that takes longer than
#: max-bandwidth's 100 ms window to write would make it wait a whole window more
MAPPED_BATCH_PAGES = BATCH_PAGES

#: Linux IOV_MAX
_IOV_MAX = 1024


@dataclass
class _Region:
    pages_offset: int
    bitmap_offset: int
    length: int
    present: np.ndarray


class MappedRamChannel:
    """A file written by position; ``pipe`` is the opened ``file:`` channel (its descriptor
    and its ``offset`` are used; it is fsynced and closed by :meth:`close`)."""

    def __init__(self, pipe: StreamChannel, origin: int, threads: int = 1,
                 direct_io: bool = False) -> None:
        if not isinstance(pipe.pipe, FileOutgoing):
            raise TransportError("Migration requires seekable transport (e.g. file)")
        self.pipe = pipe.pipe
        self._fd: int = self.pipe.fileno()
        # direct-io: the page threads write through a descriptor of their own opened
        # O_DIRECT (QEMU file.c file_send_channel_create); slots are 4 KiB aligned in the
        # file and in guest RAM, as O_DIRECT wants.  Stream bytes stay buffered.
        self._page_fd = self._fd
        if direct_io:
            try:
                self._page_fd = os.open(self.pipe.filename,
                                        os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
            except OSError as err:
                raise TransportError(f"Could not open '{self.pipe.filename}': "
                                     f"{os.strerror(err.errno or 0)}", errno=err.errno) from err
        self._file_pos = origin          # where the next stream byte goes
        self._logical = 0                # stream bytes written so far
        self._jumps: list[tuple[int, int]] = []   # (stream offset, file offset) still ahead
        self._regions: dict[str, _Region] = {}
        self._bytes = 0
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="mapped-ram") \
            if threads > 1 else None
        self.threads = threads

    # -- Channel -------------------------------------------------------------------------------
    @property
    def bytes_moved(self) -> int:
        return self._bytes

    @property
    def note(self) -> str | None:
        return f"mapped-ram: pages written in place by {self.threads} thread(s)"

    def block_trailer(self, w: StreamWriter, block: StreamBlock) -> None:
        """Write ``block``'s MappedRamHeader into the START section being encoded by ``w``
        (whose bytes follow everything this channel wrote) and plan the jump over the
        block's region."""
        if block.ignored:
            w.raw(mapped_ram.ignored_header().pack())
            return
        logical = self._logical + w.size
        header = mapped_ram.layout(self._file_at(logical), block.length)
        w.raw(header.pack())
        self._jumps.append((logical + mapped_ram.HEADER_SIZE, header.pages_offset + block.length))
        self._regions[block.name] = _Region(header.pages_offset, header.bitmap_offset, block.length,
                                            np.zeros(block.length >> TARGET_PAGE_BITS, dtype=bool))

    def _file_at(self, logical: int) -> int:
        pos, at = self._file_pos, self._logical
        for jump_at, target in self._jumps:
            if jump_at <= logical:
                pos, at = target, jump_at
        return pos + (logical - at)

    def write_stream(self, chunks: Sequence[Chunk]) -> None:
        for view in as_views(chunks):
            data = view.cast("B") if view.format != "B" else view
            start = 0
            while start < data.nbytes:
                if self._jumps and self._jumps[0][0] == self._logical:
                    self._file_pos = self._jumps.pop(0)[1]
                    continue
                end = data.nbytes
                if self._jumps:
                    end = min(end, start + self._jumps[0][0] - self._logical)
                self._pwrite_all(data[start:end], self._file_pos)
                self._file_pos += end - start
                self._logical += end - start
                start = end
        if self._jumps and self._jumps[0][0] == self._logical:
            self._file_pos = self._jumps.pop(0)[1]

    def _pwrite_all(self, data: memoryview, offset: int) -> None:
        try:
            while data.nbytes:
                n = os.pwrite(self._fd, data, offset)
                data, offset = data[n:], offset + n
                self._bytes += n
        except OSError as err:
            raise TransportError(f"Unable to write to file: {os.strerror(err.errno or 0)}",
                                 errno=err.errno) from err

    def send_pages(self, run: PageRun) -> Iterator[tuple[int, int]]:
        region = self._regions.get(run.block.name)
        if region is None:
            raise TransportError(f"RAM block {run.block.name!r} has no mapped-ram region")
        mem = np.frombuffer(run.block.buffer, dtype=np.uint8)
        step = MAPPED_BATCH_PAGES * self.threads
        for s in range(0, run.pages.size, step):
            idx = run.pages[s:s + step]
            zero = zero_mask(mem, idx)
            if run.known_zero is not None:
                zero = zero | run.known_zero[s:s + step]
            region.present[idx[zero]] = False
            data = idx[~zero]
            if data.size:
                self._write_pages(mem, region, data)
                region.present[data] = True
            yield idx.size, int(np.count_nonzero(zero))

    def _write_pages(self, mem: np.ndarray, region: _Region, pages: np.ndarray) -> None:
        """Each run of consecutive pages with one pwritev into its slots; with threads,
        the runs are shared out among them."""
        breaks = np.flatnonzero(np.diff(pages) != 1) + 1
        starts = np.concatenate(([0], breaks))
        ends = np.concatenate((breaks, [pages.size]))
        runs = [(int(pages[a]), int(pages[b - 1]) + 1) for a, b in zip(starts, ends)]
        view = mem.data
        if self._pool is None or len(runs) < 2 and runs[0][1] - runs[0][0] < 64:
            self._bytes += sum(self._write_run(view, region, a, b) for a, b in runs)
            return
        # split long runs so that every thread gets a share
        share = max(64, (sum(b - a for a, b in runs) + self.threads - 1) // self.threads)
        pieces = [(a + k, min(b, a + k + share)) for a, b in runs for k in range(0, b - a, share)]
        self._bytes += sum(self._pool.map(lambda r: self._write_run(view, region, *r), pieces))

    def _write_run(self, view: memoryview, region: _Region, first: int, stop: int) -> int:
        data = view[first << TARGET_PAGE_BITS:stop << TARGET_PAGE_BITS]
        offset = region.pages_offset + (first << TARGET_PAGE_BITS)
        written = 0
        try:
            while data.nbytes:
                n = os.pwritev(self._page_fd, [data[:_IOV_MAX * TARGET_PAGE_SIZE]], offset)
                data, offset, written = data[n:], offset + n, written + n
        except OSError as err:
            raise TransportError(f"Unable to write to file: {os.strerror(err.errno or 0)}",
                                 errno=err.errno) from err
        return written

    def end_round(self) -> None:
        pass

    def flush(self) -> None:
        """ram_save_file_bmap: every block's bitmap to its place."""
        for region in self._regions.values():
            self._pwrite_all(memoryview(mapped_ram.pack_bitmap(region.present, region.length)),
                             region.bitmap_offset)
        self.pipe.flush()

    def shutdown(self) -> None:
        self.pipe.shutdown()

    def close(self) -> None:
        try:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            if self._page_fd != self._fd:
                os.close(self._page_fd)
                self._page_fd = self._fd
        finally:
            self.pipe.close()


def refusal(addr: MigrationAddress, tls: bool, compression: str) -> str | None:
    """QEMU's text when mapped-ram cannot run over ``addr`` (migration.c
    ``migration_channels_and_transport_compatible``, options.c ``migrate_params_check``)."""
    if not isinstance(addr, FileMigrationAddress):
        return "Migration requires seekable transport (e.g. file)"
    if tls or compression != "none":
        return "Mapped-ram only available for non-compressed non-TLS multifd migration"
    return None


def wrap(channel: Channel, threads: int, direct_io: bool = False) -> Channel:
    """The opened ``file:`` channel as a mapped-ram file."""
    if not isinstance(channel, StreamChannel) or not isinstance(channel.pipe, FileOutgoing):
        raise TransportError("Migration requires seekable transport (e.g. file)")
    return MappedRamChannel(channel, channel.pipe.offset, threads, direct_io)


__all__ = ["MAPPED_BATCH_PAGES", "MappedRamChannel", "refusal", "wrap"]
