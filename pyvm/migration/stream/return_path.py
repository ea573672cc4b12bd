"""The return path: messages from the destination back to the source (sans-IO).

The destination writes them on the same connection, in the other direction
(migration/migration.c ``migrate_send_rp_message`` and ``source_return_path_thread``).
Each is ``be16 type, be16 len, data[len]``; QEMU 8.2's types (``rp_cmd_args``):

==================  =====  ===============================================================
message              len   data
==================  =====  ===============================================================
SHUT (1)                4  be32: 0 the destination finished, 1 it failed
PONG (2)                4  be32: the value of the PING being answered
REQ_PAGES_ID (3)      var  be64 start, be32 len, u8 namelen, name: pages of a named block
REQ_PAGES (4)          12  be64 start, be32 len: pages of the block named last
RECV_BITMAP (5)       var  u8 namelen, name; then, outside the message, the block's
                           received bitmap: be64 size, size bytes of little-endian 64-bit
                           words, be64 0x0123456789abcdef (ram.c ``ramblock_recv_bitmap_send``)
RESUME_ACK (6)          4  be32 1: the destination is ready to resume (recovery)
SWITCHOVER_ACK (7)      0  (switchover-ack capability; pyvm does not offer it)
==================  =====  ===============================================================

:class:`ReturnPathEncoder` writes these; :class:`ReturnPathDecoder` is fed bytes and gives
typed messages, refusing any message QEMU's source would refuse, with its texts.  Both
bound what they accept: a message carries at most 512 bytes (QEMU's buffer), a bitmap at
most the bytes the named block needs.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, Union

import numpy as np

from pyvm.migration.errors import DecoderStoppedError, StreamFormatError

MIG_RP_MSG_INVALID = 0
MIG_RP_MSG_SHUT = 1
MIG_RP_MSG_PONG = 2
MIG_RP_MSG_REQ_PAGES_ID = 3
MIG_RP_MSG_REQ_PAGES = 4
MIG_RP_MSG_RECV_BITMAP = 5
MIG_RP_MSG_RESUME_ACK = 6
MIG_RP_MSG_SWITCHOVER_ACK = 7
MIG_RP_MSG_MAX = 8

#: migration.c rp_cmd_args: (name, length or -1 for variable)
RP_MESSAGES: dict[int, tuple[str, int]] = {
    MIG_RP_MSG_INVALID: ("INVALID", -1),
    MIG_RP_MSG_SHUT: ("SHUT", 4),
    MIG_RP_MSG_PONG: ("PONG", 4),
    MIG_RP_MSG_REQ_PAGES_ID: ("REQ_PAGES_ID", -1),
    MIG_RP_MSG_REQ_PAGES: ("REQ_PAGES", 12),
    MIG_RP_MSG_RECV_BITMAP: ("RECV_BITMAP", -1),
    MIG_RP_MSG_RESUME_ACK: ("RESUME_ACK", 4),
    MIG_RP_MSG_SWITCHOVER_ACK: ("SWITCHOVER_ACK", 0),
}
#: the source's receive buffer (migration.c source_return_path_thread: uint8_t buf[512])
MAX_RP_MESSAGE = 512
#: ram.c RAMBLOCK_RECV_BITMAP_ENDING
RECV_BITMAP_ENDING = 0x0123456789ABCDEF
#: migration.h MIGRATION_RESUME_ACK_VALUE
RESUME_ACK_VALUE = 1

_HDR = struct.Struct(">HH")


@dataclass(frozen=True)
class Shut:
    failed: bool


@dataclass(frozen=True)
class Pong:
    value: int


@dataclass(frozen=True)
class ReqPages:
    """Pages the destination needs now: ``length`` bytes from byte ``start`` of ``block``
    (the name is resolved by the decoder for REQ_PAGES, which omits it)."""

    block: str
    start: int
    length: int


@dataclass(frozen=True)
class RecvBitmap:
    """The pages of ``block`` the destination holds (bit i = page i), as a uint64 array."""

    block: str
    words: np.ndarray


@dataclass(frozen=True)
class ResumeAck:
    value: int


ReturnPathMessage = Union[Shut, Pong, ReqPages, RecvBitmap, ResumeAck]


def bitmap_bytes(npages: int) -> int:
    """Bytes of a received bitmap on the wire: whole 64-bit words (ram.c)."""
    return ((npages + 63) // 64) * 8


class ReturnPathEncoder:
    """Builds return-path messages; remembers the block of the last page request so that
    a request for the same block uses the short REQ_PAGES (migration.c
    ``migrate_send_rp_req_pages``)."""

    def __init__(self) -> None:
        self._last_block: str | None = None

    @staticmethod
    def _msg(kind: int, data: bytes = b"") -> bytes:
        return _HDR.pack(kind, len(data)) + data

    def shut(self, failed: bool) -> bytes:
        return self._msg(MIG_RP_MSG_SHUT, struct.pack(">I", 1 if failed else 0))

    def pong(self, value: int) -> bytes:
        return self._msg(MIG_RP_MSG_PONG, struct.pack(">I", value))

    def req_pages(self, block: str, start: int, length: int) -> bytes:
        head = struct.pack(">QI", start, length)
        if block == self._last_block:
            return self._msg(MIG_RP_MSG_REQ_PAGES, head)
        name = block.encode()
        if not name or len(name) > 255:
            raise ValueError(f"RAM block name must be 1..255 bytes: {block!r}")
        self._last_block = block
        return self._msg(MIG_RP_MSG_REQ_PAGES_ID, head + bytes([len(name)]) + name)

    def forget_block(self) -> None:
        """A new connection (recovery): the next request names its block again."""
        self._last_block = None

    def recv_bitmap(self, block: str, words: np.ndarray) -> bytes:
        name = block.encode()
        data = np.ascontiguousarray(words, dtype="<u8").tobytes()
        return (self._msg(MIG_RP_MSG_RECV_BITMAP, bytes([len(name)]) + name)
                + struct.pack(">Q", len(data)) + data + struct.pack(">Q", RECV_BITMAP_ENDING))

    def resume_ack(self) -> bytes:
        return self._msg(MIG_RP_MSG_RESUME_ACK, struct.pack(">I", RESUME_ACK_VALUE))


class ReturnPathDecoder:
    """The source's reader of the return path: :meth:`feed` bytes, get messages.

    ``bitmap_pages(name)`` gives the page count of a RAM block the source migrates, or
    None when it has no such block; it bounds the bitmaps and checks page requests.
    After an error the decoder refuses further input.
    """

    def __init__(self, bitmap_pages: Callable[[str], int | None]) -> None:
        self._pages = bitmap_pages
        self._buf = bytearray()
        self._last_block: str | None = None
        self._error: StreamFormatError | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> list[ReturnPathMessage]:
        if self._error is not None:
            raise DecoderStoppedError(detail=f"return path already failed: {self._error}")
        self._buf += data
        out: list[ReturnPathMessage] = []
        try:
            while True:
                msg = self._next()
                if msg is None:
                    return out
                out.append(msg)
        except StreamFormatError as err:
            self._error = err
            raise

    def _next(self) -> ReturnPathMessage | None:
        buf = self._buf
        if len(buf) < _HDR.size:
            return None
        kind, length = _HDR.unpack_from(buf)
        if kind >= MIG_RP_MSG_MAX or kind == MIG_RP_MSG_INVALID:
            raise StreamFormatError(f"Received invalid message 0x{kind:04x} length 0x{length:04x}")
        name, expected = RP_MESSAGES[kind]
        if (expected != -1 and length != expected) or length > MAX_RP_MESSAGE:
            raise StreamFormatError(f"Received '{name}' message (0x{kind:04x}) with"
                                    f"incorrect length {length} expecting {expected & (2**64 - 1)}")  # (size_t)-1 when variable
        if len(buf) < _HDR.size + length:
            return None
        data = bytes(buf[_HDR.size:_HDR.size + length])
        consumed = _HDR.size + length
        msg: ReturnPathMessage
        if kind == MIG_RP_MSG_SHUT:
            msg = Shut(struct.unpack(">I", data)[0] != 0)
        elif kind == MIG_RP_MSG_PONG:
            msg = Pong(struct.unpack(">I", data)[0])
        elif kind in (MIG_RP_MSG_REQ_PAGES, MIG_RP_MSG_REQ_PAGES_ID):
            msg = self._req_pages(kind, data)
        elif kind == MIG_RP_MSG_RECV_BITMAP:
            parsed = self._recv_bitmap(data, consumed)
            if parsed is None:
                return None
            msg, consumed = parsed
        elif kind == MIG_RP_MSG_RESUME_ACK:
            value = struct.unpack(">I", data)[0]
            if value != RESUME_ACK_VALUE:
                raise StreamFormatError(f"illegal resume_ack value {value}")
            msg = ResumeAck(value)
        else:
            raise StreamFormatError(f"Received unexpected message {name}: pyvm's source "
                                    "does not use it")
        del buf[:consumed]
        return msg

    def _req_pages(self, kind: int, data: bytes) -> ReqPages:
        start, length = struct.unpack_from(">QI", data)
        if kind == MIG_RP_MSG_REQ_PAGES_ID:
            if len(data) < 13 or 13 + data[12] != len(data):
                raise StreamFormatError(f"Received '{RP_MESSAGES[kind][0]}' message (0x{kind:04x}) "
                                        f"with incorrect length {len(data)} expecting "
                                        f"{13 + (data[12] if len(data) > 12 else 0)}")
            self._last_block = data[13:].decode(errors="replace")
        block = self._last_block
        if block is None:
            # migration.c migrate_handle_rp_req_pages: a request without a block before any
            raise StreamFormatError("migrate_handle_rp_req_pages: no previous block")
        npages = self._pages(block)
        if npages is None:
            raise StreamFormatError(f"MIG_RP_MSG_REQ_PAGES has no block '{block}'")
        if start % 4096 or length % 4096 or length == 0 or start + length > npages * 4096:
            raise StreamFormatError(f"MIG_RP_MSG_REQ_PAGES request overrun, "
                                    f"start=0x{start:x} len=0x{length:x}")
        return ReqPages(block, start, length)

    def _recv_bitmap(self, data: bytes, consumed: int) -> tuple[RecvBitmap, int] | None:
        if not data or data[0] + 1 != len(data):
            raise StreamFormatError(f"Received 'RECV_BITMAP' message with incorrect length {len(data)}")
        block = data[1:].decode(errors="replace")
        npages = self._pages(block)
        if npages is None:
            raise StreamFormatError(f"RP: Invalid block name '{block}'")
        local = bitmap_bytes(npages)
        buf = self._buf
        if len(buf) < consumed + 8:
            return None
        size = struct.unpack_from(">Q", buf, consumed)[0]
        if size != local:
            raise StreamFormatError(f"ramblock '{block}' bitmap size mismatch "
                                    f"(0x{size:x} != 0x{local:x})")
        end = consumed + 8 + size + 8
        if len(buf) < end:
            return None
        words = np.frombuffer(bytes(buf[consumed + 8:consumed + 8 + size]), dtype="<u8").astype(np.uint64)
        mark = struct.unpack_from(">Q", buf, end - 8)[0]
        if mark != RECV_BITMAP_ENDING:
            raise StreamFormatError(f"ramblock '{block}' end mark incorrect: 0x{mark:x}")
        return RecvBitmap(block, words), end
