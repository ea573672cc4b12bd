"""Page data of multifd packets: none, zlib or zstd, framed as QEMU 8.2 frames it.

QEMU keeps one compression stream per channel for the whole migration and ends each
packet's data with a flush, so that the destination can inflate the packet at once
(migration/multifd-zlib.c: one ``deflateInit`` per channel, ``deflate(Z_SYNC_FLUSH)`` after a
packet's last page; migration/multifd-zstd.c: one ``ZSTD_CStream`` per channel,
``ZSTD_e_flush`` after the last page).  The zlib stream has the zlib header (default window
bits), the zstd frame never ends.  Each class here is one end of one channel's stream: it
takes and gives bytes, nothing else.  zlib and zstandard release the GIL while they work,
so channels compress in parallel.

Refusals use QEMU's texts (``multifd %u: flags received %x flags expected %x``, ``multifd
%u: packet size received %u size expected %u``).
"""

from __future__ import annotations

import re
import zlib
from typing import Any, Protocol

from pyvm.migration.stream.multifd_format import (MULTIFD_FLAG_NOCOMP, MULTIFD_FLAG_ZLIB,
                                                  MULTIFD_FLAG_ZSTD, MULTIFD_PACKET_SIZE,
                                                  MultifdPacketError)

#: Compressed data a packet may carry: QEMU reserves twice the packet's page bytes for the
#: compressed buffer (multifd-zlib.c zlib_send_setup: "we reserve twice the size").
MAX_COMPRESSED = 2 * MULTIFD_PACKET_SIZE


class PageCompressor(Protocol):
    """The source end of one channel's stream."""

    flag: int

    def compress(self, pages: Any) -> bytes:
        """All of ``pages`` (one packet's page bytes), flushed so it can be inflated alone."""


class PageDecompressor(Protocol):
    """The destination end of one channel's stream."""

    flag: int

    def decompress(self, data: bytes, expected: int) -> bytes:
        """Exactly ``expected`` bytes of pages from one packet's ``data``."""


class ZlibCompressor:
    flag = MULTIFD_FLAG_ZLIB

    def __init__(self, level: int) -> None:
        self._z = zlib.compressobj(level)

    def compress(self, pages: Any) -> bytes:
        z = self._z
        return z.compress(pages) + z.flush(zlib.Z_SYNC_FLUSH)


_ZLIB_CODE = re.compile(r"Error (-?\d+)")


class ZlibDecompressor:
    flag = MULTIFD_FLAG_ZLIB

    def __init__(self, channel: int) -> None:
        self.channel = channel
        self._z = zlib.decompressobj()

    def decompress(self, data: bytes, expected: int) -> bytes:
        try:
            out = self._z.decompress(data, expected)
        except zlib.error as err:
            m = _ZLIB_CODE.search(str(err))
            code = m.group(1) if m else "-3"         # Z_DATA_ERROR
            raise MultifdPacketError(f"multifd {self.channel}: inflate returned {code} "
                                     f"instead of Z_OK") from None
        if len(out) != expected or self._z.unconsumed_tail:
            got = len(out)
            if self._z.unconsumed_tail:     # how much more the packet holds (capped)
                try:
                    got += len(self._z.decompress(self._z.unconsumed_tail, MAX_COMPRESSED))
                except zlib.error:
                    pass
            raise MultifdPacketError(f"multifd {self.channel}: packet size received {got} "
                                     f"size expected {expected}")
        return out


class ZstdCompressor:
    flag = MULTIFD_FLAG_ZSTD

    def __init__(self, level: int) -> None:
        import zstandard   # deferred: only multifd-compression=zstd needs the C library
        self._flush = zstandard.COMPRESSOBJ_FLUSH_BLOCK
        self._z = zstandard.ZstdCompressor(level=level).compressobj()

    def compress(self, pages: Any) -> bytes:
        z = self._z
        return z.compress(pages) + z.flush(self._flush)


class ZstdDecompressor:
    flag = MULTIFD_FLAG_ZSTD

    def __init__(self, channel: int) -> None:
        import zstandard   # deferred: only multifd-compression=zstd needs the C library
        self.channel = channel
        self._error = zstandard.ZstdError
        self._z = zstandard.ZstdDecompressor().decompressobj()

    def decompress(self, data: bytes, expected: int) -> bytes:
        try:
            out = self._z.decompress(data)
        except self._error as err:
            raise MultifdPacketError(f"multifd {self.channel}: decompressStream returned "
                                     f"{err}") from None
        if len(out) != expected:
            raise MultifdPacketError(f"multifd {self.channel}: packet size received {len(out)} "
                                     f"size expected {expected}")
        return out


def compressor(method: str, zlib_level: int, zstd_level: int) -> PageCompressor | None:
    """The source end for ``multifd-compression`` (None: pages go as they are)."""
    if method == "zlib":
        return ZlibCompressor(zlib_level)
    if method == "zstd":
        return ZstdCompressor(zstd_level)
    return None


def decompressor(method: str, channel: int) -> PageDecompressor | None:
    if method == "zlib":
        return ZlibDecompressor(channel)
    if method == "zstd":
        return ZstdDecompressor(channel)
    return None


def method_flag(method: str) -> int:
    return {"zlib": MULTIFD_FLAG_ZLIB, "zstd": MULTIFD_FLAG_ZSTD}.get(method, MULTIFD_FLAG_NOCOMP)


__all__ = ["MAX_COMPRESSED", "PageCompressor", "PageDecompressor", "ZlibCompressor",
           "ZlibDecompressor", "ZstdCompressor", "ZstdDecompressor", "compressor",
           "decompressor", "method_flag"]
