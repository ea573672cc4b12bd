"""The channel precopy writes to: one typed interface for every transport.

Precopy sends three things: stream bytes (headers, sections, device state), runs of
guest RAM pages, and round boundaries.  How pages travel depends on the transport:

- a byte pipe (tcp, unix, fd, exec, file: a :class:`~pyvm.migration.transports.RecordChannel`)
  carries them inside the stream as ``ZERO``/``PAGE`` records of the ``ram`` section,
  laid out natively with the page bytes sent straight from guest RAM
  (:class:`StreamChannel`);
- rdma places them with one-sided writes into the destination's registered RAM and
  marks each round in the stream with ``RAM_SAVE_FLAG_HOOK``, as QEMU's
  ``migration/rdma.c`` does (:class:`PlacementChannel`, over a :class:`PagePlacement`).

Both implement :class:`Channel`; precopy calls them the same way and reads one byte
counter, :attr:`Channel.bytes_moved`, that counts every byte the transport moved --
stream bytes, page payloads however they travelled, and the transport's own control
messages -- so ``transferred``, the bandwidth estimate and ``mbps`` are true on every
transport.  The transports themselves know nothing of the stream format; the record
layout and the hook record come from :mod:`pyvm.migration.stream`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import numpy as np

from pyvm.fastpath import RecordBatch, find_zero_pages_at
from pyvm.migration.stream.constants import RAM_SAVE_FLAG_HOOK, TARGET_PAGE_SIZE
from pyvm.migration.stream.ram_format import RamPageWriter, StreamBlock
from pyvm.migration.transports.base import Chunk, RecordChannel

#: PAGE records per batch written to a byte pipe (1 MiB of page data), and pages per
#: placement call on rdma.
BATCH_PAGES = 256

#: The record that ends an rdma round inside the ``ram`` section (migration/ram.c
#: ``ram_control_before_iterate``/``RAM_SAVE_FLAG_HOOK``).
RAM_HOOK_RECORD = RAM_SAVE_FLAG_HOOK.to_bytes(8, "big")


@dataclass(frozen=True)
class PageRun:
    """Pages of one RAM block to send, in ascending order.

    ``index`` is the block's position among the migrated blocks (both ends list them in
    the same order; rdma names a block by it); ``known_zero[i]``, when given, says page
    ``pages[i]`` is zero without reading it (never populated).
    """

    block: StreamBlock
    index: int
    pages: np.ndarray
    known_zero: np.ndarray | None = None


class Channel(Protocol):
    """What precopy needs of an outgoing migration channel."""

    @property
    def bytes_moved(self) -> int:
        """Every byte moved so far: stream, page payloads, transport control messages."""

    @property
    def note(self) -> str | None:
        """One line worth logging about how the channel runs (rdma: the provider)."""

    def write_stream(self, chunks: Sequence[Chunk]) -> None:
        """Stream bytes, in order; memoryviews are not copied."""

    def send_pages(self, run: PageRun) -> Iterator[tuple[int, int]]:
        """Send ``run``; yields ``(pages, zero pages)`` after each batch has gone out, so
        the caller can account, rate-limit and cancel between batches."""

    def end_round(self) -> None:
        """Every page of this round has landed; called before the section's EOS."""

    def flush(self) -> None:
        """Push out anything buffered."""

    def shutdown(self) -> None:
        """Abort a blocked or future write (any thread)."""

    def close(self) -> None:
        """Release the channel (owning thread); may report a late failure."""


def zero_mask(mem: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """``mask[i]`` True when page ``indices[i]`` of ``mem`` is all zero (scanned natively).

    The scan stops at a page's first non-zero bytes, so data pages cost a cache line or
    two, not the whole page.
    """
    mask = np.zeros(indices.size, dtype=np.uint8)
    if indices.size:
        find_zero_pages_at(mem, np.ascontiguousarray(indices, dtype=np.int64), mask)
    return mask.view(bool)


class StreamChannel:
    """A byte pipe: pages go inside the stream as ZERO/PAGE records."""

    def __init__(self, pipe: RecordChannel) -> None:
        self.pipe = pipe
        self._batch = RecordBatch(BATCH_PAGES)

    @property
    def bytes_moved(self) -> int:
        return self.pipe.bytes_written

    @property
    def note(self) -> str | None:
        return None

    def write_stream(self, chunks: Sequence[Chunk]) -> None:
        self.pipe.writev(chunks)

    def send_pages(self, run: PageRun) -> Iterator[tuple[int, int]]:
        # Each run is a different block, so a fresh record writer names the block in its
        # first record exactly as the encoder would after the section header.  Records
        # are laid out natively (zero pages found on the way), 256 PAGE records or
        # ~100,000 ZERO records at a time, and the pipe writes each batch with
        # writev/sendmsg: headers from the batch's buffer, page bytes from guest RAM.
        records = RamPageWriter()
        start = 0
        while start < run.pages.size:
            end, _, nzero = records.batch_run(self._batch, run.block, run.pages, start,
                                              run.known_zero)
            self.pipe.write_records(self._batch)
            yield end - start, nzero
            start = end

    def end_round(self) -> None:
        pass

    def flush(self) -> None:
        self.pipe.flush()

    def shutdown(self) -> None:
        self.pipe.shutdown()

    def close(self) -> None:
        self.pipe.close()


class PagePlacement(Protocol):
    """A transport that writes pages straight into the destination's RAM (rdma).

    ``block_index`` names a block by its position in the list both ends registered;
    offsets are bytes into the block.
    """

    @property
    def bytes_moved(self) -> int:
        """Stream bytes + placed page bytes + control messages."""

    @property
    def provider(self) -> str: ...

    def writev(self, chunks: Sequence[Chunk]) -> None: ...

    def place_pages(self, block_index: int, page_offsets: np.ndarray, page_size: int) -> None:
        """One-sided writes of these pages (may still be in flight on return)."""

    def place_zero_pages(self, block_index: int, page_offsets: np.ndarray,
                         page_size: int) -> None:
        """Pages known to be zero: filled on the destination without touching memory
        that was never registered."""

    def round_finished(self) -> None:
        """Wait until every placed page has landed and tell the destination."""

    def flush(self) -> None: ...

    def shutdown(self) -> None: ...

    def close(self) -> None: ...


class PlacementChannel:
    """rdma: stream bytes as control messages, pages placed by one-sided writes."""

    def __init__(self, placement: PagePlacement) -> None:
        self.placement = placement

    @property
    def bytes_moved(self) -> int:
        return self.placement.bytes_moved

    @property
    def note(self) -> str | None:
        return f"rdma: libfabric provider {self.placement.provider}"

    def write_stream(self, chunks: Sequence[Chunk]) -> None:
        self.placement.writev(chunks)

    def send_pages(self, run: PageRun) -> Iterator[tuple[int, int]]:
        # Zero pages go as fills (COMPRESS) so unregistered memory stays untouched; no
        # PAGE/ZERO record for these pages enters the stream.
        place = self.placement
        indices = run.pages
        if run.known_zero is not None and run.known_zero.any():
            # All known-zero pages at once: their runs merge into a few fill messages.
            zeros = indices[run.known_zero]
            place.place_zero_pages(run.index, zeros * TARGET_PAGE_SIZE, TARGET_PAGE_SIZE)
            yield zeros.size, zeros.size
            indices = indices[~run.known_zero]
        mem = np.frombuffer(run.block.buffer, dtype=np.uint8)
        for s in range(0, indices.size, BATCH_PAGES):
            idx = indices[s:s + BATCH_PAGES]
            mask = zero_mask(mem, idx)
            offsets = idx * TARGET_PAGE_SIZE
            if mask.any():
                place.place_zero_pages(run.index, offsets[mask], TARGET_PAGE_SIZE)
            if not mask.all():
                place.place_pages(run.index, offsets[~mask], TARGET_PAGE_SIZE)
            yield idx.size, int(np.count_nonzero(mask))

    def end_round(self) -> None:
        self.placement.round_finished()
        self.placement.writev([RAM_HOOK_RECORD])

    def flush(self) -> None:
        self.placement.flush()

    def shutdown(self) -> None:
        self.placement.shutdown()

    def close(self) -> None:
        self.placement.close()


__all__ = ["BATCH_PAGES", "Channel", "PageRun", "PagePlacement", "PlacementChannel",
           "RAM_HOOK_RECORD", "StreamChannel", "zero_mask"]
