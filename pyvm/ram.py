"""Guest RAM: memory backends, RAM blocks and the machine's RAM layout.

Each RAM block is one host ``mmap``.  The same mapping is given to every vCPU's Unicorn
engine with ``mem_map_ptr`` (never copied) and viewed through numpy here.  Backends follow
QEMU's ``-object memory-backend-*``:

- ``memory-backend-ram``: anonymous memory (``share=on`` maps it MAP_SHARED).
- ``memory-backend-memfd``: a memfd, shared by default; another process can map it only
  if it is handed the file descriptor, and it dies with its last user.
- ``memory-backend-file``: a file at ``mem-path`` (a file on /dev/shm, hugetlbfs or DAX);
  with ``share=on`` stores reach the file, so a later process mapping the same path sees
  them.  That is what ``x-ignore-shared`` and ``cpr-reboot`` rely on.

Writes that do not come from a vCPU (devices, loaders, incoming migration) go through
:meth:`RamBlock.write`, which marks the dirty bitmap; vCPU stores are tracked by the
native write hook (:mod:`pyvm.fastpath`).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import stat
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from pyvm.errors import ConfigError
from pyvm.fastpath import PAGE_SIZE, DirtyBitmap
from pyvm.pagemap import unpopulated_pages

BACKEND_TYPES = ("memory-backend-ram", "memory-backend-memfd", "memory-backend-file")
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)     # linux/mman.h, Linux 5.14


@dataclass
class MemoryBackendConfig:
    """A parsed ``-object memory-backend-*`` (or the implicit one made by ``-m``)."""

    qom_type: str
    id: str
    size: int
    share: bool = False
    mem_path: str | None = None
    prealloc: bool = False
    implicit: bool = False     # made by -m, not by -object


class MemoryBackend:
    """The host memory behind one RAM block."""

    def __init__(self, cfg: MemoryBackendConfig) -> None:
        if cfg.size <= 0 or cfg.size % PAGE_SIZE:
            raise ConfigError(f"memory backend '{cfg.id}': size must be a positive multiple of 4 KiB")
        self.cfg = cfg
        self.fd: int | None = None
        self.filename: str | None = None
        flags = mmap.MAP_SHARED if cfg.share else mmap.MAP_PRIVATE
        if cfg.qom_type in ("memory-backend-ram", "memory-backend-memfd"):
            try:
                self.mm = self._map_anonymous(cfg, flags)
            except OSError as err:
                # QEMU's text (system/physmem.c, qemu_ram_alloc_internal) for -m 99999G
                raise ConfigError(f"cannot set up guest memory '{cfg.id}': "
                                  f"{err.strerror}") from err
        elif cfg.qom_type == "memory-backend-file":
            self.mm = self._map_file(cfg, flags)
        else:
            raise ConfigError(f"invalid object type: {cfg.qom_type}")
        if cfg.prealloc:
            self._preallocate()
        self.view = np.frombuffer(self.mm, dtype=np.uint8)
        # The host address Unicorn maps; the export also keeps the mmap from being closed.
        self._anchor = ctypes.c_char.from_buffer(self.mm)
        self.host_address = ctypes.addressof(self._anchor)

    def _map_anonymous(self, cfg: MemoryBackendConfig, flags: int) -> mmap.mmap:
        if cfg.qom_type == "memory-backend-ram":
            return mmap.mmap(-1, cfg.size, flags=flags | mmap.MAP_ANONYMOUS)
        fd = os.memfd_create(cfg.id, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, cfg.size)
            mm = mmap.mmap(fd, cfg.size, flags=flags)
        except OSError:
            os.close(fd)
            raise
        self.fd = fd
        return mm

    def _map_file(self, cfg: MemoryBackendConfig, flags: int) -> mmap.mmap:
        if not cfg.mem_path:
            raise ConfigError(f"memory-backend-file '{cfg.id}': property 'mem-path' is required")
        path = cfg.mem_path
        try:
            if os.path.isdir(path):
                # As QEMU: a directory means a fresh, unlinked file inside it.
                fd = os.open(path, os.O_TMPFILE | os.O_RDWR, 0o600)
            else:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as err:
            raise ConfigError(f"can't open backing store {path} for guest RAM: "
                              f"{err.strerror}") from err
        st = os.fstat(fd)
        file_size = st.st_size
        if stat.S_ISREG(st.st_mode):
            if 0 < file_size < cfg.size:
                os.close(fd)
                raise ConfigError(f"backing store size 0x{file_size:x} does not match "
                                  f"'size' option 0x{cfg.size:x}")
            if file_size == 0:
                os.ftruncate(fd, cfg.size)
        self.fd = fd
        self.filename = os.path.realpath(path)
        try:
            return mmap.mmap(fd, cfg.size, flags=flags)
        except OSError as err:
            raise ConfigError(f"unable to map backing store for guest RAM: {err.strerror}") from err

    def _preallocate(self) -> None:
        """``prealloc=on``: populate every page now, for writing, as QEMU does, so the
        guest (or an incoming migration) never waits for a page fault on this memory."""
        try:
            self.mm.madvise(MADV_POPULATE_WRITE)
            return
        except OSError as err:
            if err.errno not in (errno.EINVAL, errno.ENOSYS):     # before Linux 5.14: touch
                self.mm.close()
                if self.fd is not None:
                    os.close(self.fd)
                raise ConfigError(f"preallocating memory failed: {err.strerror}") from err
        pages = np.frombuffer(self.mm, dtype=np.uint8)[::PAGE_SIZE]
        pages[:] = pages          # read and write back one byte per page: contents unchanged
        del pages

    @property
    def shared(self) -> bool:
        return self.cfg.share

    @property
    def private_anonymous(self) -> bool:
        """True for MAP_PRIVATE anonymous memory, where a never-populated page is zero."""
        return self.cfg.qom_type == "memory-backend-ram" and not self.cfg.share

    @property
    def named_file(self) -> bool:
        """True when another process can map the same memory by path (x-ignore-shared)."""
        return self.cfg.qom_type == "memory-backend-file" and self.cfg.share

    def close(self) -> None:
        self.view = np.empty(0, dtype=np.uint8)
        del self._anchor
        try:
            self.mm.close()
        except BufferError:     # a numpy view elsewhere still exports it; the OS frees it at exit
            pass
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class RamBlock:
    """A named range of guest-physical RAM backed by one mmap."""

    def __init__(self, name: str, gpa: int, backend: MemoryBackend) -> None:
        self.name = name
        self.gpa = gpa
        self.backend = backend
        self.size = backend.cfg.size
        self.npages = self.size // PAGE_SIZE
        self.dirty = DirtyBitmap(self.npages)

    @property
    def mem(self) -> np.ndarray:
        """The block's bytes as a writable numpy uint8 view (no copy)."""
        return self.backend.view

    @property
    def host_address(self) -> int:
        return self.backend.host_address

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def contains(self, gpa: int, size: int = 1) -> bool:
        return self.gpa <= gpa and gpa + size <= self.end

    def unpopulated(self, first: int = 0, count: int | None = None) -> np.ndarray | None:
        """``mask[i]`` True when page ``first + i`` was never populated, so reads as zero
        (:mod:`pyvm.pagemap`); None when that cannot be known (shared or file-backed
        memory, or no pagemap).  Pages [first, first + count), to the end by default."""
        if count is None:
            count = self.npages - first
        if first < 0 or count < 0 or first + count > self.npages:
            raise ValueError(f"pages [{first}, +{count}) outside RAM block '{self.name}'")
        if not self.backend.private_anonymous:
            return None
        return unpopulated_pages(self.host_address + first * PAGE_SIZE, count)

    def read(self, offset: int, size: int) -> bytes:
        self._check(offset, size)
        return self.mem[offset:offset + size].tobytes()

    def write(self, offset: int, data: bytes | bytearray | memoryview | np.ndarray) -> None:
        """Store ``data`` at ``offset`` and mark the pages dirty (non-vCPU writers)."""
        n = len(data)
        self._check(offset, n)
        self.mem[offset:offset + n] = np.frombuffer(data, dtype=np.uint8)
        self.dirty.mark_range(offset, n)

    def _check(self, offset: int, size: int) -> None:
        if offset < 0 or size < 0 or offset + size > self.size:
            raise ValueError(f"access [{offset:#x}, +{size:#x}) outside RAM block '{self.name}'")


class RamLayout:
    """Every RAM block of the machine with its guest-physical address.

    The migration layer enumerates it (names, addresses, sizes); the CPU maps it.
    """

    def __init__(self) -> None:
        self.blocks: list[RamBlock] = []

    def add(self, block: RamBlock) -> None:
        for b in self.blocks:
            if b.name == block.name:
                raise ConfigError(f"duplicate RAM block '{block.name}'")
            if block.gpa < b.end and b.gpa < block.end:
                raise ConfigError(f"RAM block '{block.name}' overlaps '{b.name}'")
        self.blocks.append(block)

    def __iter__(self) -> Iterator[RamBlock]:
        return iter(self.blocks)

    def by_name(self, name: str) -> RamBlock | None:
        return next((b for b in self.blocks if b.name == name), None)

    def find(self, gpa: int, size: int = 1) -> RamBlock | None:
        return next((b for b in self.blocks if b.contains(gpa, size)), None)

    @property
    def total(self) -> int:
        return sum(b.size for b in self.blocks)

    def read(self, gpa: int, size: int) -> bytes:
        """Read guest-physical memory; ValueError outside RAM."""
        block = self.find(gpa, size)
        if block is None:
            raise ValueError(f"guest-physical range [{gpa:#x}, +{size:#x}) is not RAM")
        return block.read(gpa - block.gpa, size)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        block = self.find(gpa, len(data))
        if block is None:
            raise ValueError(f"guest-physical range [{gpa:#x}, +{len(data):#x}) is not RAM")
        block.write(gpa - block.gpa, data)

    def close(self) -> None:
        for b in self.blocks:
            b.backend.close()
