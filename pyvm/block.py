"""Raw disk images: the backing store of pyvm's ATA disk (``-drive file=X,format=raw``).

Addressing is in 512-byte sectors.  Two cache modes (``-drive ...,cache=``):

* ``writethrough`` (default): every write goes straight to the file with ``pwrite``;
  :meth:`DiskImage.flush` makes it durable with ``fdatasync``.
* ``writeback``: written sectors stay in pyvm's memory (a dict of dirty sectors) until
  :meth:`DiskImage.flush` or :meth:`DiskImage.close` writes them out.  Another process
  opening the image meanwhile sees stale data, which is why live migration refuses to run
  with such a disk.

An image whose size is not a multiple of 512 is accepted: its last sector reads as if
padded with zeros, and writing that sector extends the file to a whole sector.
"""

from __future__ import annotations

import os
import threading

from pyvm.errors import ConfigError, DeviceError

SECTOR_SIZE = 512
CACHE_MODES = ("writethrough", "writeback")


class DiskImage:
    """A raw image file addressed in sectors; thread-safe."""

    def __init__(self, path: str, readonly: bool = False, cache: str = "writethrough") -> None:
        if cache not in CACHE_MODES:
            raise ConfigError(f"invalid cache option '{cache}' (use writethrough or writeback)")
        self.path = path
        self.readonly = readonly
        self.cache = cache
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        try:
            if os.path.isdir(path):
                raise IsADirectoryError(21, "Is a directory")
            self._fd = os.open(path, flags)
        except OSError as err:
            raise ConfigError(f"Could not open '{path}': {err.strerror}") from err
        size = os.fstat(self._fd).st_size
        self._file_size = size
        self.sectors = (size + SECTOR_SIZE - 1) // SECTOR_SIZE
        self._dirty: dict[int, bytes] = {}
        self._lock = threading.Lock()

    # -- properties -------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Capacity in bytes (whole sectors)."""
        return self.sectors * SECTOR_SIZE

    @property
    def closed(self) -> bool:
        return self._fd < 0

    @property
    def dirty_sectors(self) -> int:
        """Sectors written but not yet in the file (always 0 in writethrough mode)."""
        with self._lock:
            return len(self._dirty)

    # -- I/O --------------------------------------------------------------------------------
    def read(self, lba: int, count: int) -> bytes:
        """``count`` sectors from sector ``lba``."""
        self._check_range(lba, count)
        with self._lock:
            self._check_open()
            data = bytearray(self._pread(lba * SECTOR_SIZE, count * SECTOR_SIZE))
            if self._dirty:
                for i in range(count):
                    sector = self._dirty.get(lba + i)
                    if sector is not None:
                        data[i * SECTOR_SIZE:(i + 1) * SECTOR_SIZE] = sector
            return bytes(data)

    def write(self, lba: int, data: bytes) -> None:
        """Write whole sectors starting at sector ``lba``."""
        if len(data) % SECTOR_SIZE:
            raise ValueError(f"write of {len(data)} bytes is not a whole number of sectors")
        count = len(data) // SECTOR_SIZE
        self._check_range(lba, count)
        if self.readonly:
            raise DeviceError(f"'{self.path}' is read-only")
        with self._lock:
            self._check_open()
            if self.cache == "writeback":
                for i in range(count):
                    self._dirty[lba + i] = bytes(data[i * SECTOR_SIZE:(i + 1) * SECTOR_SIZE])
            else:
                self._pwrite(lba * SECTOR_SIZE, data)

    def flush(self) -> None:
        """Write out cached sectors and make the image durable."""
        with self._lock:
            if self._fd < 0 or self.readonly:
                return
            self._write_dirty()
            try:
                os.fdatasync(self._fd)
            except OSError as err:
                raise DeviceError(f"flush of '{self.path}' failed: {err.strerror}") from err

    def close(self) -> None:
        """Flush and close; safe to call twice."""
        if self._fd < 0:
            return
        try:
            self.flush()
        finally:
            with self._lock:
                if self._fd >= 0:
                    os.close(self._fd)
                    self._fd = -1

    # -- internals --------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._fd < 0:
            raise DeviceError(f"'{self.path}' is closed")

    def _check_range(self, lba: int, count: int) -> None:
        if lba < 0 or count < 0 or lba + count > self.sectors:
            raise DeviceError(f"'{self.path}': sectors {lba}..{lba + count - 1} are beyond "
                              f"the end of the image ({self.sectors} sectors)")

    def _pread(self, offset: int, length: int) -> bytes:
        chunks = []
        done = 0
        while done < length:
            try:
                chunk = os.pread(self._fd, length - done, offset + done)
            except OSError as err:
                raise DeviceError(f"read of '{self.path}' failed: {err.strerror}") from err
            if not chunk:
                break                       # past the end of a file with a partial sector
            chunks.append(chunk)
            done += len(chunk)
        data = b"".join(chunks)
        return data + bytes(length - len(data))

    def _pwrite(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                written = os.pwrite(self._fd, view, offset)
            except OSError as err:
                raise DeviceError(f"write of '{self.path}' failed: {err.strerror}") from err
            view = view[written:]
            offset += written
        self._file_size = max(self._file_size, offset)

    def _write_dirty(self) -> None:
        """Write the dirty sectors, coalescing runs of consecutive sectors."""
        if not self._dirty:
            return
        lbas = sorted(self._dirty)
        start = prev = lbas[0]
        run = [self._dirty[start]]
        for lba in lbas[1:]:
            if lba == prev + 1:
                run.append(self._dirty[lba])
            else:
                self._pwrite(start * SECTOR_SIZE, b"".join(run))
                start, run = lba, [self._dirty[lba]]
            prev = lba
        self._pwrite(start * SECTOR_SIZE, b"".join(run))
        self._dirty.clear()
