"""The control protocol of the rdma transport, sans-IO (modelled on QEMU migration/rdma.c).

Guest RAM pages travel as one-sided RDMA writes straight into the destination's registered
RAM blocks; everything else travels as control messages, one message per SEND.  This module
only turns those messages into bytes and back, and plans how pages become writes; it
performs no I/O (the fabric and the threads live in ``rdma_transport``).

Wire structures (network byte order; QEMU migration/rdma.c, ``RDMAControlHeader`` and the
structures after it, and docs/rdma.txt)::

    RDMACapabilities   be32 version, be32 flags                      connect private data
    RDMAControlHeader  be32 len, be32 type, be32 repeat, u32 pad     in front of every SEND
    RDMADestBlock      be64 remote_host_addr, be64 offset, be64 length,
                       be32 key_lo, be32 key_hi
    RDMARegister       be64 current_addr, be32 current_index, u32 pad, be64 chunks
    RDMARegisterResult be32 key_lo, be32 key_hi, be64 host_addr
    RDMACompress       be32 value, be32 block_idx, be64 offset, be64 length

QEMU's keys are 32-bit ibverbs rkeys and the word after them is padding.  libfabric keys are
64 bits wide, so pyvm carries the high half in that padding word; it is zero for 32-bit keys
(the verbs provider), where the layout is exactly QEMU's.

A ``host_addr`` names the remote address of the *first byte of the block* in the address
space of the registration it comes with: the source writes byte ``off`` of the block to
``host_addr + off`` (mod 2**64).  With FI_MR_VIRT_ADDR that is the block's virtual address,
as in QEMU; with offset-based registrations it is ``-start_of_registration``.

Flow control: the destination posts ``n`` receive buffers and grants them with
``READY`` (``repeat`` = how many buffers were made ready, i.e. ``n`` READYs packed in one
message); every SEND from the source spends one grant.  The destination only ever answers
requests, so the source's own receive buffers cannot be overrun.

Errors::

    TransportError                  (pyvm.migration.transports.base)
     +-- RdmaError                  every rdma failure; the text starts with "RDMA ERROR: ";
          |                         libfabric failures keep libfabric's errno
          +-- RdmaProtocolError     a malformed or unexpected control message, or the peer
          |                         sent ERROR
          +-- FabricUnavailableError  (fabric) libfabric missing, or no provider has RMA
                                      over FI_EP_MSG

A cancel (``shutdown()`` from another thread, an :class:`AbortSignal`) raises the base
module's :class:`TransportCancelled` instead.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Generic, Iterable, Iterator, Optional, Sequence, TypeVar

import numpy as np

from pyvm.migration.transports.base import TransportError

# -- constants (QEMU migration/rdma.c) ------------------------------------------------------
RDMA_CONTROL_VERSION_CURRENT = 1
RDMA_CAPABILITY_PIN_ALL = 0x01
KNOWN_CAPABILITIES = RDMA_CAPABILITY_PIN_ALL
RDMA_REG_CHUNK_SHIFT = 20                       # on-demand registration unit: 1 MiB
RDMA_REG_CHUNK_SIZE = 1 << RDMA_REG_CHUNK_SHIFT
RDMA_MERGE_MAX = 2 * 1024 * 1024                # largest single RDMA write
RDMA_CONTROL_MAX_BUFFER = 512 * 1024            # one control message, header included
RDMA_CONTROL_MAX_COMMANDS_PER_MESSAGE = 4096    # largest ``repeat``
RDMA_RESOLVE_TIMEOUT_MS = 10000                 # connection set-up
ERROR_PREFIX = "RDMA ERROR: "

_CAPS = struct.Struct(">II")
_HEADER = struct.Struct(">IIII")
_DEST_BLOCK = struct.Struct(">QQQII")
_REGISTER = struct.Struct(">QIIQ")
_REGISTER_RESULT = struct.Struct(">IIQ")
_COMPRESS = struct.Struct(">IIQQ")
CAPABILITIES_SIZE = _CAPS.size                  # 8
HEADER_SIZE = _HEADER.size                      # 16
DEST_BLOCK_SIZE = _DEST_BLOCK.size              # 32
REGISTER_SIZE = _REGISTER.size                  # 24
REGISTER_RESULT_SIZE = _REGISTER_RESULT.size    # 16
COMPRESS_SIZE = _COMPRESS.size                  # 24
MAX_PAYLOAD = RDMA_CONTROL_MAX_BUFFER - HEADER_SIZE
MAX_DEST_BLOCKS = MAX_PAYLOAD // DEST_BLOCK_SIZE
_U64 = (1 << 64) - 1


class RdmaError(TransportError):
    """An rdma transport failure; ``str()`` is one line starting with ``RDMA ERROR: ``."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        if not message.startswith(ERROR_PREFIX):
            message = ERROR_PREFIX + message
        super().__init__(message, errno=errno)


class RdmaProtocolError(RdmaError):
    """A control message that is malformed, out of bounds or not expected now."""


class ControlType(enum.IntEnum):
    """RDMA_CONTROL_* message types (QEMU migration/rdma.c)."""

    NONE = 0
    ERROR = 1
    READY = 2
    QEMU_FILE = 3
    RAM_BLOCKS_REQUEST = 4
    RAM_BLOCKS_RESULT = 5
    COMPRESS = 6
    REGISTER_REQUEST = 7
    REGISTER_RESULT = 8
    REGISTER_FINISHED = 9
    UNREGISTER_REQUEST = 10
    UNREGISTER_FINISHED = 11


# -- connect-time capability exchange ----------------------------------------------------------
@dataclass(frozen=True)
class RdmaCapabilities:
    """RDMACapabilities, the private data of the connect request and of its acceptance."""

    version: int = RDMA_CONTROL_VERSION_CURRENT
    flags: int = 0

    def encode(self) -> bytes:
        return _CAPS.pack(self.version, self.flags)

    @classmethod
    def decode(cls, data: bytes) -> "RdmaCapabilities":
        if len(data) < CAPABILITIES_SIZE:
            raise RdmaProtocolError(f"connection private data too short ({len(data)} bytes)")
        version, flags = _CAPS.unpack_from(data)
        return cls(version, flags)

    def answer(self, supported: int) -> "RdmaCapabilities":
        """The destination's reply: the requested flags it supports, unknown bits cleared."""
        if self.version != RDMA_CONTROL_VERSION_CURRENT:
            raise RdmaProtocolError(f"Unknown source RDMA version: {self.version}, bailing...")
        flags = self.flags & supported & KNOWN_CAPABILITIES
        return RdmaCapabilities(RDMA_CONTROL_VERSION_CURRENT, flags)


# -- control messages ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ControlMessage:
    """One decoded control message: header fields and the payload after the header."""

    type: ControlType
    repeat: int
    payload: bytes


def encode_header(ctype: ControlType, length: int, repeat: int = 1) -> bytes:
    """RDMAControlHeader for a payload of ``length`` bytes."""
    if not 0 <= length <= MAX_PAYLOAD:
        raise RdmaProtocolError(f"control message payload of {length} bytes exceeds {MAX_PAYLOAD}")
    if not 1 <= repeat <= RDMA_CONTROL_MAX_COMMANDS_PER_MESSAGE:
        raise RdmaProtocolError(f"control message repeat {repeat} out of range")
    return _HEADER.pack(length, int(ctype), repeat, 0)


def encode_message(ctype: ControlType, payload: bytes = b"", repeat: int = 1) -> bytes:
    return encode_header(ctype, len(payload), repeat) + payload


# Payload size each typed message must have, as a multiple of ``repeat`` (None: free form).
_ENTRY_SIZE: dict[ControlType, Optional[int]] = {
    ControlType.ERROR: 0,
    ControlType.READY: 0,
    ControlType.QEMU_FILE: None,
    ControlType.RAM_BLOCKS_REQUEST: 0,
    ControlType.RAM_BLOCKS_RESULT: None,
    ControlType.COMPRESS: COMPRESS_SIZE,
    ControlType.REGISTER_REQUEST: REGISTER_SIZE,
    ControlType.REGISTER_RESULT: REGISTER_RESULT_SIZE,
    ControlType.REGISTER_FINISHED: 0,
}


def decode_message(data: bytes | memoryview) -> ControlMessage:
    """Parse one received SEND; every length is checked against the bytes that arrived."""
    if len(data) < HEADER_SIZE:
        raise RdmaProtocolError(f"control message of {len(data)} bytes has no header")
    length, raw_type, repeat, _pad = _HEADER.unpack_from(data)
    if length != len(data) - HEADER_SIZE or length > MAX_PAYLOAD:
        raise RdmaProtocolError(f"control message length {length} does not match the "
                                f"{len(data) - HEADER_SIZE} bytes received")
    if raw_type not in _ENTRY_SIZE.keys():
        raise RdmaProtocolError(f"unsupported control message type {raw_type}")
    ctype = ControlType(raw_type)
    if not 1 <= repeat <= RDMA_CONTROL_MAX_COMMANDS_PER_MESSAGE:
        raise RdmaProtocolError(f"control message repeat {repeat} out of range")
    entry = _ENTRY_SIZE[ctype]
    if entry == 0 and length != 0:
        raise RdmaProtocolError(f"{ctype.name} carries {length} unexpected bytes")
    if entry and length != entry * repeat:
        raise RdmaProtocolError(f"{ctype.name} of {length} bytes does not hold {repeat} entries")
    if ctype == ControlType.RAM_BLOCKS_RESULT and length % DEST_BLOCK_SIZE:
        raise RdmaProtocolError(f"RAM_BLOCKS_RESULT of {length} bytes is not a block list")
    return ControlMessage(ctype, repeat, bytes(data[HEADER_SIZE:]))


def expect(msg: ControlMessage, ctype: ControlType) -> ControlMessage:
    """``msg`` if it has type ``ctype``; an ERROR or any other type fails."""
    if msg.type == ctype:
        return msg
    if msg.type == ControlType.ERROR:
        raise RdmaProtocolError("the peer reported an error")
    raise RdmaProtocolError(f"expected {ctype.name}, received {msg.type.name}")


# -- typed payloads -----------------------------------------------------------------------------
@dataclass(frozen=True)
class DestBlock:
    """RDMADestBlock: where one destination RAM block is and how to reach it."""

    remote_host_addr: int
    offset: int            # the block's start in the destination's list-wide RAM offsets
    length: int
    key: int = 0           # 0 when not registered up front (no pin-all)

    def encode(self) -> bytes:
        return _DEST_BLOCK.pack(self.remote_host_addr & _U64, self.offset, self.length,
                                self.key & 0xFFFF_FFFF, self.key >> 32)


def encode_dest_blocks(blocks: Sequence[DestBlock]) -> bytes:
    if len(blocks) > MAX_DEST_BLOCKS:
        raise RdmaProtocolError(f"{len(blocks)} RAM blocks do not fit one RAM_BLOCKS_RESULT")
    return b"".join(block.encode() for block in blocks)


def decode_dest_blocks(msg: ControlMessage) -> list[DestBlock]:
    expect(msg, ControlType.RAM_BLOCKS_RESULT)
    return [DestBlock(addr, offset, length, lo | hi << 32)
            for addr, offset, length, lo, hi in _DEST_BLOCK.iter_unpack(msg.payload)]


@dataclass(frozen=True)
class Register:
    """RDMARegister: register chunks ``chunk(current_addr) .. + chunks`` of block ``index``.

    ``current_addr`` is a list-wide RAM offset (the block's ``DestBlock.offset`` plus the
    offset inside the block); ``chunks`` counts the chunks after the first one.
    """

    current_addr: int
    current_index: int
    chunks: int

    def encode(self) -> bytes:
        return _REGISTER.pack(self.current_addr, self.current_index, 0, self.chunks)


@dataclass(frozen=True)
class RegisterResult:
    """RDMARegisterResult: the key of the new registration and the block's remote base."""

    key: int
    host_addr: int

    def encode(self) -> bytes:
        return _REGISTER_RESULT.pack(self.key & 0xFFFF_FFFF, self.key >> 32, self.host_addr & _U64)


def encode_register_requests(requests: Sequence[Register]) -> bytes:
    return encode_message(ControlType.REGISTER_REQUEST,
                          b"".join(r.encode() for r in requests), len(requests))


def decode_register_requests(msg: ControlMessage) -> list[Register]:
    expect(msg, ControlType.REGISTER_REQUEST)
    return [Register(addr, index, chunks) for addr, index, _pad, chunks
            in _REGISTER.iter_unpack(msg.payload)]


def encode_register_results(results: Sequence[RegisterResult]) -> bytes:
    return encode_message(ControlType.REGISTER_RESULT,
                          b"".join(r.encode() for r in results), len(results))


def decode_register_results(msg: ControlMessage) -> list[RegisterResult]:
    expect(msg, ControlType.REGISTER_RESULT)
    return [RegisterResult(lo | hi << 32, addr) for lo, hi, addr
            in _REGISTER_RESULT.iter_unpack(msg.payload)]


@dataclass(frozen=True)
class Compress:
    """RDMACompress: fill ``length`` bytes at list-wide RAM offset ``offset`` of block
    ``block_idx`` with ``value``; sent for zero pages of chunks not registered yet, so that
    untouched memory need not be registered (pinned) at all."""

    value: int
    block_idx: int
    offset: int
    length: int

    def encode(self) -> bytes:
        return _COMPRESS.pack(self.value, self.block_idx, self.offset, self.length)


def encode_compress(commands: Sequence[Compress]) -> bytes:
    return encode_message(ControlType.COMPRESS, b"".join(c.encode() for c in commands),
                          len(commands))


def decode_compress(msg: ControlMessage) -> list[Compress]:
    expect(msg, ControlType.COMPRESS)
    return [Compress(*fields) for fields in _COMPRESS.iter_unpack(msg.payload)]


def remote_address(host_addr: int, offset: int) -> int:
    """The remote address of byte ``offset`` of a block whose base is ``host_addr``."""
    return (host_addr + offset) & _U64


def block_base_for(region_address: int, region_offset: int) -> int:
    """``host_addr`` for a registration that starts ``region_offset`` bytes into a block and
    whose first byte the peer addresses as ``region_address``."""
    return (region_address - region_offset) & _U64


# -- planning writes ------------------------------------------------------------------------------
def chunk_of(offset: int) -> int:
    return offset >> RDMA_REG_CHUNK_SHIFT


def chunk_count(length: int) -> int:
    return (length + RDMA_REG_CHUNK_SIZE - 1) >> RDMA_REG_CHUNK_SHIFT


def merge_pages(page_offsets: Iterable[int], page_size: int, block_length: int,
                limit: int = RDMA_MERGE_MAX) -> Iterator[tuple[int, int]]:
    """Runs ``(offset, length)`` of contiguous pages, each at most ``limit`` bytes.

    Pages are taken in the order given; a page that does not follow the previous one starts
    a new run.  Offsets must be page aligned and inside the block.  A numpy array (what a
    dirty-bitmap scan yields) is merged with vector operations, with the same result.
    """
    if page_size <= 0 or limit < page_size:
        raise ValueError(f"page size {page_size} and merge limit {limit} do not fit")
    if isinstance(page_offsets, np.ndarray):
        yield from _merge_array(page_offsets, page_size, block_length, limit)
        return
    start = end = -1
    for offset in page_offsets:
        _check_page(offset, page_size, block_length)
        if offset == end and end - start + page_size <= limit:
            end += page_size
            continue
        if start >= 0:
            yield start, end - start
        start, end = offset, offset + page_size
    if start >= 0:
        yield start, end - start


def _check_page(offset: int, page_size: int, block_length: int) -> None:
    if offset % page_size or not 0 <= offset <= block_length - page_size:
        raise ValueError(f"page offset 0x{offset:x} is not a page of a block of "
                         f"0x{block_length:x} bytes")


def _merge_array(offsets: np.ndarray, page_size: int, block_length: int,
                 limit: int) -> Iterator[tuple[int, int]]:
    pages = offsets.astype(np.int64, copy=False).ravel()
    if not pages.size:
        return
    bad = (pages % page_size != 0) | (pages < 0) | (pages > block_length - page_size)
    if bad.any():
        _check_page(int(pages[np.flatnonzero(bad)[0]]), page_size, block_length)
    breaks = np.flatnonzero(np.diff(pages) != page_size) + 1
    per_run = limit // page_size
    for first, stop in zip([0, *breaks.tolist()], [*breaks.tolist(), pages.size]):
        base = int(pages[first])
        for done in range(0, stop - first, per_run):
            yield base + done * page_size, min(per_run, stop - first - done) * page_size


T = TypeVar("T")


class ChunkMap(Generic[T]):
    """Which registration covers each 1 MiB chunk of one block (``None``: not registered).

    A registration may span several consecutive chunks; writes are split where the
    registration (compared by value: a key names one registration) changes, so no write
    leaves the region whose key it uses.
    """

    def __init__(self, block_length: int) -> None:
        self.block_length = block_length
        self._chunks: list[Optional[T]] = [None] * chunk_count(block_length)

    def __len__(self) -> int:
        return len(self._chunks)

    def get(self, chunk: int) -> Optional[T]:
        return self._chunks[chunk]

    def set_range(self, first: int, count: int, value: T) -> None:
        self._chunks[first:first + count] = [value] * count

    def fill_all(self, value: T) -> None:
        self.set_range(0, len(self._chunks), value)

    def missing_runs(self, ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
        """``(first_chunk, count)`` runs of the unregistered chunks under ``(offset, length)``
        ranges, consecutive chunks grouped so that one registration can cover them."""
        needed = sorted({chunk for offset, length in ranges
                         for chunk in range(chunk_of(offset), chunk_of(offset + length - 1) + 1)
                         if self._chunks[chunk] is None})
        runs: list[tuple[int, int]] = []
        for chunk in needed:
            if runs and runs[-1][0] + runs[-1][1] == chunk:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((chunk, 1))
        return runs

    def chunk_span(self, first: int, count: int) -> tuple[int, int]:
        """``(offset, length)`` in the block covered by chunks ``first .. first+count-1``."""
        start = first << RDMA_REG_CHUNK_SHIFT
        return start, min((first + count) << RDMA_REG_CHUNK_SHIFT, self.block_length) - start

    def segments(self, offset: int, length: int) -> Iterator[tuple[int, int, T]]:
        """Split a registered range into ``(offset, length, registration)`` pieces."""
        end = offset + length
        last = chunk_of(end - 1)
        while offset < end:
            chunk = chunk_of(offset)
            value = self._chunks[chunk]
            if value is None:
                raise RdmaError(f"chunk {chunk} is used before it is registered")
            stop = chunk + 1
            while stop <= last and self._chunks[stop] == value:
                stop += 1
            piece = min(end, stop << RDMA_REG_CHUNK_SHIFT) - offset
            yield offset, piece, value
            offset += piece
