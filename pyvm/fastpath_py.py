"""Pure-Python/numpy twin of :mod:`pyvm._fastpath`: same API, same answers, slower.

Used when the Cython extension is not built, or when ``PYVM_PURE_PYTHON=1``.  The write
hook here is a Python Unicorn callback, so every guest store into tracked RAM runs Python
(the benchmark in bench/dirty_tracking.py shows what that costs).
"""

from __future__ import annotations

import os
import struct
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


# RAM record flags of the migration stream (QEMU migration/ram.c RAM_SAVE_FLAG_*).
_RAM_ZERO = 0x02
_RAM_PAGE = 0x08
_RAM_CONTINUE = 0x20
_BE64 = struct.Struct(">Q")
_ZERO_PAGE = bytes(PAGE_SIZE)


class RecordBatch:
    """See :class:`pyvm._fastpath.RecordBatch`: the records as a list of byte views."""

    def __init__(self, max_pages: int = 256, header_bytes: int = 1 << 20) -> None:
        if max_pages < 1 or header_bytes < 512:
            raise ValueError("batch too small")
        self._max_pages = max_pages
        self._hdr_cap = header_bytes
        self._views: list[memoryview] = []
        self.remaining = 0

    def clear(self) -> None:
        self._views = []
        self.remaining = 0

    def pack(self, src: Any, npages: int, indices: Any, start: int, known_zero: Any, scan: bool,
             name: Any) -> tuple[int, int, int]:
        if self.remaining:
            raise ValueError("the batch still holds unsent records")
        mem = memoryview(src).cast("B")
        idx = np.asarray(indices, dtype=np.int64)
        known = np.frombuffer(known_zero, dtype=np.uint8) if len(known_zero) else np.zeros(0, np.uint8)
        nm = bytes(name)
        if start < 0 or len(nm) > 255:
            raise ValueError("bad start or block name")
        self._views = []
        header = bytearray()
        i, used, pages, zeros, total = start, 0, 0, 0, 0
        src_pages = mem.nbytes // PAGE_SIZE
        while i < idx.size:
            index = int(idx[i])
            if index < 0 or index >= npages:
                self._views = []
                raise ValueError(f"page index {index} beyond the block")
            is_zero = i < known.size and bool(known[i])
            if not is_zero and index >= src_pages:
                self._views = []
                raise ValueError(f"page {index} beyond the source buffer")
            page = mem[index * PAGE_SIZE:(index + 1) * PAGE_SIZE]
            if not is_zero and scan:
                is_zero = not any(page)
            size = 9 + len(nm) if nm and i == start else 8
            if used + size + 1 > self._hdr_cap or (not is_zero and pages == self._max_pages):
                break
            flags = (_RAM_ZERO if is_zero else _RAM_PAGE) | (_RAM_CONTINUE if size == 8 else 0)
            header += _BE64.pack(index << 12 | flags)
            if size != 8:
                header += bytes((len(nm),)) + nm
            used += size
            if is_zero:
                header.append(0)
                used += 1
                zeros += 1
            else:
                self._views += [memoryview(bytes(header)), page]
                total += len(header) + PAGE_SIZE
                header = bytearray()
                pages += 1
            i += 1
        if header:
            self._views.append(memoryview(bytes(header)))
            total += len(header)
        self.remaining = total
        return i, total, zeros

    def send(self, fd: int, socket: bool = False) -> int:
        if not self.remaining:
            return 0
        sent = os.writev(fd, self._views[:1024])
        self.remaining -= sent
        left = sent
        while left:
            size = self._views[0].nbytes
            if left >= size:
                left -= size
                self._views.pop(0)
            else:
                self._views[0] = self._views[0][left:]
                left = 0
        return sent


def load_page_run(src: Any, pos: int, dest: Any, limit: int, written: Any = None) -> tuple[int, int, int]:
    """See :func:`pyvm._fastpath.load_page_run`: one record at a time in Python."""
    s = memoryview(src).cast("B")
    d = memoryview(dest).cast("B")
    w = None if written is None else memoryview(written).cast("B")
    try:
        if w is not None and w.nbytes < d.nbytes // PAGE_SIZE:
            raise ValueError("written map shorter than the destination")
        return _load_page_run(s, pos, d, limit, w)
    finally:                  # no export of the caller's buffers may outlive the call
        s.release()
        d.release()
        if w is not None:
            w.release()


def _load_page_run(s: memoryview, pos: int, d: memoryview, limit: int,
                   w: memoryview | None) -> tuple[int, int, int]:
    end = s.nbytes
    if pos < 0 or pos > end:
        raise ValueError("position beyond the buffer")
    limit = min(limit, d.nbytes - PAGE_SIZE + 1)
    normal = zeros = 0
    if limit <= 0:
        return pos, 0, 0
    while end - pos >= 8:
        (word,) = _BE64.unpack_from(s, pos)
        flags = word & (PAGE_SIZE - 1)
        addr = word - flags
        if addr >= limit:
            break
        if flags == _RAM_PAGE | _RAM_CONTINUE:
            if end - pos < 8 + PAGE_SIZE:
                break
            d[addr:addr + PAGE_SIZE] = s[pos + 8:pos + 8 + PAGE_SIZE]
            if w is not None:
                w[addr >> 12] = 1
            pos += 8 + PAGE_SIZE
            normal += 1
        elif flags == _RAM_ZERO | _RAM_CONTINUE:
            if end - pos < 9 or s[pos + 8] != 0:
                break
            if w is None or w[addr >> 12]:
                if d[addr:addr + PAGE_SIZE] != _ZERO_PAGE:
                    d[addr:addr + PAGE_SIZE] = _ZERO_PAGE
                if w is not None:
                    w[addr >> 12] = 0
            pos += 9
            zeros += 1
        else:
            break
    return pos, normal, zeros


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
