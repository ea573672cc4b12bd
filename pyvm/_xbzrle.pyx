# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""XBZRLE, natively: QEMU's page delta encoding and the source's per-batch page decision.

The encoding (QEMU migration/xbzrle.c) describes a new page against an old copy as
alternating runs::

    page  = zrun nzrun | zrun nzrun page
    zrun  = length                    bytes unchanged (only the first may be 0)
    nzrun = length byte...            bytes changed, followed by their new values
    length = ULEB128, at most two bytes (util/cutils.c uleb128_encode_small)

A trailing unchanged run is left out; an unchanged page encodes to nothing (0) and an
encoding that does not fit the destination buffer is an overflow (-1).  QEMU scans a
machine word at a time, which changes its speed, not its output; the overflow checks
sit where QEMU's sit, so a page overflows exactly when QEMU's would.

:func:`pack_pages` makes the source's decision for a batch of dirty pages
(migration/ram.c ``save_zero_page``, ``save_xbzrle_page``, ``save_normal_page``; the
direct-mapped cache is migration/page_cache.c) and lays out their records.
``pyvm.xbzrle_py`` is the pure-Python twin with the same API and results;
``pyvm.xbzrle`` picks one.
"""

from libc.stdint cimport uint8_t, uint16_t, uint64_t, int64_t
from libc.string cimport memcpy, memcmp

cdef extern from "_kernels.h" nogil:
    int pyvm_page_is_zero_early(const uint8_t *p)
    int pyvm_put_page_header(uint8_t *o, uint64_t index, uint64_t flags,
                             const uint8_t *name, int namelen)

IMPLEMENTATION = "cython"

cdef enum:
    PAGE_BYTES = 4096
    MAX_RUN = 0x3fff            # what two ULEB128 bytes hold

# migration/ram.c RAM_SAVE_FLAG_* and ENCODING_FLAG_XBZRLE
cdef enum:
    RAM_ZERO = 0x02
    RAM_PAGE = 0x08
    RAM_XBZRLE = 0x40
    ENCODING_FLAG_XBZRLE = 0x01

# pack_pages counters (indices into the caller's int64 array)
cdef enum:
    C_ZERO = 0                  # ZERO records
    C_NORMAL = 1                # PAGE records
    C_ENCODED = 2               # XBZRLE records
    C_HITS = 3                  # pages found in the cache (QEMU's xbzrle "pages")
    C_BYTES = 4                 # QEMU's xbzrle "bytes"
    C_MISS = 5                  # cache misses
    C_OVERFLOW = 6              # encodings larger than a page
    C_SKIPPED = 7               # unchanged since the cached copy: nothing sent
    NCOUNTERS = 8

cdef enum:
    # room one record may need: header, counted name, encoding header, a page
    RECORD_ROOM = 8 + 1 + 255 + 3 + PAGE_BYTES
    # migration/page_cache.c: a cached page is not replaced for two cycles
    CACHED_PAGE_LIFETIME = 2


cdef inline int _uleb_put(uint8_t *out, uint64_t n) noexcept nogil:
    if n < 0x80:
        out[0] = <uint8_t>n
        return 1
    out[0] = <uint8_t>((n & 0x7f) | 0x80)
    out[1] = <uint8_t>(n >> 7)
    return 2


cdef int _encode(const uint8_t *old, const uint8_t *new, int slen, uint8_t *dst,
                 int dlen) noexcept nogil:
    cdef int i = 0, d = 0, start
    cdef uint64_t zrun = 0, nzrun = 0, a, b
    while i < slen:
        if d + 2 > dlen:
            return -1
        while i + 8 <= slen:
            memcpy(&a, old + i, 8)
            memcpy(&b, new + i, 8)
            if a != b:
                break
            i += 8
            zrun += 8
        while i < slen and old[i] == new[i]:
            i += 1
            zrun += 1
        if zrun == <uint64_t>slen:
            return 0
        if i == slen:
            return d
        d += _uleb_put(dst + d, zrun)
        zrun = 0
        start = i
        if d + 2 > dlen:
            return -1
        while i < slen and old[i] != new[i]:
            i += 1
            nzrun += 1
        d += _uleb_put(dst + d, nzrun)
        if d + <int>nzrun > dlen:
            return -1
        memcpy(dst + d, new + start, nzrun)
        d += nzrun
        nzrun = 0
    return d


cdef inline int _uleb_get(const uint8_t *src, uint64_t *n) noexcept nogil:
    if not (src[0] & 0x80):
        n[0] = src[0]
        return 1
    if src[1] & 0x80:
        return -1               # more than 14 bits
    n[0] = (src[0] & 0x7f) | (<uint64_t>src[1] << 7)
    return 2


cdef int _decode(const uint8_t *src, int slen, uint8_t *dst, int dlen) noexcept nogil:
    cdef int i = 0, d = 0, ret
    cdef uint64_t count = 0
    while i < slen:
        if slen - i < 2:
            return -1
        ret = _uleb_get(src + i, &count)
        if ret < 0 or (i and not count):
            return -1
        i += ret
        d += <int>count
        if d > dlen:
            return -1
        if slen - i < 2:
            return -1
        ret = _uleb_get(src + i, &count)
        if ret < 0 or not count:
            return -1
        i += ret
        if d + <int>count > dlen or i + <int>count > slen:
            return -1
        memcpy(dst + d, src + i, count)
        d += <int>count
        i += <int>count
    return d


def encode(const uint8_t[::1] old, const uint8_t[::1] new, uint8_t[::1] dst):
    """Encode ``new`` against ``old`` (same length, at most 16383 bytes) into ``dst``.

    Returns the encoded length, 0 when nothing changed, -1 when the encoding would not
    fit ``dst`` (QEMU ``xbzrle_encode_buffer``).
    """
    cdef int slen = old.shape[0], r
    if new.shape[0] != slen:
        raise ValueError("old and new differ in length")
    if slen > MAX_RUN:
        raise ValueError("buffer longer than 16383 bytes")
    if slen == 0:
        return 0
    cdef uint8_t dummy = 0
    cdef uint8_t *d = &dst[0] if dst.shape[0] else &dummy
    with nogil:
        r = _encode(&old[0], &new[0], slen, d, <int>dst.shape[0])
    return r


def decode(const uint8_t[::1] src, uint8_t[::1] dst):
    """Apply the encoding ``src`` to ``dst`` in place (bytes outside the runs keep their
    value).  Returns the decoded length, -1 for malformed input (QEMU
    ``xbzrle_decode_buffer``); ``dst`` may be partly written then."""
    cdef int slen = src.shape[0], r
    if slen == 0:
        return 0
    if dst.shape[0] > 0x7fffffff:
        raise ValueError("destination too large")
    cdef uint8_t dummy = 0
    cdef uint8_t *d = &dst[0] if dst.shape[0] else &dummy
    with nogil:
        r = _decode(&src[0], slen, d, <int>dst.shape[0])
    return r


cdef inline int _cache_insert(uint8_t *data, int64_t *addrs, uint64_t *ages, int64_t slot,
                              int64_t addr, const uint8_t *page, uint64_t gen) noexcept nogil:
    """page_cache.c cache_insert; a slot with addr -1 was never filled."""
    if addrs[slot] != -1 and addrs[slot] != addr and ages[slot] + CACHED_PAGE_LIFETIME > gen:
        return -1
    if data + slot * PAGE_BYTES != page:
        memcpy(data + slot * PAGE_BYTES, page, PAGE_BYTES)
    ages[slot] = gen
    addrs[slot] = addr
    return 0


def pack_pages(const uint8_t[::1] src, Py_ssize_t npages, const int64_t[::1] indices,
               Py_ssize_t start, const uint8_t[::1] known_zero, const uint8_t[::1] name,
               uint8_t[::1] cache_data, int64_t[::1] cache_addr, uint64_t[::1] cache_age,
               int64_t base, uint64_t generation, bint started, bint last_stage,
               uint8_t[::1] out, int64_t[::1] counters):
    """Records for ``indices[start:]`` of block ``src`` (``npages`` pages) into ``out``.

    Each page goes as ZERO (``known_zero[i]`` or all zero; with ``started`` a zero page is
    also put in the cache), and otherwise, before ``started``, as PAGE.  Once ``started``
    a page missing from the cache is inserted (unless ``last_stage``) and sent as PAGE; a
    cached page is encoded against its cached copy: XBZRLE record when the encoding fits
    a page, PAGE when it overflows, nothing at all when the page is unchanged.  The cache
    is direct-mapped: slot ``(base + index) % slots``, ``cache_addr`` -1 for a slot never
    filled.  The first record names the block when ``name`` is not empty.  Page bytes are
    copied into ``out`` (from the cache when the page is cached, as QEMU does).

    Stops when ``out`` might not hold one more record.  Adds to ``counters`` (8 int64:
    zero, normal, encoded, hits, bytes, misses, overflows, skipped) and returns
    ``(next_start, bytes)``.
    """
    cdef Py_ssize_t n = indices.shape[0], nknown = known_zero.shape[0]
    cdef Py_ssize_t namelen = name.shape[0], cap = out.shape[0]
    cdef Py_ssize_t src_pages = src.shape[0] // PAGE_BYTES
    cdef int64_t slots = cache_addr.shape[0]
    if start < 0 or namelen > 255:
        raise ValueError("bad start or block name")
    if counters.shape[0] < NCOUNTERS:
        raise ValueError("counters too short")
    if slots < 1 or slots & (slots - 1) or cache_age.shape[0] != slots \
            or cache_data.shape[0] != slots * PAGE_BYTES:
        raise ValueError("cache arrays do not match")
    if start >= n:
        return start, 0
    cdef const uint8_t *s = &src[0] if src.shape[0] else NULL
    cdef const uint8_t *nm = &name[0] if namelen else NULL
    cdef uint8_t *o = &out[0] if cap else NULL
    cdef uint8_t *cd = &cache_data[0]
    cdef int64_t *ca = &cache_addr[0]
    cdef uint64_t *cg = &cache_age[0]
    cdef uint8_t zero_page[PAGE_BYTES]
    cdef uint8_t current[PAGE_BYTES]
    cdef uint8_t encoded[PAGE_BYTES]
    cdef Py_ssize_t i = start, h = 0, header
    cdef int64_t index, addr, slot
    cdef int bad = 0, is_zero, enc, named = namelen == 0
    cdef int64_t c[NCOUNTERS]
    cdef uint64_t kind
    cdef const uint8_t *page
    cdef int k
    for k in range(NCOUNTERS):
        c[k] = 0
    with nogil:
        for k in range(PAGE_BYTES):
            zero_page[k] = 0
        while i < n:
            if h + RECORD_ROOM > cap:
                break
            index = indices[i]
            if index < 0 or index >= npages:
                bad = 1
                break
            is_zero = i < nknown and known_zero[i] != 0
            if not is_zero and index >= src_pages:
                bad = 2
                break
            page = s + index * PAGE_BYTES if not is_zero else zero_page
            if not is_zero:
                is_zero = pyvm_page_is_zero_early(page)
            addr = base + index
            slot = addr & (slots - 1)
            enc = -1
            if is_zero:
                kind = RAM_ZERO
                if started:
                    _cache_insert(cd, ca, cg, slot, addr, zero_page, generation)
            else:
                kind = RAM_PAGE
                if started:
                    if ca[slot] != addr:
                        c[C_MISS] += 1
                        if not last_stage and _cache_insert(cd, ca, cg, slot, addr, page,
                                                            generation) == 0:
                            page = cd + slot * PAGE_BYTES
                    else:
                        cg[slot] = generation
                        c[C_HITS] += 1
                        memcpy(current, page, PAGE_BYTES)
                        enc = _encode(cd + slot * PAGE_BYTES, current, PAGE_BYTES, encoded,
                                      PAGE_BYTES)
                        page = current
                        if not last_stage and enc != 0:
                            memcpy(cd + slot * PAGE_BYTES, current, PAGE_BYTES)
                            page = cd + slot * PAGE_BYTES
                        if enc == 0:
                            c[C_SKIPPED] += 1
                            i += 1
                            continue
                        if enc == -1:
                            c[C_OVERFLOW] += 1
                            c[C_BYTES] += PAGE_BYTES
                        else:
                            kind = RAM_XBZRLE
            header = pyvm_put_page_header(o + h, index, kind, nm, 0 if named else namelen)
            named = 1
            h += header
            if kind == RAM_ZERO:
                o[h] = 0
                h += 1
                c[C_ZERO] += 1
            elif kind == RAM_PAGE:
                memcpy(o + h, page, PAGE_BYTES)
                h += PAGE_BYTES
                c[C_NORMAL] += 1
            else:
                o[h] = ENCODING_FLAG_XBZRLE
                o[h + 1] = <uint8_t>(enc >> 8)
                o[h + 2] = <uint8_t>enc
                memcpy(o + h + 3, encoded, enc)
                h += 3 + enc
                c[C_ENCODED] += 1
                # ram.c: the xbzrle bytes leave out an 8-byte CONTINUE header
                c[C_BYTES] += header + 3 + enc - 8
            i += 1
    if bad == 1:
        raise ValueError(f"page index {indices[i]} beyond the block")
    if bad == 2:
        raise ValueError(f"page {indices[i]} beyond the source buffer")
    for k in range(NCOUNTERS):
        counters[k] += c[k]
    return i, h
