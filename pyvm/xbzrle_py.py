"""Pure-Python twin of :mod:`pyvm._xbzrle`: XBZRLE encoding and the source's page decision.

Same API and results as the Cython module, a byte at a time (QEMU migration/xbzrle.c,
migration/ram.c, migration/page_cache.c); ``pyvm.xbzrle`` picks one.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

IMPLEMENTATION = "python"
PAGE_SIZE = 4096
MAX_RUN = 0x3FFF

_RAM_ZERO = 0x02
_RAM_PAGE = 0x08
_RAM_CONTINUE = 0x20
_RAM_XBZRLE = 0x40
ENCODING_FLAG_XBZRLE = 0x01
RECORD_ROOM = 8 + 1 + 255 + 3 + PAGE_SIZE
CACHED_PAGE_LIFETIME = 2
_BE64 = struct.Struct(">Q")
_ZERO_PAGE = bytes(PAGE_SIZE)

(C_ZERO, C_NORMAL, C_ENCODED, C_HITS, C_BYTES, C_MISS, C_OVERFLOW, C_SKIPPED) = range(8)


def _uleb(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    return bytes(((n & 0x7F) | 0x80, n >> 7))


def _encode(old: bytes, new: bytes, dlen: int) -> bytes | int:
    """The encoding, 0 (unchanged) or -1 (overflow), with QEMU's overflow points."""
    slen = len(old)
    out = bytearray()
    i = 0
    while i < slen:
        if len(out) + 2 > dlen:
            return -1
        start = i
        while i < slen and old[i] == new[i]:
            i += 1
        if i - start == slen:
            return 0
        if i == slen:
            return bytes(out)
        out += _uleb(i - start)
        if len(out) + 2 > dlen:
            return -1
        start = i
        while i < slen and old[i] != new[i]:
            i += 1
        out += _uleb(i - start)
        if len(out) + (i - start) > dlen:
            return -1
        out += new[start:i]
    return bytes(out)


def encode(old: Any, new: Any, dst: Any) -> int:
    """See :func:`pyvm._xbzrle.encode`."""
    a, b = bytes(old), bytes(new)
    if len(a) != len(b):
        raise ValueError("old and new differ in length")
    if len(a) > MAX_RUN:
        raise ValueError("buffer longer than 16383 bytes")
    if not a:
        return 0
    d = memoryview(dst).cast("B")
    try:
        result = _encode(a, b, d.nbytes)
        if isinstance(result, int):
            return result
        d[:len(result)] = result
        return len(result)
    finally:
        d.release()


def _uleb_get(src: bytes, i: int) -> tuple[int, int]:
    if not src[i] & 0x80:
        return src[i], 1
    if src[i + 1] & 0x80:
        return 0, -1
    return (src[i] & 0x7F) | (src[i + 1] << 7), 2


def decode(src: Any, dst: Any) -> int:
    """See :func:`pyvm._xbzrle.decode`."""
    s = bytes(src)
    slen = len(s)
    if not slen:
        return 0
    d = memoryview(dst).cast("B")
    try:
        dlen = d.nbytes
        i = pos = 0
        while i < slen:
            if slen - i < 2:
                return -1
            count, ret = _uleb_get(s, i)
            if ret < 0 or (i and not count):
                return -1
            i += ret
            pos += count
            if pos > dlen:
                return -1
            if slen - i < 2:
                return -1
            count, ret = _uleb_get(s, i)
            if ret < 0 or not count:
                return -1
            i += ret
            if pos + count > dlen or i + count > slen:
                return -1
            d[pos:pos + count] = s[i:i + count]
            pos += count
            i += count
        return pos
    finally:
        d.release()


def _cache_insert(data: np.ndarray, addrs: np.ndarray, ages: np.ndarray, slot: int, addr: int,
                  page: bytes, gen: int) -> bool:
    if addrs[slot] != -1 and addrs[slot] != addr and int(ages[slot]) + CACHED_PAGE_LIFETIME > gen:
        return False
    data[slot * PAGE_SIZE:(slot + 1) * PAGE_SIZE] = np.frombuffer(page, dtype=np.uint8)
    ages[slot] = gen
    addrs[slot] = addr
    return True


def pack_pages(src: Any, npages: int, indices: Any, start: int, known_zero: Any, name: Any,
               cache_data: Any, cache_addr: Any, cache_age: Any, base: int, generation: int,
               started: bool, last_stage: bool, out: Any, counters: Any) -> tuple[int, int]:
    """See :func:`pyvm._xbzrle.pack_pages`: one page at a time in Python."""
    mem = np.frombuffer(src, dtype=np.uint8)
    idx = np.asarray(indices, dtype=np.int64)
    known = np.frombuffer(known_zero, dtype=np.uint8) if len(known_zero) else np.zeros(0, np.uint8)
    nm = bytes(name)
    o = np.frombuffer(out, dtype=np.uint8)
    data = np.frombuffer(cache_data, dtype=np.uint8)
    addrs = np.frombuffer(cache_addr, dtype=np.int64)
    ages = np.frombuffer(cache_age, dtype=np.uint64)
    cnt = np.frombuffer(counters, dtype=np.int64)
    slots = addrs.size
    if start < 0 or len(nm) > 255:
        raise ValueError("bad start or block name")
    if cnt.size < 8:
        raise ValueError("counters too short")
    if slots < 1 or slots & (slots - 1) or ages.size != slots or data.size != slots * PAGE_SIZE:
        raise ValueError("cache arrays do not match")
    if start >= idx.size:
        return start, 0
    c = [0] * 8
    h = 0
    i = start
    named = not nm
    src_pages = mem.size // PAGE_SIZE
    while i < idx.size:
        if h + RECORD_ROOM > o.size:
            break
        index = int(idx[i])
        if index < 0 or index >= npages:
            raise ValueError(f"page index {index} beyond the block")
        is_zero = i < known.size and bool(known[i])
        if not is_zero and index >= src_pages:
            raise ValueError(f"page {index} beyond the source buffer")
        page = _ZERO_PAGE if is_zero else mem[index * PAGE_SIZE:(index + 1) * PAGE_SIZE].tobytes()
        is_zero = is_zero or page == _ZERO_PAGE
        addr = base + index
        slot = addr & (slots - 1)
        payload = b""
        if is_zero:
            kind = _RAM_ZERO
            if started:
                _cache_insert(data, addrs, ages, slot, addr, _ZERO_PAGE, generation)
        else:
            kind = _RAM_PAGE
            payload = page
            if started:
                if addrs[slot] != addr:
                    c[C_MISS] += 1
                    if not last_stage:
                        _cache_insert(data, addrs, ages, slot, addr, page, generation)
                else:
                    ages[slot] = generation
                    c[C_HITS] += 1
                    cached = data[slot * PAGE_SIZE:(slot + 1) * PAGE_SIZE]
                    enc = _encode(cached.tobytes(), page, PAGE_SIZE)
                    if not last_stage and enc != 0:
                        cached[:] = np.frombuffer(page, dtype=np.uint8)
                    if enc == 0:
                        c[C_SKIPPED] += 1
                        i += 1
                        continue
                    if enc == -1:
                        c[C_OVERFLOW] += 1
                        c[C_BYTES] += PAGE_SIZE
                    else:
                        assert isinstance(enc, bytes)
                        kind = _RAM_XBZRLE
                        payload = bytes((ENCODING_FLAG_XBZRLE,)) + len(enc).to_bytes(2, "big") + enc
        record = bytearray(_BE64.pack(index << 12 | kind | (_RAM_CONTINUE if named else 0)))
        if not named:
            record += bytes((len(nm),)) + nm
            named = True
        header = len(record)
        if kind == _RAM_ZERO:
            record.append(0)
            c[C_ZERO] += 1
        elif kind == _RAM_PAGE:
            record += payload
            c[C_NORMAL] += 1
        else:
            record += payload
            c[C_ENCODED] += 1
            c[C_BYTES] += header + len(payload) - 8
        o[h:h + len(record)] = np.frombuffer(bytes(record), dtype=np.uint8)
        h += len(record)
        i += 1
    for k in range(8):
        cnt[k] += c[k]
    return i, h
