"""Pure-Python/numpy twin of :mod:`pyvm._fastpath`: same API, same answers, slower.

Used when the Cython extension is not built, or when ``PYVM_PURE_PYTHON=1``.  The write
hook here is a Python Unicorn callback, so every guest store into tracked RAM runs Python
(the benchmark in bench/dirty_tracking.py shows what that costs).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
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
        self.host_tracker: HostWriteTracker | None = None

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
        if self.host_tracker is not None:
            self.host_tracker.collect_into(out)
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


# -- host write tracking (twin of pyvm._fastpath.HostWriteTracker) ---------------------------
# include/uapi/linux/userfaultfd.h and include/uapi/linux/fs.h (PAGEMAP_SCAN, Linux 6.7)
_SYS_USERFAULTFD = 323                  # x86_64
_UFFD_API = 0xAA
_UFFD_FEATURES = (1 << 15) | (1 << 13) | (1 << 12)     # WP_ASYNC | WP_UNPOPULATED | WP_HUGETLBFS_SHMEM
_UFFDIO_API = 0xC018AA3F                # _IOWR(0xAA, 0x3F, struct uffdio_api)
_UFFDIO_REGISTER = 0xC020AA00           # _IOWR(0xAA, 0x00, struct uffdio_register)
_UFFDIO_UNREGISTER = 0x8010AA01         # _IOR(0xAA, 0x01, struct uffdio_range)
_UFFDIO_WRITEPROTECT = 0xC018AA06       # _IOWR(0xAA, 0x06, struct uffdio_writeprotect)
_USERFAULTFD_IOC_NEW = 0xAA00           # _IO(0xAA, 0x00), on /dev/userfaultfd
_UFFDIO_REGISTER_MODE_WP = 1 << 1
_PAGEMAP_SCAN = 0xC0606610              # _IOWR('f', 16, struct pm_scan_arg)
_PM_SCAN_FLAGS = (1 << 0) | (1 << 1)    # PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC
_PAGE_IS_WRITTEN = 1 << 1
_VEC_LEN = 256

_libc = ctypes.CDLL(None, use_errno=True)


def _uffd_new() -> int:
    fd = int(_libc.syscall(_SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK))
    if fd < 0:
        err = ctypes.get_errno()
        if err == errno.EPERM:
            try:
                dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                raise OSError(err, os.strerror(err)) from None
            try:
                return fcntl.ioctl(dev, _USERFAULTFD_IOC_NEW, os.O_CLOEXEC | os.O_NONBLOCK)
            finally:
                os.close(dev)
        raise OSError(err, os.strerror(err))
    return fd


class HostWriteTracker:
    """Asynchronous userfaultfd write-protect over one RAM block, read with PAGEMAP_SCAN."""

    def __init__(self, bitmap: DirtyBitmap, host_address: int, size: int) -> None:
        if size <= 0 or size % PAGE_SIZE or host_address % PAGE_SIZE:
            raise ValueError("the range must be whole pages")
        if size // PAGE_SIZE > bitmap.npages:
            raise ValueError("range beyond the bitmap")
        if bitmap.host_tracker is not None:
            raise ValueError("the bitmap already has a host write tracker")
        self._addr, self._len = host_address, size
        uffd = _uffd_new()
        try:
            fcntl.ioctl(uffd, _UFFDIO_API, bytearray(struct.pack("<QQQ", _UFFD_API, _UFFD_FEATURES, 0)))
            fcntl.ioctl(uffd, _UFFDIO_REGISTER, bytearray(
                struct.pack("<QQQQ", host_address, size, _UFFDIO_REGISTER_MODE_WP, 0)))
            pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            os.close(uffd)
            raise
        try:
            self._protect(uffd, True)
        except OSError:
            os.close(pagemap)
            os.close(uffd)
            raise
        self._uffd, self._pagemap = uffd, pagemap
        self._vec = (ctypes.c_uint64 * (3 * _VEC_LEN))()
        self.bitmap = bitmap
        self.lock = threading.Lock()
        self.attached = True
        bitmap.host_tracker = self

    def _protect(self, uffd: int, on: bool) -> None:
        fcntl.ioctl(uffd, _UFFDIO_WRITEPROTECT,
                    bytearray(struct.pack("<QQQ", self._addr, self._len, 1 if on else 0)))

    def _collect(self, words: np.ndarray) -> int:
        start, end, found = self._addr, self._addr + self._len, 0
        vec = self._vec
        while start < end:
            arg = bytearray(struct.pack("<12Q", 96, _PM_SCAN_FLAGS, start, end, 0,
                                        ctypes.addressof(vec), _VEC_LEN, 0, 0,
                                        _PAGE_IS_WRITTEN, 0, _PAGE_IS_WRITTEN))
            try:
                n = fcntl.ioctl(self._pagemap, _PAGEMAP_SCAN, arg)
            except InterruptedError:
                continue
            for i in range(n):
                first = (vec[3 * i] - self._addr) >> PAGE_SHIFT
                last = (vec[3 * i + 1] - self._addr) >> PAGE_SHIFT
                found += last - first
                pages = np.arange(first, last, dtype=np.uint64)
                np.bitwise_or.at(words, (pages >> np.uint64(6)).astype(np.intp),
                                 np.left_shift(np.uint64(1), pages & np.uint64(63)))
            walk_end = struct.unpack_from("<Q", arg, 32)[0]
            if walk_end <= start:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            start = walk_end
        return found

    def collect_into(self, words: np.ndarray) -> int:
        """OR the pages written since the last call into ``words`` and protect them again."""
        if words.shape[0] * 64 < self._len // PAGE_SIZE:
            raise ValueError("output too small")
        with self.lock:
            if not self.attached:
                return 0
            return self._collect(words)

    def detach(self) -> None:
        """Stop tracking; pages written since the last sync stay marked in the bitmap."""
        last = np.zeros(self.bitmap.words.shape[0], dtype=np.uint64)
        with self.lock:
            if not self.attached:
                return
            self.attached = False
            try:
                self._collect(last)
                failed = False
            except OSError:
                failed = True
            try:
                self._protect(self._uffd, False)
                fcntl.ioctl(self._uffd, _UFFDIO_UNREGISTER,
                            bytearray(struct.pack("<QQ", self._addr, self._len)))
            except OSError:
                pass
            os.close(self._pagemap)
            os.close(self._uffd)
        if self.bitmap.host_tracker is self:
            self.bitmap.host_tracker = None
        if failed:
            self.bitmap.mark_all()
        else:
            with self.bitmap._lock:
                self.bitmap.words |= last
