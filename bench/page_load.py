"""What loading a migration stream's pages into guest RAM costs, piece by piece.

    .venv/bin/python bench/page_load.py [--size-mib 256] [--repeat 3]

In one process, on anonymous memory like a destination's guest RAM:

1. memory: populating fresh memory for writing with one ``MADV_POPULATE_WRITE`` vs
   touching it page by page (a page fault each);
2. copy: ``load_page_run`` (pyvm's loader kernel: non-temporal stores) applying buffers
   of PAGE records to populated memory vs a ``memcpy`` per 4 KiB page of the same bytes
   (numpy, headers left out);
3. fresh destination: ``load_page_run`` into memory nothing has touched, with the map of
   written pages (the loader then populates each stretch of pages with one madvise
   before copying) and without it (every page faults during the copy).

Prints seconds (median of ``--repeat``) and ratios of the pairs.
"""

from __future__ import annotations

import argparse
import mmap
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pyvm.fastpath import load_page_run  # noqa: E402

PAGE = 4096
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
BUFFER_PAGES = 256                     # records per buffer, as the destination reads them


def anon(size: int) -> mmap.mmap:
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def record_buffer(data: np.ndarray) -> bytearray:
    """CONTINUE PAGE records for pages 0..BUFFER_PAGES-1, payloads from ``data``.  Applied
    to successive 1 MiB slices of the destination, one buffer stands for the whole stream
    and stays in the cache, as the destination's receive buffer does."""
    out = bytearray()
    for i in range(BUFFER_PAGES):
        out += struct.pack(">Q", i * PAGE | 0x08 | 0x20)
        out += data[i * PAGE:(i + 1) * PAGE].tobytes()
    return out


def timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    size = a.size_mib << 20
    npages = size // PAGE
    payload = np.random.default_rng(1).integers(0, 256, BUFFER_PAGES * PAGE, dtype=np.uint8)
    records = record_buffer(payload)
    chunk = BUFFER_PAGES * PAGE

    def median(make: Callable[[], Callable[[], None]]) -> float:
        return statistics.median(timed(make()) for _ in range(a.repeat))

    def populate() -> Callable[[], None]:
        m = anon(size)
        return lambda: m.madvise(MADV_POPULATE_WRITE)

    def touch() -> Callable[[], None]:
        view = np.frombuffer(anon(size), dtype=np.uint8)

        def run() -> None:
            view[::PAGE] = 1
        return run

    def load(populated: bool, written: bool) -> Callable[[], None]:
        m = anon(size)
        if populated:
            m.madvise(MADV_POPULATE_WRITE)
        dest = np.frombuffer(m, dtype=np.uint8)
        wmap = np.zeros(npages, dtype=np.uint8) if written else None

        def run() -> None:
            for first in range(0, npages, BUFFER_PAGES):
                load_page_run(records, 0, dest[first * PAGE:first * PAGE + chunk], chunk,
                              None if wmap is None else wmap[first:first + BUFFER_PAGES])
        return run

    def numpy_copy() -> Callable[[], None]:
        m = anon(size)
        m.madvise(MADV_POPULATE_WRITE)
        dest = np.frombuffer(m, dtype=np.uint8).reshape(npages, PAGE)
        src = payload.reshape(BUFFER_PAGES, PAGE)

        def run() -> None:
            for first in range(0, npages, BUFFER_PAGES):
                # rows in reverse: numpy copies them one 4 KiB memcpy at a time, as a
                # page-by-page loader would (a single 1 MiB memcpy would use glibc's own
                # non-temporal path)
                dest[first:first + BUFFER_PAGES][::-1] = src
        return run

    t_pop, t_touch = median(populate), median(touch)
    print(f"{a.size_mib} MiB of anonymous memory, median of {a.repeat}")
    print(f"memory: MADV_POPULATE_WRITE {t_pop:.3f} s, touching page by page {t_touch:.3f} s "
          f"(populate/touch {t_pop / t_touch:.2f})")
    t_load, t_np = median(lambda: load(True, False)), median(numpy_copy)
    print(f"copy into populated memory: load_page_run {t_load:.3f} s, memcpy per page {t_np:.3f} s "
          f"(memcpy/load_page_run {t_np / t_load:.2f})")
    t_fresh_map, t_fresh = median(lambda: load(False, True)), median(lambda: load(False, False))
    print(f"fresh destination: load_page_run with the written map (populate ahead) {t_fresh_map:.3f} s, "
          f"without (page faults) {t_fresh:.3f} s (without/with {t_fresh / t_fresh_map:.2f})")


if __name__ == "__main__":
    main()
