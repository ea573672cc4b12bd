"""The ``xbzrle`` capability on a byte pipe: pages sent as deltas against a page cache.

QEMU's algorithm (migration/ram.c ``save_xbzrle_page``, migration/page_cache.c):

- the first pass over RAM sends pages as usual; once it is complete, xbzrle starts;
- from then on a dirty page missing from the cache is put in it and sent whole (a cache
  miss); a cached page is encoded against its cached copy (migration/xbzrle.c) and sent as
  an ``XBZRLE`` record, or whole when the encoding would exceed a page (an overflow), or
  not at all when nothing changed; the cache then holds what was sent;
- zero pages are still ``ZERO`` records, and put in the cache as zero pages;
- in the last stage (VM stopped) nothing is inserted any more.

The cache is direct-mapped with ``xbzrle-cache-size / 4096`` slots (a power of two, as
``migrate-set-parameters`` insists); a slot keeps its page for two dirty-sync
generations before another page may replace it.

The decision and the record layout run natively a batch at a time
(:func:`pyvm.xbzrle.pack_pages`); page bytes are copied into the batch buffer (from the
cache when the page is cached, as QEMU sends them), and the pipe writes the batch with one
``writev``.  :class:`XbzrleChannel` wraps a :class:`StreamChannel` and keeps QEMU's
``xbzrle-cache`` statistics (:class:`XbzrleCounters`).
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterator, Sequence

import numpy as np

from pyvm.migration.control.channel import Channel, PageRun, StreamChannel
from pyvm.migration.control.status import MigrationStats, XbzrleCacheStats
from pyvm.migration.stream.constants import TARGET_PAGE_BITS, TARGET_PAGE_SIZE
from pyvm.migration.transports.base import Chunk
from pyvm.xbzrle import COUNTERS, RECORD_ROOM, pack_pages

#: bytes of records laid out per batch (about 256 whole pages)
BATCH_BYTES = 1 << 20

#: migration/ram.c migration_update_rates: rates are recomputed once a period this long
RATE_PERIOD = 1.0

_NO_PAGES = np.zeros(0, dtype=np.uint8)
_IDX = {name: i for i, name in enumerate(COUNTERS)}


class XbzrleCounters:
    """QEMU's ``xbzrle_counters`` for ``query-migrate``: totals and per-period rates."""

    def __init__(self, cache_size: int) -> None:
        self.lock = threading.Lock()
        self.stats = XbzrleCacheStats(cache_size=cache_size)
        self._prev_pages = self._prev_bytes = self._prev_miss = self._prev_handled = 0
        self.handled = 0          # pages the channel decided about (QEMU target_page_count)
        self._period_start = time.monotonic()

    def add(self, counters: np.ndarray, handled: int) -> None:
        with self.lock:
            s = self.stats
            s.pages += int(counters[_IDX["hits"]])
            s.bytes += int(counters[_IDX["bytes"]])
            s.cache_miss += int(counters[_IDX["cache_miss"]])
            s.overflow += int(counters[_IDX["overflow"]])
            self.handled += handled

    def update_rates(self, force: bool = False) -> None:
        """migration_update_rates: miss rate and encoding rate over the period just ended."""
        now = time.monotonic()
        with self.lock:
            if not force and now - self._period_start < RATE_PERIOD:
                return
            page_count = self.handled - self._prev_handled
            if page_count == 0:
                return
            s = self.stats
            s.cache_miss_rate = (s.cache_miss - self._prev_miss) / page_count
            unencoded = (s.pages - self._prev_pages) * TARGET_PAGE_SIZE
            encoded = s.bytes - self._prev_bytes
            s.encoding_rate = 0.0 if s.pages == self._prev_pages or not encoded \
                else unencoded / encoded
            self._prev_miss, self._prev_pages, self._prev_bytes = s.cache_miss, s.pages, s.bytes
            self._prev_handled = self.handled
            self._period_start = now

    def snapshot(self) -> XbzrleCacheStats:
        with self.lock:
            return XbzrleCacheStats(**vars(self.stats))


class PageCache:
    """migration/page_cache.c: direct-mapped, ``size // 4096`` slots of one page each."""

    def __init__(self, size: int) -> None:
        slots = size >> TARGET_PAGE_BITS
        if slots < 1 or slots & (slots - 1):
            raise ValueError("number of pages is not a power of two")
        # np.zeros maps fresh memory: slots cost RAM only once they are filled
        self.data = np.zeros(slots << TARGET_PAGE_BITS, dtype=np.uint8)
        self.addr = np.full(slots, -1, dtype=np.int64)
        self.age = np.zeros(slots, dtype=np.uint64)


class XbzrleChannel:
    """A :class:`StreamChannel` whose pages go through the xbzrle cache.

    ``generation()`` is the dirty-sync count (the cache's age), ``last_stage()`` tells
    whether the VM is stopped for the final pass; ``stats`` are precopy's RAM statistics,
    whose ``normal`` count is corrected for pages that were encoded or skipped (precopy
    counts every non-zero page it hands over as normal).
    """

    def __init__(self, inner: StreamChannel, cache_size: int, counters: XbzrleCounters,
                 stats: MigrationStats, generation: Callable[[], int],
                 last_stage: Callable[[], bool]) -> None:
        self.inner = inner
        self.cache = PageCache(cache_size)
        self.counters = counters
        self.stats = stats
        self.generation = generation
        self.last_stage = last_stage
        self.started = False
        self._bases: dict[str, int] = {}
        self._next_base = 0
        self._out = np.zeros(BATCH_BYTES + RECORD_ROOM, dtype=np.uint8)

    @property
    def bytes_moved(self) -> int:
        return self.inner.bytes_moved

    @property
    def note(self) -> str | None:
        return None

    def write_stream(self, chunks: Sequence[Chunk]) -> None:
        self.inner.write_stream(chunks)

    def _base(self, name: str, length: int) -> int:
        """The block's first page number in the cache's address space (ram_addr_t)."""
        base = self._bases.get(name)
        if base is None:
            base = self._bases[name] = self._next_base
            self._next_base += length >> TARGET_PAGE_BITS
        return base

    def send_pages(self, run: PageRun) -> Iterator[tuple[int, int]]:
        block = run.block
        src = np.frombuffer(block.buffer, dtype=np.uint8)
        indices = np.ascontiguousarray(run.pages, dtype=np.int64)
        known = _NO_PAGES if run.known_zero is None else run.known_zero.view(np.uint8)
        base = self._base(block.name, block.length)
        gen, last = self.generation(), self.last_stage()
        cache = self.cache
        # each run names its block in its first record, as StreamChannel's do
        name = np.frombuffer(block.name.encode(), dtype=np.uint8)
        start = 0
        while start < indices.size:
            counters = np.zeros(len(COUNTERS), dtype=np.int64)
            end, nbytes = pack_pages(src, block.length >> TARGET_PAGE_BITS, indices, start, known,
                                     name, cache.data, cache.addr,
                                     cache.age, base, gen, self.started, last, self._out, counters)
            if nbytes:
                self.inner.pipe.writev([self._out[:nbytes].data])
                name = _NO_PAGES
            self.counters.add(counters, end - start)
            zero = int(counters[_IDX["zero"]])
            # precopy counts npages - zero as normal; encoded and skipped pages are not
            self.stats.normal -= int(counters[_IDX["encoded"]] + counters[_IDX["skipped"]])
            yield end - start, zero
            start = end

    def end_round(self) -> None:
        self.inner.end_round()
        # migration/ram.c find_dirty_block: after the first complete pass, xbzrle starts
        self.started = True
        self.counters.update_rates(force=self.last_stage())

    def flush(self) -> None:
        self.inner.flush()

    def shutdown(self) -> None:
        self.inner.shutdown()

    def close(self) -> None:
        self.inner.close()


def wrap(channel: Channel, cache_size: int, counters: XbzrleCounters, stats: MigrationStats,
         generation: Callable[[], int], last_stage: Callable[[], bool]) -> Channel:
    """``channel`` with xbzrle when it is a byte pipe; rdma places pages itself and keeps
    sending them whole (QEMU's rdma hook takes pages before xbzrle is consulted)."""
    if isinstance(channel, StreamChannel):
        return XbzrleChannel(channel, cache_size, counters, stats, generation, last_stage)
    return channel


__all__ = ["BATCH_BYTES", "PageCache", "XbzrleChannel", "XbzrleCounters", "wrap"]
