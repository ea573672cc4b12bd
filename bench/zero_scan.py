"""Zero-page scan speed vs. memcpy of the same buffer, measured in one run.

    .venv/bin/python bench/zero_scan.py [--size-mib 1024]

Prints GB/s for pyvm's zero-page scan (native and, on a smaller slice, the numpy twin)
next to numpy's memcpy (``np.copyto``) of the same buffer; the last line is
``ratio=<scan/memcpy>`` (target >= 0.5).  Half the pages are zero, half carry one
non-zero byte at a random position so the scan cannot stop early everywhere.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from pyvm import fastpath_py
from pyvm.fastpath import IMPLEMENTATION, impl

PAGE = 4096


def best_of(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    size = args.size_mib << 20
    npages = size // PAGE
    buf = np.zeros(size, dtype=np.uint8)
    rng = np.random.default_rng(0)
    dirty = rng.choice(npages, npages // 2, replace=False)
    buf[dirty * PAGE + rng.integers(0, PAGE, dirty.size)] = 1
    dst = np.empty_like(buf)
    out = np.zeros(npages, dtype=np.uint8)
    gb = size / 1e9

    t_copy = best_of(lambda: np.copyto(dst, buf), args.repeat)
    t_scan = best_of(lambda: impl.find_zero_pages(buf, 0, npages, out), args.repeat)
    assert int(out.sum()) == npages - dirty.size
    small = min(npages, 16384)
    t_py = best_of(lambda: fastpath_py.find_zero_pages(buf, 0, small, out), 1)
    print(f"buffer: {args.size_mib} MiB, {npages} pages, half zero")
    print(f"memcpy (numpy copyto):   {gb / t_copy:7.2f} GB/s")
    print(f"zero scan ({IMPLEMENTATION}):     {gb / t_scan:7.2f} GB/s")
    print(f"zero scan (numpy twin):  {small * PAGE / 1e9 / t_py:7.2f} GB/s  (on {small * PAGE >> 20} MiB)")
    print(f"ratio={t_copy / t_scan:.2f}")


if __name__ == "__main__":
    main()
