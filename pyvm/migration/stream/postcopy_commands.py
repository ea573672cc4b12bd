"""``QEMU_VM_COMMAND`` records of postcopy and the return path, both ways (sans-IO).

On the wire a command is ``u8 0x08, be16 cmd, be16 len, payload[len]``
(migration/savevm.c ``qemu_savevm_command_send``).  The ones postcopy uses, with the
payloads QEMU 8.2 gives them (savevm.c ``qemu_savevm_send_*`` and
``loadvm_process_command``):

=====================  ====  ============================================================
command                 len  payload
=====================  ====  ============================================================
OPEN_RETURN_PATH          0  (the destination starts writing on the return path)
PING                      4  be32 value, answered with a PONG carrying it
POSTCOPY_ADVISE          16  be64 host page-size summary, be64 target page size
POSTCOPY_LISTEN           0  (the destination starts its page-fault handling)
POSTCOPY_RUN              0  (the destination starts the guest)
POSTCOPY_RAM_DISCARD    var  u8 version 0, u8 namelen, name, u8 0, N x (be64 start,
                             be64 length) -- byte ranges of pages to drop
PACKAGED                  4  be32 size; that many bytes of nested stream follow (sections
                             ending with EOF), outside the command's own length
POSTCOPY_RESUME           0  (recovery: the source resumes sending)
RECV_BITMAP             var  u8 namelen, name: asks for the block's received bitmap
=====================  ====  ============================================================

:func:`encode_command` writes one; :func:`parse_command` checks a payload that has been
read and returns a typed :class:`PostcopyCommand`, with QEMU's error texts when a payload
is malformed.  Nothing here touches a socket.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass
from typing import Sequence, Union

from pyvm.migration.errors import StreamFormatError, StreamMismatchError
from pyvm.migration.stream.constants import MIG_COMMANDS, QEMU_VM_COMMAND, TARGET_PAGE_SIZE

MIG_CMD_OPEN_RETURN_PATH = 1
MIG_CMD_PING = 2
MIG_CMD_POSTCOPY_ADVISE = 3
MIG_CMD_POSTCOPY_LISTEN = 4
MIG_CMD_POSTCOPY_RUN = 5
MIG_CMD_POSTCOPY_RAM_DISCARD = 6
MIG_CMD_PACKAGED = 7
MIG_CMD_POSTCOPY_RESUME = 9
MIG_CMD_RECV_BITMAP = 10

#: savevm.h MAX_VM_CMD_PACKAGED_SIZE: the largest PACKAGED blob QEMU sends or loads
MAX_VM_CMD_PACKAGED_SIZE = 1 << 24
#: savevm.c: ranges per POSTCOPY_RAM_DISCARD command (MAX_DISCARDS_PER_COMMAND)
MAX_DISCARDS_PER_COMMAND = 12
#: the discard command's format version (savevm.c postcopy_ram_discard_version)
POSTCOPY_RAM_DISCARD_VERSION = 0

_HEADER = struct.Struct(">BHH")


@dataclass(frozen=True)
class OpenReturnPath:
    pass


@dataclass(frozen=True)
class Ping:
    value: int


@dataclass(frozen=True)
class PostcopyAdvise:
    host_page_summary: int
    target_page_size: int


@dataclass(frozen=True)
class PostcopyListen:
    pass


@dataclass(frozen=True)
class PostcopyRun:
    pass


@dataclass(frozen=True)
class RamDiscard:
    block: str
    ranges: tuple[tuple[int, int], ...]      # (byte offset, byte length) in the block


@dataclass(frozen=True)
class Packaged:
    size: int                                # bytes of nested stream that follow


@dataclass(frozen=True)
class PostcopyResume:
    pass


@dataclass(frozen=True)
class RecvBitmap:
    block: str


PostcopyCommand = Union[OpenReturnPath, Ping, PostcopyAdvise, PostcopyListen, PostcopyRun,
                        RamDiscard, Packaged, PostcopyResume, RecvBitmap]


def _record(cmd: int, payload: bytes = b"") -> bytes:
    return _HEADER.pack(QEMU_VM_COMMAND, cmd, len(payload)) + payload


def _name(block: str) -> bytes:
    raw = block.encode()
    if not raw or len(raw) > 255:
        raise ValueError(f"RAM block name must be 1..255 bytes: {block!r}")
    return raw


def encode_command(command: PostcopyCommand) -> bytes:
    """The whole record, ``0x08`` marker included (PACKAGED: without its nested blob)."""
    if isinstance(command, OpenReturnPath):
        return _record(MIG_CMD_OPEN_RETURN_PATH)
    if isinstance(command, Ping):
        return _record(MIG_CMD_PING, struct.pack(">I", command.value))
    if isinstance(command, PostcopyAdvise):
        return _record(MIG_CMD_POSTCOPY_ADVISE,
                       struct.pack(">QQ", command.host_page_summary, command.target_page_size))
    if isinstance(command, PostcopyListen):
        return _record(MIG_CMD_POSTCOPY_LISTEN)
    if isinstance(command, PostcopyRun):
        return _record(MIG_CMD_POSTCOPY_RUN)
    if isinstance(command, RamDiscard):
        if len(command.ranges) > MAX_DISCARDS_PER_COMMAND:
            raise ValueError(f"at most {MAX_DISCARDS_PER_COMMAND} ranges per discard command")
        name = _name(command.block)
        payload = bytes([POSTCOPY_RAM_DISCARD_VERSION, len(name)]) + name + b"\0"
        payload += b"".join(struct.pack(">QQ", s, n) for s, n in command.ranges)
        return _record(MIG_CMD_POSTCOPY_RAM_DISCARD, payload)
    if isinstance(command, Packaged):
        if command.size > MAX_VM_CMD_PACKAGED_SIZE:
            raise ValueError(f"Unreasonably large packaged state: {command.size}")
        return _record(MIG_CMD_PACKAGED, struct.pack(">I", command.size))
    if isinstance(command, PostcopyResume):
        return _record(MIG_CMD_POSTCOPY_RESUME)
    if isinstance(command, RecvBitmap):
        name = _name(command.block)
        return _record(MIG_CMD_RECV_BITMAP, bytes([len(name)]) + name)
    raise TypeError(f"not a postcopy command: {command!r}")


def discard_commands(block: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
    """POSTCOPY_RAM_DISCARD records for any number of ranges, 12 per record as QEMU
    sends them (migration/ram.c ``postcopy_discard_send_range``)."""
    return [encode_command(RamDiscard(block, tuple(ranges[i:i + MAX_DISCARDS_PER_COMMAND])))
            for i in range(0, len(ranges), MAX_DISCARDS_PER_COMMAND)]


def packaged(blob: bytes) -> bytes:
    """PACKAGED with its nested stream (the device state QEMU sends at switchover)."""
    return encode_command(Packaged(len(blob))) + blob


def parse_command(cmd: int, payload: bytes) -> PostcopyCommand:
    """Check one command's payload (after the caller checked fixed lengths against
    :data:`pyvm.migration.stream.constants.MIG_COMMANDS`)."""
    name, expected = MIG_COMMANDS.get(cmd, ("INVALID", -1))
    if expected != -1 and expected != len(payload):
        raise StreamFormatError(f"{name} received with bad length - expecting {expected}, "
                                f"got {len(payload)}", errno=errno.ERANGE)
    if cmd == MIG_CMD_OPEN_RETURN_PATH:
        return OpenReturnPath()
    if cmd == MIG_CMD_PING:
        return Ping(struct.unpack(">I", payload)[0])
    if cmd == MIG_CMD_POSTCOPY_ADVISE:
        return _parse_advise(payload)
    if cmd == MIG_CMD_POSTCOPY_LISTEN:
        return PostcopyListen()
    if cmd == MIG_CMD_POSTCOPY_RUN:
        return PostcopyRun()
    if cmd == MIG_CMD_POSTCOPY_RAM_DISCARD:
        return _parse_discard(payload)
    if cmd == MIG_CMD_PACKAGED:
        size = struct.unpack(">I", payload)[0]
        if size > MAX_VM_CMD_PACKAGED_SIZE:
            raise StreamFormatError(f"Unreasonably large packaged state: {size}")
        return Packaged(size)
    if cmd == MIG_CMD_POSTCOPY_RESUME:
        return PostcopyResume()
    if cmd == MIG_CMD_RECV_BITMAP:
        if not payload or payload[0] + 1 != len(payload):
            raise StreamFormatError(f"CMD_RECV_BITMAP: invalid length {len(payload)}")
        return RecvBitmap(payload[1:].decode(errors="replace"))
    raise StreamFormatError(f"MIG_CMD 0x{cmd:x} unknown (len 0x{len(payload):x})")


def _parse_advise(payload: bytes) -> PostcopyAdvise:
    if len(payload) == 0:
        # dirty-bitmap postcopy only: no RAM postcopy (savevm.c loadvm_postcopy_handle_advise)
        return PostcopyAdvise(0, 0)
    if len(payload) != 16:
        raise StreamFormatError(f"CMD_POSTCOPY_ADVISE invalid length ({len(payload)})")
    summary, target = struct.unpack(">QQ", payload)
    return PostcopyAdvise(summary, target)


def check_advise(advise: PostcopyAdvise, host_page_summary: int,
                 target_page_size: int = TARGET_PAGE_SIZE) -> None:
    """The destination's checks of POSTCOPY_ADVISE (savevm.c loadvm_postcopy_handle_advise)."""
    if advise.host_page_summary != host_page_summary:
        raise StreamMismatchError(
            f"Postcopy needs matching RAM page sizes (s={advise.host_page_summary:x} "
            f"d={host_page_summary:x})")
    if advise.target_page_size != target_page_size:
        raise StreamMismatchError(
            f"Postcopy needs matching target page sizes (s={advise.target_page_size} "
            f"d={target_page_size})")


def _parse_discard(payload: bytes) -> RamDiscard:
    # savevm.c loadvm_postcopy_ram_handle_discard
    if len(payload) < 3:
        raise StreamFormatError(f"CMD_POSTCOPY_RAM_DISCARD invalid length ({len(payload)})")
    if payload[0] != POSTCOPY_RAM_DISCARD_VERSION:
        raise StreamFormatError(f"CMD_POSTCOPY_RAM_DISCARD invalid version ({payload[0]})")
    namelen = payload[1]
    if 2 + namelen + 1 > len(payload):
        raise StreamFormatError(f"CMD_POSTCOPY_RAM_DISCARD invalid length ({len(payload)})")
    name = payload[2:2 + namelen]
    if payload[2 + namelen] != 0:
        raise StreamFormatError(f"CMD_POSTCOPY_RAM_DISCARD missing nil ({payload[2 + namelen]})")
    rest = payload[3 + namelen:]
    if len(rest) % 16:
        raise StreamFormatError(f"CMD_POSTCOPY_RAM_DISCARD invalid length ({len(payload)})")
    ranges = tuple(struct.iter_unpack(">QQ", rest))
    return RamDiscard(name.decode(errors="replace"), ranges)
