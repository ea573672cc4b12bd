"""The ``mapped-ram`` file layout (QEMU 9.0+, migration/ram.c ``mapped_ram_setup_ramblock``,
``parse_ramblock_mapped_ram``; docs/devel/migration/mapped-ram.rst).

With mapped-ram the stream goes to a file and every RAM page has a fixed place in it.  In
the ``ram`` START section each block's entry (name, length[, GPA]) is followed by a
:class:`MappedRamHeader` (packed, big-endian, 28 bytes)::

    be32 version         MAPPED_RAM_HDR_VERSION (1)
    be64 page_size       the target page size
    be64 bitmap_offset   file offset of the block's page bitmap (right after the header)
    be64 pages_offset    file offset of the block's pages, 1 MiB aligned

and then the stream itself continues at ``pages_offset + length``: between the header and
that point lie the bitmap (one bit per page, set when the page's slot holds its data;
``unsigned long`` words, little-endian on x86) and the pages region, page ``n`` at
``pages_offset + n * page_size``.  Pages are written there with positioned writes, as
often as they are dirtied, so the file never grows beyond RAM plus metadata; zero pages
are not written, their bit is cleared.  The bitmaps are written when the migration
completes.  The sections after the block list carry no page records, only their EOS.

An x-ignore-shared block that is not migrated gets offsets 0 and no region (QEMU 10.x).
This module is sans-IO: offsets, headers and bitmaps as bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from pyvm.migration.stream.constants import TARGET_PAGE_BITS, TARGET_PAGE_SIZE

MAPPED_RAM_HDR_VERSION = 1
#: migration/ram.c MAPPED_RAM_FILE_OFFSET_ALIGNMENT
MAPPED_RAM_FILE_OFFSET_ALIGNMENT = 0x100000
HEADER = struct.Struct(">IQQQ")
HEADER_SIZE = HEADER.size            # 28
_LONG = 8                            # sizeof(unsigned long) on x86-64


@dataclass(frozen=True)
class MappedRamHeader:
    version: int
    page_size: int
    bitmap_offset: int
    pages_offset: int

    def pack(self) -> bytes:
        return HEADER.pack(self.version, self.page_size, self.bitmap_offset, self.pages_offset)

    @classmethod
    def unpack(cls, data: bytes) -> "MappedRamHeader":
        return cls(*HEADER.unpack(data))


def bitmap_size(length: int) -> int:
    """BITS_TO_LONGS(pages) * sizeof(long)."""
    pages = length >> TARGET_PAGE_BITS
    return (pages + 8 * _LONG - 1) // (8 * _LONG) * _LONG


def round_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def layout(header_offset: int, length: int) -> MappedRamHeader:
    """The header of a block whose header starts at file offset ``header_offset``."""
    bitmap_offset = header_offset + HEADER_SIZE
    pages_offset = round_up(bitmap_offset + bitmap_size(length), MAPPED_RAM_FILE_OFFSET_ALIGNMENT)
    return MappedRamHeader(MAPPED_RAM_HDR_VERSION, TARGET_PAGE_SIZE, bitmap_offset, pages_offset)


def ignored_header() -> MappedRamHeader:
    """The header of a block x-ignore-shared leaves out: no bitmap, no region."""
    return MappedRamHeader(MAPPED_RAM_HDR_VERSION, TARGET_PAGE_SIZE, 0, 0)


def pack_bitmap(present: np.ndarray, length: int) -> bytes:
    """One bit per page, LSB first in each byte (little-endian longs), padded to longs."""
    bits = np.packbits(np.asarray(present, dtype=bool), bitorder="little").tobytes()
    return bits + bytes(bitmap_size(length) - len(bits))


def unpack_bitmap(data: bytes, npages: int) -> np.ndarray:
    """``present[i]``: page ``i`` is stored in its slot."""
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    return bits[:npages].astype(bool)


__all__ = ["HEADER_SIZE", "MAPPED_RAM_FILE_OFFSET_ALIGNMENT", "MAPPED_RAM_HDR_VERSION",
           "MappedRamHeader", "bitmap_size", "ignored_header", "layout", "pack_bitmap",
           "round_up", "unpack_bitmap"]
