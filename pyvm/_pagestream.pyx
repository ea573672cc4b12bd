# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Native kernels of the migration stream's RAM pages.

:class:`RecordBatch` lays out the source's ZERO/PAGE records with the page bytes left in
guest RAM and sends them with ``sendmsg``/``writev``; :func:`load_page_run` applies a run of
records on the destination, straight into guest RAM.  ``pyvm.pagestream_py`` is the
pure-Python twin with the same API and results; ``pyvm.fastpath`` picks one.
"""

from libc.stdint cimport uint8_t, uint64_t, int64_t
from libc.string cimport memcpy, memset
from libc.stdlib cimport malloc, free
from os import strerror as os_strerror

cdef extern from "_kernels.h" nogil:
    int pyvm_page_is_zero(const uint8_t *p)
    int pyvm_page_is_zero_early(const uint8_t *p)
    uint64_t pyvm_load_be64(const uint8_t *p)
    int pyvm_put_page_header(uint8_t *o, uint64_t index, uint64_t flags,
                             const uint8_t *name, int namelen)
    void pyvm_copy_page(uint8_t *d, const uint8_t *s)
    void pyvm_store_fence()

cdef enum:
    PAGE_SHIFT = 12
    PAGE_BYTES = 4096

IMPLEMENTATION = "cython"


# RAM record flags of the migration stream (QEMU migration/ram.c RAM_SAVE_FLAG_*).
cdef enum:
    RAM_ZERO = 0x02
    RAM_PAGE = 0x08
    RAM_CONTINUE = 0x20


cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t writev(int fd, const iovec *iov, int iovcnt)

cdef extern from "<sys/socket.h>" nogil:
    struct msghdr:
        void *msg_name
        unsigned int msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    ssize_t sendmsg(int fd, const msghdr *msg, int flags)
    int MSG_NOSIGNAL

cdef extern from "<errno.h>" nogil:
    int errno
    int EINTR, EAGAIN, EWOULDBLOCK, EINVAL

cdef enum:
    IOV_LIMIT = 1024            # Linux IOV_MAX (<limits.h>)


cdef class RecordBatch:
    """ZERO/PAGE records ready for ``writev``/``sendmsg``, page bytes left in guest RAM.

    :meth:`pack` lays out the records for a list of page indices: headers (be64 offset |
    flags, the counted block name in the first record unless it is CONTINUE) and ZERO
    fill bytes go into the batch's own buffer; each PAGE payload is an iovec pointing
    into the source block.  :meth:`send` then hands the kernel as much as one system call
    takes.  The batch holds the source buffer until it is sent or cleared, so the memory
    cannot go away under it.
    """
    cdef iovec *_iov
    cdef uint8_t *_hdr
    cdef Py_ssize_t _max_pages, _hdr_cap, _niov, _cur
    cdef readonly Py_ssize_t remaining
    cdef object _keep

    def __cinit__(self, Py_ssize_t max_pages=256, Py_ssize_t header_bytes=1 << 20):
        if max_pages < 1 or header_bytes < 512:
            raise ValueError("batch too small")
        self._max_pages = max_pages
        self._hdr_cap = header_bytes
        self._iov = <iovec *>malloc((2 * max_pages + 1) * sizeof(iovec))
        self._hdr = <uint8_t *>malloc(header_bytes)
        if self._iov == NULL or self._hdr == NULL:
            raise MemoryError()
        self._niov = self._cur = self.remaining = 0

    def __dealloc__(self):
        free(self._iov)
        free(self._hdr)

    def clear(self):
        """Forget unsent records and let go of the source buffer."""
        self._niov = self._cur = self.remaining = 0
        self._keep = None

    def pack(self, const uint8_t[::1] src, Py_ssize_t npages, const int64_t[::1] indices,
             Py_ssize_t start, const uint8_t[::1] known_zero, bint scan, const uint8_t[::1] name):
        """Records for ``indices[start:]``: at most ``max_pages`` PAGE records, and as many
        ZERO records as the header buffer holds.

        A page is sent as ZERO when ``known_zero[i]`` is set (the array may be shorter than
        ``indices``, even empty) or, with ``scan``, when it reads as all zero; otherwise as
        PAGE, from ``src`` (the block, ``npages`` pages long).  The first record names the
        block when ``name`` is not empty.  Returns ``(next_start, bytes, zero_pages)``.
        """
        if self.remaining:
            raise ValueError("the batch still holds unsent records")
        cdef Py_ssize_t n = indices.shape[0], nknown = known_zero.shape[0]
        cdef Py_ssize_t i = start, h = 0, seg = 0, pages = 0, zeros = 0, total = 0
        cdef Py_ssize_t namelen = name.shape[0], header
        cdef Py_ssize_t src_pages = src.shape[0] // PAGE_BYTES
        cdef int64_t index
        cdef int bad = 0, is_zero
        cdef uint64_t flags
        if start < 0 or namelen > 255:
            raise ValueError("bad start or block name")
        self._niov = self._cur = 0
        if start >= n:
            return start, 0, 0
        cdef const uint8_t *s = &src[0] if src.shape[0] else NULL
        cdef const uint8_t *nm = &name[0] if namelen else NULL
        cdef uint8_t *o = self._hdr
        cdef iovec *iov = self._iov
        with nogil:
            while i < n:
                index = indices[i]
                if index < 0 or index >= npages:
                    bad = 1
                    break
                is_zero = i < nknown and known_zero[i] != 0
                if not is_zero and index >= src_pages:
                    bad = 2
                    break
                if not is_zero and scan:
                    is_zero = pyvm_page_is_zero_early(s + index * PAGE_BYTES)
                header = 9 + namelen if namelen and i == start else 8
                if h + header + 1 > self._hdr_cap or (not is_zero and pages == self._max_pages):
                    break
                h += pyvm_put_page_header(o + h, index, RAM_ZERO if is_zero else RAM_PAGE,
                                          nm, header - 9 if header != 8 else 0)
                if is_zero:
                    o[h] = 0
                    h += 1
                    zeros += 1
                else:
                    # close the header run, then the page straight from RAM
                    iov[self._niov].iov_base = o + seg
                    iov[self._niov].iov_len = h - seg
                    iov[self._niov + 1].iov_base = <void *>(s + index * PAGE_BYTES)
                    iov[self._niov + 1].iov_len = PAGE_BYTES
                    self._niov += 2
                    seg = h
                    pages += 1
                i += 1
            if h > seg:
                iov[self._niov].iov_base = o + seg
                iov[self._niov].iov_len = h - seg
                self._niov += 1
            total = h + pages * PAGE_BYTES
        if bad == 1:
            self._niov = 0
            raise ValueError(f"page index {indices[i]} beyond the block")
        if bad == 2:
            self._niov = 0
            raise ValueError(f"page {indices[i]} beyond the source buffer")
        self.remaining = total
        self._keep = src if pages else None
        return i, total, zeros

    def send(self, int fd, bint socket=False):
        """One ``sendmsg`` (``socket``: with MSG_NOSIGNAL) or ``writev`` of what is left;
        returns the bytes the kernel took.  BlockingIOError when it took none (a
        non-blocking descriptor), OSError on failure."""
        cdef ssize_t got
        cdef int err = 0
        cdef msghdr msg
        cdef Py_ssize_t count
        if self.remaining == 0:
            return 0
        memset(&msg, 0, sizeof(msg))
        with nogil:
            while True:
                count = self._niov - self._cur
                if count > IOV_LIMIT:
                    count = IOV_LIMIT
                if socket:
                    msg.msg_iov = self._iov + self._cur
                    msg.msg_iovlen = <size_t>count
                    got = sendmsg(fd, &msg, MSG_NOSIGNAL)
                else:
                    got = writev(fd, self._iov + self._cur, <int>count)
                if got >= 0:
                    break
                err = errno
                if err != EINTR:
                    break
        if got < 0:
            if err == EAGAIN or err == EWOULDBLOCK:
                raise BlockingIOError(err, "write would block")
            raise OSError(err, os_strerror(err))
        self.remaining -= got
        cdef Py_ssize_t left = got
        while left and self._cur < self._niov:
            if <size_t>left >= self._iov[self._cur].iov_len:
                left -= self._iov[self._cur].iov_len
                self._cur += 1
            else:
                self._iov[self._cur].iov_base = <uint8_t *>self._iov[self._cur].iov_base + left
                self._iov[self._cur].iov_len -= left
                left = 0
        if self.remaining == 0:
            self._keep = None
        return got


cdef extern from "<sys/mman.h>" nogil:
    int madvise(void *addr, size_t length, int advice)

cdef enum:
    MADV_POPULATE_WRITE = 23    # linux/mman.h (Linux 5.14)

cdef int _populate_works = 1


cdef void _populate(uint8_t *start, size_t length) noexcept nogil:
    global _populate_works
    if _populate_works and madvise(start, length, MADV_POPULATE_WRITE) != 0 and errno == EINVAL:
        _populate_works = 0         # an older kernel: the copies fault the pages in


cdef enum:
    RUN_END = 0                 # anything but a complete CONTINUE PAGE/ZERO record
    RUN_PAGE = 1
    RUN_ZERO = 2


cdef inline int _run_record(const uint8_t *s, Py_ssize_t pos, Py_ssize_t end, uint64_t lim,
                            uint64_t *addr) noexcept nogil:
    """What the record at ``s[pos:end]`` is for a run: RUN_PAGE or RUN_ZERO (a complete
    CONTINUE record below ``lim``; ZERO only with fill byte 0), its page offset in
    ``*addr``; RUN_END for anything else, which ends the run."""
    if end - pos < 8:
        return RUN_END
    cdef uint64_t word = pyvm_load_be64(s + pos)
    cdef uint64_t flags = word & (PAGE_BYTES - 1)
    addr[0] = word - flags
    if addr[0] >= lim:
        return RUN_END
    if flags == RAM_PAGE | RAM_CONTINUE:
        return RUN_PAGE if end - pos >= 8 + PAGE_BYTES else RUN_END
    if flags == RAM_ZERO | RAM_CONTINUE:
        return RUN_ZERO if end - pos >= 9 and s[pos + 8] == 0 else RUN_END
    return RUN_END


cdef void _populate_ahead(const uint8_t *s, Py_ssize_t pos, Py_ssize_t end, uint8_t *d,
                          uint64_t lim, const uint8_t *w) noexcept nogil:
    """Populate, with one madvise per contiguous stretch, the not yet written pages the
    buffered run of PAGE records is about to fill, instead of taking a page fault per page
    during the copies (bench/page_load.py compares the two).  Only pages the run writes
    are touched."""
    cdef uint64_t addr = 0, first = 0, stop = 0
    cdef int kind = _run_record(s, pos, end, lim, &addr)
    while kind != RUN_END:
        if kind == RUN_PAGE:
            if w[addr >> PAGE_SHIFT] == 0:
                if stop != addr or stop == first:
                    if stop != first:
                        _populate(d + first, stop - first)
                    first = addr
                stop = addr + PAGE_BYTES
            pos += 8 + PAGE_BYTES
        else:
            pos += 9
        kind = _run_record(s, pos, end, lim, &addr)
    if stop != first:
        _populate(d + first, stop - first)


def load_page_run(const uint8_t[::1] src, Py_ssize_t pos, uint8_t[::1] dest, Py_ssize_t limit,
                  uint8_t[::1] written=None):
    """Apply the run of ``CONTINUE`` PAGE/ZERO records at ``src[pos:]`` to ``dest``.

    A record is applied only when it is complete in ``src``, its offset is below
    ``limit`` and its page lies inside ``dest``; a ZERO record clears the page unless it
    is already zero, and only with fill byte 0.  ``written``, when given, holds one byte
    per page of ``dest``: 0 means the page is known to be zero, so a ZERO record need not
    even read it (reading untouched memory costs a page fault); PAGE records set it, ZERO
    records clear it.  The run stops before the first record that is incomplete or
    anything else (named block, other flags, bad offset, non-zero fill), leaving it to the
    caller.  Returns ``(pos, normal_pages, zero_pages)``.
    """
    cdef Py_ssize_t end = src.shape[0]
    cdef Py_ssize_t normal = 0, zeros = 0
    cdef uint8_t *w = NULL
    if pos < 0 or pos > end:
        raise ValueError("position beyond the buffer")
    if limit > dest.shape[0] - PAGE_BYTES + 1:
        limit = dest.shape[0] - PAGE_BYTES + 1
    if written is not None:
        if written.shape[0] < dest.shape[0] // PAGE_BYTES:
            raise ValueError("written map shorter than the destination")
        if written.shape[0]:
            w = &written[0]
    if limit <= 0:
        return pos, 0, 0
    cdef const uint8_t *s = &src[0] if end else NULL
    cdef uint8_t *d = &dest[0]
    cdef uint64_t addr = 0, lim = <uint64_t>limit
    cdef int kind
    with nogil:
        if w != NULL:
            _populate_ahead(s, pos, end, d, lim, w)
        kind = _run_record(s, pos, end, lim, &addr)
        while kind != RUN_END:
            if kind == RUN_PAGE:
                pyvm_copy_page(d + addr, s + pos + 8)
                if w != NULL:
                    w[addr >> PAGE_SHIFT] = 1
                pos += 8 + PAGE_BYTES
                normal += 1
            else:
                # only write when needed, so untouched RAM stays unallocated
                if w == NULL or w[addr >> PAGE_SHIFT]:
                    if not pyvm_page_is_zero(d + addr):
                        memset(d + addr, 0, PAGE_BYTES)
                    if w != NULL:
                        w[addr >> PAGE_SHIFT] = 0
                pos += 9
                zeros += 1
            kind = _run_record(s, pos, end, lim, &addr)
        pyvm_store_fence()
    return pos, normal, zeros


