# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Native kernels of pyvm: dirty-page tracking and page scans.

The write hook is a C function registered with Unicorn (``UC_HOOK_MEM_WRITE``), so no
Python runs for a guest store.  It sets bits in a bitmap shared by every vCPU with an
atomic OR; :meth:`DirtyBitmap.fetch_and_clear` takes the bitmap word by word with an
atomic exchange, so a store racing with a sync is reported in this sync or the next,
never lost.

``pyvm.fastpath_py`` is the pure-Python/numpy twin with the same API and results;
``pyvm.fastpath`` picks one.  Pages are 4 KiB (x86 TARGET_PAGE_SIZE).
"""

from libc.stdint cimport uint8_t, uint64_t, int64_t, uintptr_t
from libc.string cimport memcmp, memcpy, memset
from libc.stdlib cimport malloc, free

import numpy as np
cimport numpy as cnp
from os import strerror as os_strerror

cnp.import_array()

cdef enum:
    PAGE_SHIFT = 12
    PAGE_BYTES = 4096

cdef extern from *:
    """
    #include <stdint.h>
    #include <stddef.h>
    #include <time.h>
    #include <string.h>

    /* What the hook needs to know about one RAM block (guest-physical range + bitmap). */
    typedef struct pyvm_track {
        uint64_t *bitmap;
        uint64_t base;      /* guest address of the block */
        uint64_t size;      /* bytes */
    } pyvm_track;

    /* Unicorn's uc_hook_add is variadic; call it through a correctly typed pointer. */
    typedef int (*pyvm_uc_hook_add_t)(void *uc, size_t *hh, int type, void *callback,
                                      void *user_data, uint64_t begin, uint64_t end, ...);
    typedef int (*pyvm_uc_hook_del_t)(void *uc, size_t hh);

    static inline void pyvm_mark_page(uint64_t *bitmap, uint64_t page) {
        uint64_t *word = &bitmap[page >> 6];
        uint64_t bit = 1ULL << (page & 63);
        /* A plain load first: most stores hit an already dirty page. */
        if (!(__atomic_load_n(word, __ATOMIC_RELAXED) & bit))
            __atomic_fetch_or(word, bit, __ATOMIC_RELAXED);
    }

    /* uc_cb_hookmem_t: (uc, type, address, size, value, user_data) */
    static void pyvm_write_hook(void *uc, int type, uint64_t address, int size,
                                int64_t value, void *user_data) {
        pyvm_track *t = (pyvm_track *)user_data;
        uint64_t off, first, last;
        (void)uc; (void)type; (void)value;
        if (address < t->base) return;
        off = address - t->base;
        if (off >= t->size) return;
        first = off >> 12;
        last = (off + (uint64_t)(size > 0 ? size - 1 : 0));
        if (last >= t->size) last = t->size - 1;
        last >>= 12;
        pyvm_mark_page(t->bitmap, first);
        if (last != first) pyvm_mark_page(t->bitmap, last);
    }

    static inline int pyvm_hook_add(uintptr_t fn, void *uc, size_t *hh, pyvm_track *t) {
        /* UC_HOOK_MEM_WRITE = 1 << 11 (unicorn.h, uc_hook_type) */
        return ((pyvm_uc_hook_add_t)fn)(uc, hh, 1 << 11, (void *)pyvm_write_hook, t,
                                        t->base, t->base + t->size - 1);
    }

    static inline int pyvm_hook_del(uintptr_t fn, void *uc, size_t hh) {
        return ((pyvm_uc_hook_del_t)fn)(uc, hh);
    }

    static inline uint64_t pyvm_xchg(uint64_t *word) {
        return __atomic_exchange_n(word, 0, __ATOMIC_ACQ_REL);
    }

    static inline void pyvm_or(uint64_t *word, uint64_t bits) {
        __atomic_fetch_or(word, bits, __ATOMIC_RELAXED);
    }

    /* Time-slice stops.  Unicorn 2.1's asynchronous uc_emu_stop can leave the CPU one
       instruction behind memory (a read-modify-write runs twice on restart), while a stop
       requested from a hook on the emulating thread is exact.  So other threads only
       raise a flag, and this block hook, run at the start of every translation block,
       turns it into uc_emu_stop. */
    typedef int (*pyvm_uc_emu_stop_t)(void *uc);
    typedef struct pyvm_stopper {
        int flag;
        unsigned int blocks;
        unsigned long stops;
        uint64_t deadline;      /* CLOCK_MONOTONIC ns; the run ends after it */
        uintptr_t stop_fn;
    } pyvm_stopper;

    /* uc_cb_hookcode_t: (uc, address, size, user_data).  The deadline is checked every
       256 blocks (tens of microseconds), so no timer thread is needed. */
    static void pyvm_block_hook(void *uc, uint64_t address, uint32_t size, void *user_data) {
        pyvm_stopper *s = (pyvm_stopper *)user_data;
        int stop = 0;
        (void)address; (void)size;
        if (__atomic_load_n(&s->flag, __ATOMIC_RELAXED)
                && __atomic_exchange_n(&s->flag, 0, __ATOMIC_ACQ_REL))
            stop = 1;
        else if ((++s->blocks & 255) == 0) {
            struct timespec ts;
            clock_gettime(CLOCK_MONOTONIC, &ts);
            if ((uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec >= s->deadline)
                stop = 1;
        }
        if (stop) {
            s->stops++;
            ((pyvm_uc_emu_stop_t)s->stop_fn)(uc);
        }
    }

    static inline int pyvm_block_hook_add(uintptr_t fn, void *uc, size_t *hh, pyvm_stopper *s) {
        /* UC_HOOK_BLOCK = 1 << 3 (unicorn.h, uc_hook_type); begin > end: every address */
        return ((pyvm_uc_hook_add_t)fn)(uc, hh, 1 << 3, (void *)pyvm_block_hook, s,
                                        (uint64_t)1, (uint64_t)0);
    }

    /* 1 if the page is all zero.  OR-reduce in 8 lanes so the compiler vectorises. */
    static inline int pyvm_page_is_zero(const uint8_t *p) {
        const uint64_t *w = (const uint64_t *)p;
        uint64_t acc = 0;
        for (int i = 0; i < 512; i += 8)
            acc |= w[i] | w[i+1] | w[i+2] | w[i+3] | w[i+4] | w[i+5] | w[i+6] | w[i+7];
        return acc == 0;
    }

    /* The same answer, but stops at the first non-zero 128-byte stretch (data pages
       usually differ from zero in their first cache lines). */
    static inline int pyvm_page_is_zero_early(const uint8_t *p) {
        const uint64_t *w = (const uint64_t *)p;
        for (int i = 0; i < 512; i += 16) {
            uint64_t acc = 0;
            for (int j = 0; j < 16; j++)
                acc |= w[i + j];
            if (acc)
                return 0;
        }
        return 1;
    }

    /* A big-endian 64-bit word at any alignment (migration stream records). */
    static inline uint64_t pyvm_load_be64(const uint8_t *p) {
        uint64_t v;
        memcpy(&v, p, 8);
        return __builtin_bswap64(v);
    }

    /* One 4 KiB page into guest RAM with non-temporal stores: the destination lines are
       not read first (no read-for-ownership) and do not evict the cache, which makes
       loading a migration stream's pages about twice as fast as memcpy into cold RAM.
       Callers issue pyvm_store_fence() before anyone else may read the page. */
    #if defined(__SSE2__)
    #include <emmintrin.h>
    static inline void pyvm_copy_page(uint8_t *d, const uint8_t *s) {
        if (((uintptr_t)d & 15) != 0) { memcpy(d, s, 4096); return; }
        for (int i = 0; i < 4096; i += 64) {
            __m128i a = _mm_loadu_si128((const __m128i *)(s + i));
            __m128i b = _mm_loadu_si128((const __m128i *)(s + i + 16));
            __m128i c = _mm_loadu_si128((const __m128i *)(s + i + 32));
            __m128i e = _mm_loadu_si128((const __m128i *)(s + i + 48));
            _mm_stream_si128((__m128i *)(d + i), a);
            _mm_stream_si128((__m128i *)(d + i + 16), b);
            _mm_stream_si128((__m128i *)(d + i + 32), c);
            _mm_stream_si128((__m128i *)(d + i + 48), e);
        }
    }
    static inline void pyvm_store_fence(void) { _mm_sfence(); }
    #else
    static inline void pyvm_copy_page(uint8_t *d, const uint8_t *s) { memcpy(d, s, 4096); }
    static inline void pyvm_store_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
    #endif

    static inline void pyvm_store_be64(uint8_t *p, uint64_t v) {
        v = __builtin_bswap64(v);
        memcpy(p, &v, 8);
    }
    """
    ctypedef struct pyvm_track:
        uint64_t *bitmap
        uint64_t base
        uint64_t size
    int pyvm_hook_add(uintptr_t fn, void *uc, size_t *hh, pyvm_track *t) nogil
    int pyvm_hook_del(uintptr_t fn, void *uc, size_t hh) nogil
    uint64_t pyvm_xchg(uint64_t *word) nogil
    void pyvm_or(uint64_t *word, uint64_t bits) nogil
    int pyvm_page_is_zero(const uint8_t *p) nogil
    int pyvm_page_is_zero_early(const uint8_t *p) nogil
    uint64_t pyvm_load_be64(const uint8_t *p) nogil
    void pyvm_store_be64(uint8_t *p, uint64_t v) nogil
    void pyvm_copy_page(uint8_t *d, const uint8_t *s) nogil
    void pyvm_store_fence() nogil
    ctypedef struct pyvm_stopper:
        int flag
        unsigned int blocks
        unsigned long stops
        uint64_t deadline
        uintptr_t stop_fn
    int pyvm_block_hook_add(uintptr_t fn, void *uc, size_t *hh, pyvm_stopper *s) nogil

IMPLEMENTATION = "cython"
PAGE_SIZE = PAGE_BYTES


cdef class DirtyBitmap:
    """One bit per 4 KiB page of a RAM block; bit set = page written since the last sync."""

    cdef readonly object words          # numpy uint64 array, the storage
    cdef readonly Py_ssize_t npages
    cdef uint64_t *_data

    def __cinit__(self, Py_ssize_t npages):
        if npages < 0:
            raise ValueError("npages must be >= 0")
        self.npages = npages
        self.words = np.zeros(max(1, (npages + 63) // 64), dtype=np.uint64)
        cdef uint64_t[::1] view = self.words
        self._data = &view[0]

    cdef uint64_t *data_ptr(self):
        return self._data

    def mark_range(self, uint64_t offset, uint64_t length):
        """Mark the pages covering bytes [offset, offset+length) (non-vCPU writers)."""
        if length == 0:
            return
        cdef uint64_t first = offset >> PAGE_SHIFT
        cdef uint64_t last = (offset + length - 1) >> PAGE_SHIFT
        if last >= <uint64_t>self.npages:
            raise ValueError("range beyond the bitmap")
        cdef uint64_t p
        with nogil:
            for p in range(first, last + 1):
                pyvm_or(&self._data[p >> 6], 1ULL << (p & 63))

    def mark_all(self):
        cdef Py_ssize_t p
        for p in range(self.npages):
            pyvm_or(&self._data[p >> 6], 1ULL << (p & 63))

    def fetch_and_clear(self):
        """Return the bitmap words and clear them; each word is swapped atomically."""
        out = np.empty(self.words.shape[0], dtype=np.uint64)
        cdef uint64_t[::1] o = out
        cdef Py_ssize_t i, n = o.shape[0]
        with nogil:
            for i in range(n):
                o[i] = pyvm_xchg(&self._data[i])
        return out

    def count(self):
        return int(np.unpackbits(self.words.view(np.uint8)).sum())


cdef class _UnicornHook:
    """A hook registered on one Unicorn engine through the C API; :meth:`detach` drops it."""

    cdef size_t _hh
    cdef uintptr_t _uc
    cdef uintptr_t _del_fn
    cdef readonly bint attached

    cdef _added(self, int err, uintptr_t uc_handle, uintptr_t hook_del_fn):
        if err != 0:
            raise RuntimeError(f"uc_hook_add failed with Unicorn error {err}")
        self._uc = uc_handle
        self._del_fn = hook_del_fn
        self.attached = True

    def detach(self):
        cdef int err
        if self.attached:
            err = pyvm_hook_del(self._del_fn, <void *>self._uc, self._hh)
            self.attached = False
            if err != 0:
                raise RuntimeError(f"uc_hook_del failed with Unicorn error {err}")


cdef class WriteTracker(_UnicornHook):
    """The C write hook registered on one Unicorn engine for one RAM block."""

    cdef pyvm_track *_track
    cdef readonly DirtyBitmap bitmap

    def __cinit__(self, uintptr_t uc_handle, uintptr_t hook_add_fn, uintptr_t hook_del_fn,
                  DirtyBitmap bitmap, uint64_t base, uint64_t size):
        self._track = <pyvm_track *>malloc(sizeof(pyvm_track))
        if self._track == NULL:
            raise MemoryError()
        self._track.bitmap = bitmap.data_ptr()
        self._track.base = base
        self._track.size = size
        self.bitmap = bitmap            # keeps the storage alive while the hook can fire
        self._added(pyvm_hook_add(hook_add_fn, <void *>uc_handle, &self._hh, self._track),
                    uc_handle, hook_del_fn)

    def __dealloc__(self):
        # The engine must have dropped the hook (detach) or been closed before this.
        free(self._track)


cdef class SliceStopper(_UnicornHook):
    """Ends an engine's run at the next translation block when asked, from any thread."""

    cdef pyvm_stopper *_s

    def __cinit__(self, uintptr_t uc_handle, uintptr_t hook_add_fn, uintptr_t hook_del_fn,
                  uintptr_t emu_stop_fn):
        self._s = <pyvm_stopper *>malloc(sizeof(pyvm_stopper))
        if self._s == NULL:
            raise MemoryError()
        self._s.flag = 0
        self._s.blocks = 0
        self._s.stops = 0
        self._s.deadline = 0xFFFFFFFFFFFFFFFF
        self._s.stop_fn = emu_stop_fn
        self._added(pyvm_block_hook_add(hook_add_fn, <void *>uc_handle, &self._hh, self._s),
                    uc_handle, hook_del_fn)

    def request(self):
        """Stop the run at the next block boundary (any thread; no GIL needed)."""
        with nogil:
            __atomic_store_n(&self._s.flag, 1, __ATOMIC_RELEASE)

    def clear(self):
        __atomic_store_n(&self._s.flag, 0, __ATOMIC_RELEASE)

    def set_deadline(self, uint64_t monotonic_ns):
        """End runs once time.monotonic_ns() passes ``monotonic_ns`` (checked every 256 blocks)."""
        self._s.deadline = monotonic_ns

    @property
    def stops(self):
        """How many runs this hook has ended so far."""
        return self._s.stops

    def __dealloc__(self):
        free(self._s)


def find_zero_pages(const uint8_t[::1] buf, Py_ssize_t first_page, Py_ssize_t npages,
                    uint8_t[::1] out):
    """out[i] = 1 if page first_page+i of ``buf`` is all zero; returns how many were."""
    if first_page < 0 or npages < 0 or (first_page + npages) * PAGE_BYTES > buf.shape[0]:
        raise ValueError("page range beyond the buffer")
    if out.shape[0] < npages:
        raise ValueError("output too small")
    cdef Py_ssize_t i, zeros = 0
    cdef const uint8_t *base = &buf[0] if buf.shape[0] else NULL
    with nogil:
        for i in range(npages):
            out[i] = pyvm_page_is_zero(base + (first_page + i) * PAGE_BYTES)
            zeros += out[i]
    return zeros


def find_zero_pages_at(const uint8_t[::1] buf, const int64_t[::1] indices, uint8_t[::1] out):
    """out[i] = 1 if page indices[i] of ``buf`` is all zero; returns how many were."""
    cdef Py_ssize_t i, n = indices.shape[0], zeros = 0
    cdef int64_t npages = buf.shape[0] // PAGE_BYTES
    if out.shape[0] < n:
        raise ValueError("output too small")
    for i in range(n):
        if indices[i] < 0 or indices[i] >= npages:
            raise ValueError("page index beyond the buffer")
    if n == 0:
        return 0
    cdef const uint8_t *base = &buf[0]
    with nogil:
        for i in range(n):
            out[i] = pyvm_page_is_zero_early(base + indices[i] * PAGE_BYTES)
            zeros += out[i]
    return zeros


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
    int EINTR, EAGAIN, EWOULDBLOCK

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
                flags = RAM_ZERO if is_zero else RAM_PAGE
                if header == 8:
                    flags |= RAM_CONTINUE
                pyvm_store_be64(o + h, (<uint64_t>index << PAGE_SHIFT) | flags)
                if header != 8:
                    o[h + 8] = <uint8_t>namelen
                    memcpy(o + h + 9, nm, namelen)
                h += header
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
    cdef uint64_t word, flags, addr, lim = <uint64_t>limit
    with nogil:
        while end - pos >= 8:
            word = pyvm_load_be64(s + pos)
            flags = word & (PAGE_BYTES - 1)
            addr = word - flags
            if addr >= lim:
                break
            if flags == RAM_PAGE | RAM_CONTINUE:
                if end - pos < 8 + PAGE_BYTES:
                    break
                pyvm_copy_page(d + addr, s + pos + 8)
                if w != NULL:
                    w[addr >> PAGE_SHIFT] = 1
                pos += 8 + PAGE_BYTES
                normal += 1
            elif flags == RAM_ZERO | RAM_CONTINUE:
                if end - pos < 9 or s[pos + 8] != 0:
                    break
                # only write when needed, so untouched RAM stays unallocated
                if w == NULL or w[addr >> PAGE_SHIFT]:
                    if not pyvm_page_is_zero(d + addr):
                        memset(d + addr, 0, PAGE_BYTES)
                    if w != NULL:
                        w[addr >> PAGE_SHIFT] = 0
                pos += 9
                zeros += 1
            else:
                break
        pyvm_store_fence()
    return pos, normal, zeros


def bitmap_to_indices(const uint64_t[::1] words, Py_ssize_t npages):
    """Indices of the set bits below ``npages``, ascending, as an int64 array."""
    cdef Py_ssize_t i, n = 0, nwords = words.shape[0]
    cdef uint64_t w
    for i in range(nwords):
        n += __builtin_popcountll(words[i])
    out = np.empty(n, dtype=np.int64)
    cdef int64_t[::1] o = out
    cdef Py_ssize_t k = 0
    cdef int b
    with nogil:
        for i in range(nwords):
            w = words[i]
            while w:
                b = __builtin_ctzll(w)
                if i * 64 + b < npages:
                    o[k] = i * 64 + b
                    k += 1
                w &= w - 1
    return out[:k]


def pages_equal(const uint8_t[::1] a, const uint8_t[::1] b):
    """True if the two buffers hold the same bytes."""
    if a.shape[0] != b.shape[0]:
        return False
    if a.shape[0] == 0:
        return True
    cdef int r
    with nogil:
        r = memcmp(&a[0], &b[0], a.shape[0])
    return r == 0


cdef extern from *:
    int __ATOMIC_RELEASE
    void __atomic_store_n(int *ptr, int val, int order) nogil
    int __builtin_popcountll(unsigned long long) nogil
    int __builtin_ctzll(unsigned long long) nogil
