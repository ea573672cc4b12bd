# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Native kernels of pyvm: dirty-page tracking and page scans.

The write hook is a C function registered with Unicorn (``UC_HOOK_MEM_WRITE``), so no
Python runs for a guest store.  It sets bits in a bitmap shared by every vCPU with an
atomic OR; :meth:`DirtyBitmap.fetch_and_clear` takes the bitmap word by word with an
atomic exchange, so a store racing with a sync is reported in this sync or the next,
never lost.

:class:`HostWriteTracker` is the other way to fill the bitmap, used when the kernel offers
it: the RAM block's host pages are write-protected with userfaultfd in asynchronous mode
(``UFFD_FEATURE_WP_ASYNC``, Linux 6.7), so the first host write to a clean page takes one
minor fault that the kernel resolves by itself, and every later store runs at full speed.
A sync reads and re-protects the written pages with one ``PAGEMAP_SCAN`` ioctl walk
(Documentation/admin-guide/mm/pagemap.rst, Documentation/admin-guide/mm/userfaultfd.rst).
It sees every writer of guest RAM: vCPUs, devices, other threads, the kernel.

``pyvm.fastpath_py`` is the pure-Python/numpy twin with the same API and results;
``pyvm.fastpath`` picks one.  Pages are 4 KiB (x86 TARGET_PAGE_SIZE).
"""

from libc.stdint cimport uint8_t, uint64_t, int64_t, uintptr_t
from libc.string cimport memcmp
from libc.stdlib cimport malloc, free

import os
import threading

import numpy as np
cimport numpy as cnp

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

    /* ---- host write tracking: userfaultfd write-protect (async) + PAGEMAP_SCAN ---- */
    #include <errno.h>
    #include <fcntl.h>
    #include <unistd.h>
    #include <sys/ioctl.h>
    #include <sys/syscall.h>
    #include <linux/userfaultfd.h>

    /* Newer than some installed headers: include/uapi/linux/userfaultfd.h, fs.h (6.7). */
    #define PYVM_UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1ULL << 12)
    #define PYVM_UFFD_FEATURE_WP_UNPOPULATED (1ULL << 13)
    #define PYVM_UFFD_FEATURE_WP_ASYNC (1ULL << 15)
    #define PYVM_PAGE_IS_WRITTEN (1ULL << 1)
    #define PYVM_PM_SCAN_WP_MATCHING (1ULL << 0)
    #define PYVM_PM_SCAN_CHECK_WPASYNC (1ULL << 1)
    typedef struct { uint64_t start, end, categories; } pyvm_page_region;
    typedef struct {
        uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
        uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
    } pyvm_pm_scan_arg;
    #define PYVM_PAGEMAP_SCAN _IOWR('f', 16, pyvm_pm_scan_arg)
    #define PYVM_WP_FEATURES (PYVM_UFFD_FEATURE_WP_ASYNC | PYVM_UFFD_FEATURE_WP_UNPOPULATED \
                              | PYVM_UFFD_FEATURE_WP_HUGETLBFS_SHMEM)

    static int pyvm_uffd_new(void) {
        int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
        if (fd < 0 && errno == EPERM) {
            /* unprivileged_userfaultfd=0: the /dev/userfaultfd node (Linux 6.1) may allow it */
            int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
            if (dev >= 0) {
                fd = ioctl(dev, _IO(0xAA, 0x00), O_CLOEXEC | O_NONBLOCK);   /* USERFAULTFD_IOC_NEW */
                close(dev);
            }
        }
        return fd;
    }

    static int pyvm_uffd_wp(int uffd, uint64_t addr, uint64_t len, int protect) {
        struct uffdio_writeprotect wp;
        wp.range.start = addr;
        wp.range.len = len;
        wp.mode = protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0;
        return ioctl(uffd, UFFDIO_WRITEPROTECT, &wp) < 0 ? -errno : 0;
    }

    /* Register [addr, addr+len) for asynchronous write-protect and protect all of it.
       Returns 0 and the two descriptors, or -errno with nothing left open. */
    static int pyvm_wp_open(uint64_t addr, uint64_t len, int *uffd_out, int *pagemap_out) {
        struct uffdio_api api;
        struct uffdio_register reg;
        int err, uffd, pm;
        uffd = pyvm_uffd_new();
        if (uffd < 0) return -errno;
        memset(&api, 0, sizeof api);
        api.api = UFFD_API;
        api.features = PYVM_WP_FEATURES;
        if (ioctl(uffd, UFFDIO_API, &api) < 0) { err = -errno; close(uffd); return err; }
        memset(&reg, 0, sizeof reg);
        reg.range.start = addr;
        reg.range.len = len;
        reg.mode = UFFDIO_REGISTER_MODE_WP;
        if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0) { err = -errno; close(uffd); return err; }
        pm = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
        if (pm < 0) { err = -errno; close(uffd); return err; }
        err = pyvm_uffd_wp(uffd, addr, len, 1);
        if (err) { close(pm); close(uffd); return err; }
        *uffd_out = uffd;
        *pagemap_out = pm;
        return 0;
    }

    static void pyvm_wp_close(int uffd, int pm, uint64_t addr, uint64_t len) {
        struct uffdio_range range;
        pyvm_uffd_wp(uffd, addr, len, 0);
        range.start = addr;
        range.len = len;
        ioctl(uffd, UFFDIO_UNREGISTER, &range);
        close(pm);
        close(uffd);
    }

    /* Pages of [addr, addr+len) written since the last call: OR them into ``out`` (bit i =
       page i) and write-protect them again, atomically per page table entry.  Returns the
       number of pages found or -errno. */
    static int64_t pyvm_wp_collect(int pm, uint64_t addr, uint64_t len, uint64_t *out) {
        pyvm_page_region vec[256];
        pyvm_pm_scan_arg arg;
        uint64_t start = addr, end = addr + len, p, first, last;
        int64_t found = 0;
        long n, i;
        while (start < end) {
            memset(&arg, 0, sizeof arg);
            arg.size = sizeof arg;
            arg.flags = PYVM_PM_SCAN_WP_MATCHING | PYVM_PM_SCAN_CHECK_WPASYNC;
            arg.start = start;
            arg.end = end;
            arg.vec = (uint64_t)(uintptr_t)vec;
            arg.vec_len = 256;
            arg.category_mask = PYVM_PAGE_IS_WRITTEN;
            arg.return_mask = PYVM_PAGE_IS_WRITTEN;
            n = ioctl(pm, PYVM_PAGEMAP_SCAN, &arg);
            if (n < 0) {
                if (errno == EINTR) continue;
                return -errno;
            }
            for (i = 0; i < n; i++) {
                first = (vec[i].start - addr) >> 12;
                last = (vec[i].end - addr) >> 12;
                found += (int64_t)(last - first);
                for (p = first; p < last; p++)
                    out[p >> 6] |= 1ULL << (p & 63);
            }
            if (arg.walk_end <= start) return -EIO;     /* no progress: never loop forever */
            start = arg.walk_end;
        }
        return found;
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
    ctypedef struct pyvm_stopper:
        int flag
        unsigned int blocks
        unsigned long stops
        uint64_t deadline
        uintptr_t stop_fn
    int pyvm_block_hook_add(uintptr_t fn, void *uc, size_t *hh, pyvm_stopper *s) nogil
    int pyvm_wp_open(uint64_t addr, uint64_t len, int *uffd_out, int *pagemap_out) nogil
    void pyvm_wp_close(int uffd, int pm, uint64_t addr, uint64_t len) nogil
    int64_t pyvm_wp_collect(int pm, uint64_t addr, uint64_t len, uint64_t *out) nogil

cdef extern from "_kernels.h" nogil:
    int pyvm_page_is_zero(const uint8_t *p)
    int pyvm_page_is_zero_early(const uint8_t *p)

IMPLEMENTATION = "cython"
PAGE_SIZE = PAGE_BYTES


cdef class DirtyBitmap:
    """One bit per 4 KiB page of a RAM block; bit set = page written since the last sync."""

    cdef readonly object words          # numpy uint64 array, the storage
    cdef readonly Py_ssize_t npages
    cdef uint64_t *_data
    cdef public object host_tracker     # a HostWriteTracker while one is attached

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
        """Return the bitmap words and clear them; each word is swapped atomically.

        With a :class:`HostWriteTracker` attached, the pages written to host memory since
        the last call are added (and write-protected again) in the same call."""
        out = np.empty(self.words.shape[0], dtype=np.uint64)
        cdef uint64_t[::1] o = out
        cdef Py_ssize_t i, n = o.shape[0]
        with nogil:
            for i in range(n):
                o[i] = pyvm_xchg(&self._data[i])
        if self.host_tracker is not None:
            self.host_tracker.collect_into(out)
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


cdef class HostWriteTracker:
    """Tracks host writes to one RAM block with asynchronous userfaultfd write-protect.

    Construction protects the whole block and attaches to ``bitmap``: from then on
    ``bitmap.fetch_and_clear()`` also returns the pages written since the last call.
    Raises OSError when the kernel or the memory type does not allow it (the caller then
    uses write hooks).  :meth:`detach` unprotects the block and closes the descriptors.
    """

    cdef int _uffd
    cdef int _pagemap
    cdef uint64_t _addr
    cdef uint64_t _len
    cdef readonly DirtyBitmap bitmap
    cdef readonly bint attached
    cdef readonly object lock

    def __cinit__(self, DirtyBitmap bitmap, uintptr_t host_address, uint64_t size):
        cdef int err, uffd = -1, pm = -1
        if size == 0 or size & (PAGE_BYTES - 1) or host_address & (PAGE_BYTES - 1):
            raise ValueError("the range must be whole pages")
        if size // PAGE_BYTES > <uint64_t>bitmap.npages:
            raise ValueError("range beyond the bitmap")
        if bitmap.host_tracker is not None:
            raise ValueError("the bitmap already has a host write tracker")
        with nogil:
            err = pyvm_wp_open(host_address, size, &uffd, &pm)
        if err:
            raise OSError(-err, os.strerror(-err))
        self._uffd, self._pagemap = uffd, pm
        self._addr, self._len = host_address, size
        self.bitmap = bitmap
        self.lock = threading.Lock()    # one scan at a time (scans may come from any thread)
        self.attached = True
        bitmap.host_tracker = self

    def collect_into(self, cnp.ndarray words):
        """OR the pages written since the last call into ``words`` and protect them again."""
        cdef uint64_t[::1] w = words
        cdef int64_t r
        if <uint64_t>w.shape[0] * 64 < self._len // PAGE_BYTES:
            raise ValueError("output too small")
        with self.lock:
            if not self.attached:
                return 0
            with nogil:
                r = pyvm_wp_collect(self._pagemap, self._addr, self._len, &w[0])
        if r < 0:
            raise OSError(-r, os.strerror(-r))
        return r

    def detach(self):
        """Stop tracking; pages written since the last sync stay marked in the bitmap."""
        last = np.zeros(self.bitmap.words.shape[0], dtype=np.uint64)
        cdef uint64_t[::1] w = last
        cdef uint64_t *data = self.bitmap.data_ptr()
        cdef Py_ssize_t i
        cdef int64_t r = 0
        with self.lock:
            if not self.attached:
                return
            self.attached = False
            with nogil:
                r = pyvm_wp_collect(self._pagemap, self._addr, self._len, &w[0])
                pyvm_wp_close(self._uffd, self._pagemap, self._addr, self._len)
                for i in range(w.shape[0]):
                    if w[i]:
                        pyvm_or(&data[i], w[i])
        if self.bitmap.host_tracker is self:
            self.bitmap.host_tracker = None
        if r < 0:
            self.bitmap.mark_all()      # the written set is unknown: never miss a page

    def __dealloc__(self):
        if self.attached:
            pyvm_wp_close(self._uffd, self._pagemap, self._addr, self._len)


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
