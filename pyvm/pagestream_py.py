"""Pure-Python twin of :mod:`pyvm._pagestream`: the migration stream's RAM page records.

Same API and results as the Cython module, one record at a time; ``pyvm.fastpath``
picks one.
"""

from __future__ import annotations

import os
import struct
from typing import Any

import numpy as np

IMPLEMENTATION = "python"
PAGE_SIZE = 4096

# RAM record flags of the migration stream (QEMU migration/ram.c RAM_SAVE_FLAG_*).
_RAM_ZERO = 0x02
_RAM_PAGE = 0x08
_RAM_CONTINUE = 0x20
_BE64 = struct.Struct(">Q")
_ZERO_PAGE = bytes(PAGE_SIZE)


class RecordBatch:
    """See :class:`pyvm._pagestream.RecordBatch`: the records as a list of byte views."""

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
    """See :func:`pyvm._pagestream.load_page_run`: one record at a time in Python."""
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


