"""userfaultfd in MISSING mode: the page-fault side of postcopy on the destination.

A range of guest RAM registered here behaves as if its pages were not there yet: the
first access to a page that has never been populated blocks the accessing thread inside
the kernel and queues a fault event on the descriptor.  Whoever has the page places it
with :meth:`Userfault.copy` (``UFFDIO_COPY``) or :meth:`Userfault.zeropage`
(``UFFDIO_ZEROPAGE``): the kernel installs the page atomically and wakes every thread
waiting on it.  This is what QEMU's ``migration/postcopy-ram.c`` does on the destination
(``ram_block_enable_notify``, ``postcopy_place_page``), described in
``docs/devel/migration/postcopy.rst``; the kernel side is
``Documentation/admin-guide/mm/userfaultfd.rst``.

Rules that follow from the kernel's behaviour:

- A registered page that is already populated never faults; :meth:`Userfault.copy` on it
  fails with ``EEXIST``, reported here as ``False`` (the page was placed before).
- Placing must go through :meth:`copy`/:meth:`zeropage`.  A plain store into a missing
  page from another thread would itself fault and block.
- The fault is taken by whichever thread touches the page.  A thread that holds the
  Python GIL while it touches a missing page (numpy on guest RAM, a device doing DMA)
  blocks every Python thread, including the one that would place the page: only code
  that runs without the GIL (Unicorn's ``emu_start`` is called through ctypes, which
  releases it) may touch registered ranges while pages are still missing.
- Faults raised inside a system call (``read()`` into guest RAM, ``sendmsg()`` from it)
  are kernel-mode faults; with ``UFFD_USER_MODE_ONLY`` (used when the process may not
  handle kernel faults) such a call fails with ``EFAULT`` instead of blocking.

This module is Linux/x86-64 only, pure ctypes + ioctl; :func:`unavailable_reason` says
why it cannot be used on this host.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import struct
from dataclasses import dataclass

PAGE_SIZE = 4096

# include/uapi/linux/userfaultfd.h
_SYS_USERFAULTFD = 323                   # x86_64 (arch/x86/entry/syscalls/syscall_64.tbl)
_UFFD_API = 0xAA
_UFFD_USER_MODE_ONLY = 1                 # flag of the syscall (Linux 5.11)
_USERFAULTFD_IOC_NEW = 0xAA00            # _IO(0xAA, 0x00) on /dev/userfaultfd (Linux 6.1)
UFFD_FEATURE_THREAD_ID = 1 << 8
_UFFDIO_API = 0xC018AA3F                 # _IOWR(0xAA, 0x3F, struct uffdio_api)
_UFFDIO_REGISTER = 0xC020AA00            # _IOWR(0xAA, 0x00, struct uffdio_register)
_UFFDIO_UNREGISTER = 0x8010AA01          # _IOR(0xAA, 0x01, struct uffdio_range)
_UFFDIO_WAKE = 0x8010AA02                # _IOR(0xAA, 0x02, struct uffdio_range)
_UFFDIO_COPY = 0xC028AA03                # _IOWR(0xAA, 0x03, struct uffdio_copy)
_UFFDIO_ZEROPAGE = 0xC020AA04            # _IOWR(0xAA, 0x04, struct uffdio_zeropage)
_UFFDIO_REGISTER_MODE_MISSING = 1 << 0
_UFFDIO_COPY_MODE_DONTWAKE = 1 << 0
_UFFDIO_ZEROPAGE_MODE_DONTWAKE = 1 << 0
# The ioctls a MISSING registration must offer (bits are _UFFDIO_* command numbers).
_NEEDED_IOCTLS = (1 << 0x02) | (1 << 0x03) | (1 << 0x04)     # WAKE, COPY, ZEROPAGE

UFFD_EVENT_PAGEFAULT = 0x12
UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0
_MSG = struct.Struct("<BBHI QQI4x")      # struct uffd_msg: 32 bytes
_MSG_BATCH = 64

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_libc.ioctl.restype = ctypes.c_int


class _UffdioCopy(ctypes.Structure):
    _fields_ = [("dst", ctypes.c_uint64), ("src", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("mode", ctypes.c_uint64), ("copy", ctypes.c_int64)]


class _UffdioZeropage(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("mode", ctypes.c_uint64), ("zeropage", ctypes.c_int64)]


class _UffdioRange(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _UffdioRegister(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _UffdioApi(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64),
                ("ioctls", ctypes.c_uint64)]


@dataclass(frozen=True)
class PageFault:
    """One fault event: the host address of the page (page-aligned), whether the access
    was a write, and the faulting thread's id (0 unless ``thread_ids`` was asked for)."""

    address: int
    write: bool
    thread_id: int


def _ioctl(fd: int, request: int, arg: ctypes.Structure) -> None:
    # libc through ctypes: the GIL is released while the kernel works.
    while _libc.ioctl(fd, request, ctypes.byref(arg)) < 0:
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err))


def _open_uffd() -> int:
    """A non-blocking, close-on-exec userfaultfd (the syscall, else /dev/userfaultfd)."""
    flags = os.O_CLOEXEC | os.O_NONBLOCK
    for extra in (0, _UFFD_USER_MODE_ONLY):
        fd = int(_libc.syscall(_SYS_USERFAULTFD, flags | extra))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err not in (errno.EPERM, errno.EINVAL):
            raise OSError(err, os.strerror(err))
    try:
        dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
    except OSError as dev_err:
        raise OSError(errno.EPERM, "userfaultfd is not permitted for this process "
                      "(vm.unprivileged_userfaultfd=0 and /dev/userfaultfd not accessible)"
                      ) from dev_err
    try:
        return _ioctl_int(dev, _USERFAULTFD_IOC_NEW, flags)
    finally:
        os.close(dev)


def _ioctl_int(fd: int, request: int, value: int) -> int:
    ret = int(_libc.ioctl(fd, request, ctypes.c_void_p(value)))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def _check_range(address: int, length: int) -> None:
    if address % PAGE_SIZE or length <= 0 or length % PAGE_SIZE:
        raise ValueError(f"userfaultfd ranges are whole pages: 0x{address:x}+0x{length:x}")


class Userfault:
    """One userfaultfd descriptor handling MISSING faults.

    Thread safety: :meth:`copy`, :meth:`zeropage` and :meth:`wake` may be called from any
    thread concurrently with :meth:`read_faults` (the kernel serialises them); register,
    unregister and close belong to the owner.
    """

    def __init__(self, *, thread_ids: bool = False) -> None:
        self._fd = _open_uffd()
        try:
            api = _UffdioApi(_UFFD_API, UFFD_FEATURE_THREAD_ID if thread_ids else 0, 0)
            _ioctl(self._fd, _UFFDIO_API, api)
        except OSError:
            os.close(self._fd)
            raise
        self.thread_ids = thread_ids
        self._ranges: list[tuple[int, int]] = []

    def fileno(self) -> int:
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    # -- registration --------------------------------------------------------------------------
    def register_missing(self, address: int, length: int) -> None:
        """From now on, a first touch of a page of the range that was never populated
        faults to this descriptor."""
        _check_range(address, length)
        reg = _UffdioRegister(address, length, _UFFDIO_REGISTER_MODE_MISSING, 0)
        _ioctl(self._fd, _UFFDIO_REGISTER, reg)
        if reg.ioctls & _NEEDED_IOCTLS != _NEEDED_IOCTLS:
            self._unregister(address, length)
            raise OSError(errno.EOPNOTSUPP, "this mapping cannot take UFFDIO_COPY/ZEROPAGE")
        self._ranges.append((address, length))

    def unregister(self, address: int, length: int) -> None:
        """Stop handling faults in the range; threads blocked in it are woken (they
        retry, and a page still missing is then filled with zeros by the kernel)."""
        _check_range(address, length)
        self._unregister(address, length)
        self._ranges = [(a, n) for a, n in self._ranges if (a, n) != (address, length)]

    def _unregister(self, address: int, length: int) -> None:
        _ioctl(self._fd, _UFFDIO_UNREGISTER, _UffdioRange(address, length))

    # -- faults ----------------------------------------------------------------------------------
    def read_faults(self, timeout: float | None = None) -> list[PageFault]:
        """The pending page faults; waits up to ``timeout`` seconds (None: forever) for
        the first.  Returns [] on timeout.  Other events are ignored."""
        if timeout is None or timeout > 0:
            ready, _, _ = select.select([self._fd], [], [], timeout)
            if not ready:
                return []
        try:
            data = os.read(self._fd, _MSG.size * _MSG_BATCH)
        except BlockingIOError:
            return []
        faults = []
        for off in range(0, len(data) - _MSG.size + 1, _MSG.size):
            event, _, _, _, flags, address, ptid = _MSG.unpack_from(data, off)
            if event == UFFD_EVENT_PAGEFAULT:
                faults.append(PageFault(address & ~(PAGE_SIZE - 1),
                                        bool(flags & UFFD_PAGEFAULT_FLAG_WRITE), ptid))
        return faults

    # -- placing pages ----------------------------------------------------------------------------
    def copy(self, address: int, data: bytes | bytearray | memoryview, wake: bool = True) -> bool:
        """Place ``data`` (whole pages) at ``address`` atomically and wake the waiters.

        False when the destination page was already populated (nothing was written).
        """
        view = memoryview(data).cast("B")
        _check_range(address, view.nbytes)
        if view.readonly:
            src = ctypes.create_string_buffer(view.tobytes(), view.nbytes)
            src_addr = ctypes.addressof(src)
        else:
            anchor = (ctypes.c_char * view.nbytes).from_buffer(view)
            src_addr = ctypes.addressof(anchor)
        arg = _UffdioCopy(address, src_addr, view.nbytes, 0 if wake else _UFFDIO_COPY_MODE_DONTWAKE, 0)
        return self._place(_UFFDIO_COPY, arg, "copy", address, view.nbytes, wake)

    def zeropage(self, address: int, length: int = PAGE_SIZE, wake: bool = True) -> bool:
        """Map zero pages at ``address`` and wake the waiters; False when already there."""
        _check_range(address, length)
        arg = _UffdioZeropage(address, length, 0 if wake else _UFFDIO_ZEROPAGE_MODE_DONTWAKE, 0)
        return self._place(_UFFDIO_ZEROPAGE, arg, "zeropage", address, length, wake)

    def _place(self, request: int, arg: ctypes.Structure, field: str, address: int,
               length: int, wake: bool) -> bool:
        while True:
            if _libc.ioctl(self._fd, request, ctypes.byref(arg)) >= 0:
                return True
            err = ctypes.get_errno()
            done = int(getattr(arg, field))
            if err == errno.EEXIST or done == -errno.EEXIST:
                if wake:
                    self.wake(address, length)
                return False
            if err == errno.EAGAIN and done > 0:
                # A partial copy (the mm changed under us): continue after what landed.
                address += done
                length -= done
                if isinstance(arg, _UffdioCopy):
                    arg.dst, arg.src, arg.len, arg.copy = address, arg.src + done, length, 0
                else:
                    arg.start, arg.len, arg.zeropage = address, length, 0
                continue
            if err in (errno.EINTR, errno.EAGAIN):
                continue
            raise OSError(err, f"UFFDIO_{field.upper()} at 0x{address:x}: {os.strerror(err)}")

    def wake(self, address: int, length: int = PAGE_SIZE) -> None:
        """Wake threads waiting on faults in the range (after placing with wake=False)."""
        _check_range(address, length)
        _ioctl(self._fd, _UFFDIO_WAKE, _UffdioRange(address, length))

    def close(self) -> None:
        """Unregister everything and close; blocked threads are woken by the kernel."""
        if self._fd < 0:
            return
        for address, length in self._ranges:
            try:
                self._unregister(address, length)
            except OSError:
                pass                     # closing releases the registration anyway
        self._ranges = []
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> "Userfault":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def unavailable_reason() -> str | None:
    """None when this process can use userfaultfd MISSING mode; otherwise why not."""
    try:
        Userfault().close()
    except OSError as err:
        return f"userfaultfd is not available: {err.strerror or err}"
    return None
