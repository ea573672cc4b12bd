"""Pure-Python/numpy twin of :mod:`pyvm._fastpath`: same API, same answers, slower.

Used when the Cython extension is not built, or when ``PYVM_PURE_PYTHON=1``.  The write
hook here is a Python Unicorn callback, so every guest store into tracked RAM runs Python
(the benchmark in bench/dirty_tracking.py shows what that costs).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

IMPLEMENTATION = "python"
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
_UC_HOOK_MEM_WRITE = 1 << 11


class DirtyBitmap:
    """One bit per 4 KiB page; a lock makes fetch-and-clear atomic against the hook."""

    def __init__(self, npages: int) -> None:
        if npages < 0:
            raise ValueError("npages must be >= 0")
        self.npages = npages
        self.words = np.zeros(max(1, (npages + 63) // 64), dtype=np.uint64)
        self._lock = threading.Lock()

    def _set_pages(self, first: int, last: int) -> None:
        for p in range(first, last + 1):
            self.words[p >> 6] |= np.uint64(1 << (p & 63))

    def mark_range(self, offset: int, length: int) -> None:
        if length == 0:
            return
        first, last = offset >> PAGE_SHIFT, (offset + length - 1) >> PAGE_SHIFT
        if last >= self.npages:
            raise ValueError("range beyond the bitmap")
        with self._lock:
            self._set_pages(first, last)

    def mark_all(self) -> None:
        with self._lock:
            if self.npages:
                self._set_pages(0, self.npages - 1)

    def fetch_and_clear(self) -> np.ndarray:
        with self._lock:
            out = self.words.copy()
            self.words[:] = 0
        return out

    def count(self) -> int:
        return int(np.unpackbits(self.words.view(np.uint8)).sum())


class WriteTracker:
    """A Python ``UC_HOOK_MEM_WRITE`` callback marking pages of one RAM block."""

    def __init__(self, uc: Any, bitmap: DirtyBitmap, base: int, size: int) -> None:
        self.bitmap = bitmap
        self._uc = uc
        end = base + size - 1

        def hook(_uc: Any, _access: int, address: int, wsize: int, _value: int, _ud: Any) -> None:
            if base <= address <= end:
                off = address - base
                last = min(off + max(wsize, 1) - 1, size - 1)
                with bitmap._lock:
                    bitmap._set_pages(off >> PAGE_SHIFT, last >> PAGE_SHIFT)

        self._hook = hook           # keep the callback alive
        self._hh = uc.hook_add(_UC_HOOK_MEM_WRITE, hook, None, base, end)
        self.attached = True

    def detach(self) -> None:
        if self.attached:
            self._uc.hook_del(self._hh)
            self.attached = False


def find_zero_pages(buf: Any, first_page: int, npages: int, out: Any) -> int:
    mem = np.frombuffer(buf, dtype=np.uint8)
    if first_page < 0 or npages < 0 or (first_page + npages) * PAGE_SIZE > mem.size:
        raise ValueError("page range beyond the buffer")
    o = np.frombuffer(out, dtype=np.uint8) if not isinstance(out, np.ndarray) else out
    if o.size < npages:
        raise ValueError("output too small")
    if npages == 0:
        return 0
    pages = mem[first_page * PAGE_SIZE:(first_page + npages) * PAGE_SIZE].view(np.uint64)
    zero = ~pages.reshape(npages, PAGE_SIZE // 8).any(axis=1)
    o[:npages] = zero
    return int(zero.sum())


def find_zero_pages_at(buf: Any, indices: Any, out: Any) -> int:
    mem = np.frombuffer(buf, dtype=np.uint8)
    idx = np.asarray(indices, dtype=np.int64)
    o = np.frombuffer(out, dtype=np.uint8) if not isinstance(out, np.ndarray) else out
    if o.size < idx.size:
        raise ValueError("output too small")
    npages = mem.size // PAGE_SIZE
    if idx.size and (idx.min() < 0 or idx.max() >= npages):
        raise ValueError("page index beyond the buffer")
    if idx.size == 0:
        return 0
    pages = mem[:npages * PAGE_SIZE].view(np.uint64).reshape(npages, PAGE_SIZE // 8)
    zero = ~pages[idx].any(axis=1)
    o[:idx.size] = zero
    return int(zero.sum())


def bitmap_to_indices(words: Any, npages: int) -> np.ndarray:
    w = np.ascontiguousarray(words, dtype=np.uint64)
    bits = np.unpackbits(w.view(np.uint8), bitorder="little")[:npages]
    return np.flatnonzero(bits).astype(np.int64)


def pages_equal(a: Any, b: Any) -> bool:
    return bytes(memoryview(a)) == bytes(memoryview(b))


class SliceStopper:
    """Twin of the native block-hook stopper: a Python ``UC_HOOK_BLOCK`` callback."""

    def __init__(self, uc: Any) -> None:
        self._uc = uc
        self._flag = False
        self._blocks = 0
        self._deadline = 1 << 64
        self.stops = 0

        def hook(uc_: Any, _address: int, _size: int, _ud: Any) -> None:
            stop = False
            if self._flag:
                self._flag = False
                stop = True
            else:
                self._blocks += 1
                stop = self._blocks % 256 == 0 and time.monotonic_ns() >= self._deadline
            if stop:
                self.stops += 1
                uc_.emu_stop()

        self._hook = hook
        self._hh = uc.hook_add(1 << 3, hook)    # UC_HOOK_BLOCK
        self.attached = True

    def request(self) -> None:
        self._flag = True

    def clear(self) -> None:
        self._flag = False

    def set_deadline(self, monotonic_ns: int) -> None:
        self._deadline = monotonic_ns

    def detach(self) -> None:
        if self.attached:
            self._uc.hook_del(self._hh)
            self.attached = False
