"""QEMU 8.2's multifd wire format: the packets on each extra migration channel
(migration/multifd.h ``MultiFDInit_t``/``MultiFDPacket_t``, migration/multifd.c
``multifd_send_initial_packet``, ``multifd_send_fill_packet``,
``multifd_recv_initial_packet``, ``multifd_recv_unfill_packet``).

Every integer is big-endian.  A channel starts with one initial packet (64 bytes)::

    be32 magic 0x11223344 | be32 version 1 | 16 bytes uuid (the VM's -uuid)
    u8 channel id | 7 reserved bytes | 4 reserved be64

then carries packets, each a fixed-size header (QEMU always sends room for
``pages_alloc`` = 128 offsets, used or not; 1344 bytes for 4 KiB pages)::

    be32 magic | be32 version | be32 flags | be32 pages_alloc | be32 normal_pages
    be32 next_packet_size | be64 packet_num | 4 reserved be64 | 256 bytes ramblock name
    pages_alloc x be64 page offset inside the block

followed by ``next_packet_size`` bytes of page data: the ``normal_pages`` pages one after the
other (no compression) or one flush of the channel's zlib/zstd stream.  A packet with the
``SYNC`` flag (and, in 8.2, no pages) ends a round on its channel.  QEMU 8.2 sends zero pages
on the main channel as ``ZERO`` records, never in multifd packets (9.0 added ``zero_pages``).

This module only turns packets into bytes and bytes into checked packets; it never touches
a socket.  Texts of refusals are QEMU's.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

import numpy as np

from pyvm.migration.errors import StreamFormatError
from pyvm.migration.stream.constants import TARGET_PAGE_SIZE

MULTIFD_MAGIC = 0x11223344
MULTIFD_VERSION = 1

#: flags (migration/multifd.h)
MULTIFD_FLAG_SYNC = 1 << 0
MULTIFD_FLAG_COMPRESSION_MASK = 7 << 1
MULTIFD_FLAG_NOCOMP = 0 << 1
MULTIFD_FLAG_ZLIB = 1 << 1
MULTIFD_FLAG_ZSTD = 2 << 1

#: ``multifd-compression`` value -> the flag its packets carry
COMPRESSION_FLAGS = {"none": MULTIFD_FLAG_NOCOMP, "zlib": MULTIFD_FLAG_ZLIB,
                     "zstd": MULTIFD_FLAG_ZSTD}

#: bytes of page data one packet describes (multifd.h MULTIFD_PACKET_SIZE)
MULTIFD_PACKET_SIZE = 512 * 1024
#: pages per packet: MULTIFD_PACKET_SIZE / target page size
PAGES_PER_PACKET = MULTIFD_PACKET_SIZE // TARGET_PAGE_SIZE

RAMBLOCK_NAME_SIZE = 256

_INIT = struct.Struct(">II16sB7x32x")
_HEADER = struct.Struct(">IIIIIIQ32x256s")
INIT_PACKET_SIZE = _INIT.size                                # 64
PACKET_HEADER_SIZE = _HEADER.size                             # 320
PACKET_SIZE = PACKET_HEADER_SIZE + 8 * PAGES_PER_PACKET       # 1344

#: The magic QEMU's destination peeks at to tell the main channel ("QEVM") from a
#: multifd channel (migration.c migration_ioc_process_incoming).
MAIN_CHANNEL_MAGIC = b"QEVM"
MULTIFD_CHANNEL_MAGIC = MULTIFD_MAGIC.to_bytes(4, "big")


class MultifdPacketError(StreamFormatError):
    """A multifd packet that QEMU's checks refuse (the text is QEMU's)."""


@dataclass(frozen=True)
class MultifdPacket:
    """One decoded packet header: ``offsets`` are byte offsets into ``block``."""

    flags: int
    pages_alloc: int
    next_packet_size: int
    packet_num: int
    block: str
    offsets: np.ndarray

    @property
    def sync(self) -> bool:
        return bool(self.flags & MULTIFD_FLAG_SYNC)

    @property
    def compression(self) -> int:
        return self.flags & MULTIFD_FLAG_COMPRESSION_MASK

    @property
    def normal_pages(self) -> int:
        return int(self.offsets.size)


# -- writing ------------------------------------------------------------------------------------

def encode_initial_packet(uuid: bytes, channel_id: int) -> bytes:
    """The 64 bytes a channel starts with (multifd_send_initial_packet)."""
    if len(uuid) != 16:
        raise ValueError("a QEMU uuid is 16 bytes")
    if not 0 <= channel_id <= 255:
        raise ValueError("multifd channel ids are 0..255")
    return _INIT.pack(MULTIFD_MAGIC, MULTIFD_VERSION, uuid, channel_id)


def encode_packet(flags: int, packet_num: int, block: str, offsets: np.ndarray,
                  next_packet_size: int) -> bytes:
    """A packet header (multifd_send_fill_packet) for pages at byte ``offsets`` of ``block``.

    The name field is copied as ``strncpy`` does with a terminating NUL in its last byte;
    a packet without pages names no block (QEMU's pages->block is NULL then).
    """
    n = int(offsets.size)
    if n > PAGES_PER_PACKET:
        raise ValueError(f"{n} pages in one multifd packet (at most {PAGES_PER_PACKET})")
    name = block.encode()[:RAMBLOCK_NAME_SIZE - 1] if n else b""
    out = bytearray(PACKET_SIZE)
    _HEADER.pack_into(out, 0, MULTIFD_MAGIC, MULTIFD_VERSION, flags, PAGES_PER_PACKET, n,
                      next_packet_size, packet_num, name)
    if n:
        out[PACKET_HEADER_SIZE:PACKET_HEADER_SIZE + 8 * n] = (
            np.asarray(offsets, dtype=np.int64).astype(">u8").tobytes())
    return bytes(out)


# -- reading ------------------------------------------------------------------------------------

def decode_initial_packet(data: bytes | bytearray | memoryview, uuid: bytes, channels: int) -> int:
    """The channel id of a checked initial packet (multifd_recv_initial_packet)."""
    magic, version, their_uuid, channel_id = _INIT.unpack(bytes(data))
    if magic != MULTIFD_MAGIC:
        raise MultifdPacketError(f"multifd: received packet magic {magic:x} expected "
                                 f"{MULTIFD_MAGIC:x}")
    if version != MULTIFD_VERSION:
        raise MultifdPacketError(f"multifd: received packet version {version} expected "
                                 f"{MULTIFD_VERSION}")
    if their_uuid != uuid:
        raise MultifdPacketError(f"multifd: received uuid '{format_uuid(their_uuid)}' and "
                                 f"expected uuid '{format_uuid(uuid)}' for channel "
                                 f"{_hhd(channel_id)}")
    # QEMU compares with '>' and words it as a version check (multifd.c, sic); an id equal
    # to the channel count has no receiver either, so pyvm refuses it with the same text.
    if channel_id >= channels:
        raise MultifdPacketError(f"multifd: received channel version {version} expected "
                                 f"{MULTIFD_VERSION}")
    return int(channel_id)


#: ``block_length(name)``: the used length of the local RAM block, None when unknown.
BlockLength = Callable[[str], "int | None"]


def decode_packet(data: bytes | bytearray | memoryview, block_length: BlockLength,
                  page_count: int = PAGES_PER_PACKET) -> MultifdPacket:
    """A checked packet header (multifd_recv_unfill_packet), in QEMU's order of checks."""
    raw = bytes(data)
    if len(raw) != PACKET_SIZE:
        raise ValueError(f"a multifd packet header is {PACKET_SIZE} bytes")
    (magic, version, flags, pages_alloc, normal, next_size, packet_num,
     name) = _HEADER.unpack_from(raw, 0)
    if magic != MULTIFD_MAGIC:
        raise MultifdPacketError(f"multifd: received packet magic {magic:x} and expected "
                                 f"magic {MULTIFD_MAGIC:x}")
    if version != MULTIFD_VERSION:
        raise MultifdPacketError(f"multifd: received packet version {version} and expected "
                                 f"version {MULTIFD_VERSION}")
    if pages_alloc > page_count:
        raise MultifdPacketError(f"multifd: received packet with size {pages_alloc} and "
                                 f"expected a size of {page_count}")
    if normal > pages_alloc:
        raise MultifdPacketError(f"multifd: received packet with {normal} pages and expected "
                                 f"maximum pages are {pages_alloc}")
    if normal == 0:
        return MultifdPacket(flags, pages_alloc, next_size, packet_num, "",
                             np.zeros(0, dtype=np.int64))
    block = name[:RAMBLOCK_NAME_SIZE - 1].split(b"\0", 1)[0].decode("utf-8", "replace")
    length = block_length(block)
    if length is None:
        raise MultifdPacketError(f"multifd: unknown ram block {block}")
    offsets = np.frombuffer(raw, dtype=">u8", count=normal, offset=PACKET_HEADER_SIZE)
    limit = length - TARGET_PAGE_SIZE
    bad = np.flatnonzero(offsets > limit) if length >= TARGET_PAGE_SIZE else np.arange(normal)
    if bad.size:
        raise MultifdPacketError(f"multifd: offset too long {int(offsets[bad[0]])} "
                                 f"(max {length:x})")
    unaligned = np.flatnonzero(offsets % TARGET_PAGE_SIZE)
    if unaligned.size:
        # QEMU writes at any offset; pyvm keeps pages aligned so one write is one page.
        raise MultifdPacketError(f"multifd: offset {int(offsets[unaligned[0]])} is not "
                                 f"page aligned")
    return MultifdPacket(flags, pages_alloc, next_size, packet_num, block,
                         offsets.astype(np.int64))


def format_uuid(raw: bytes) -> str:
    """QEMU's qemu_uuid_unparse: 8-4-4-4-12 lower-case hex."""
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _hhd(value: int) -> int:
    """A byte printed with %hhd (signed char)."""
    return value - 256 if value > 127 else value


__all__ = ["COMPRESSION_FLAGS", "INIT_PACKET_SIZE", "MAIN_CHANNEL_MAGIC", "MULTIFD_CHANNEL_MAGIC",
           "MULTIFD_FLAG_COMPRESSION_MASK", "MULTIFD_FLAG_NOCOMP", "MULTIFD_FLAG_SYNC",
           "MULTIFD_FLAG_ZLIB", "MULTIFD_FLAG_ZSTD", "MULTIFD_MAGIC", "MULTIFD_PACKET_SIZE",
           "MULTIFD_VERSION", "MultifdPacket", "MultifdPacketError", "PACKET_HEADER_SIZE",
           "PACKET_SIZE", "PAGES_PER_PACKET", "decode_initial_packet", "decode_packet",
           "encode_initial_packet", "encode_packet", "format_uuid"]
