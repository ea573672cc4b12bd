"""pyvm-analyze on postcopy streams: the commands, and device sections without a vmdesc.

A postcopy stream (QEMU's docs/devel/migration/postcopy.rst; migration/savevm.c
``qemu_savevm_send_*``) carries ``QEMU_VM_COMMAND`` records between its sections:
``OPEN_RETURN_PATH``, ``PING``, ``POSTCOPY_ADVISE``, ``POSTCOPY_RAM_DISCARD`` and one
``PACKAGED`` command whose payload is the length of a nested stream that follows inline
(``POSTCOPY_LISTEN``, every device's FULL section, ``POSTCOPY_RUN``); after the
package, the remaining RAM pages, the ``ram`` END section and ``QEMU_VM_EOF``.  It ends
there: neither QEMU nor pyvm write the vmdesc trailer after postcopy, so the devices'
fields cannot be named.  The analyzer lists every command with its arguments
(:class:`CommandLog`) and shows a device section it has no description for by its size
(:class:`OpaqueSection`), which it finds by the section footer QEMU writes after every
section (``0x7e``, ``be32 section id``): the footer must be followed by the start of the
next record, and the decoder then checks the id it reads.
"""

from __future__ import annotations

from typing import Any, Callable, Generator

from pyvm.migration.stream import postcopy_commands as pc
from pyvm.migration.stream.constants import (QEMU_VM_COMMAND, QEMU_VM_EOF,
                                             QEMU_VM_SECTION_END, QEMU_VM_SECTION_FOOTER,
                                             QEMU_VM_SECTION_FULL, QEMU_VM_SECTION_PART,
                                             QEMU_VM_SECTION_START)
from pyvm.migration.errors import StreamFormatError
from pyvm.migration.stream.reader import StreamReader

#: a section without description larger than this is taken for damage
MAX_OPAQUE_SECTION = 64 << 20
_NEXT_RECORD = (QEMU_VM_EOF, QEMU_VM_SECTION_START, QEMU_VM_SECTION_PART, QEMU_VM_SECTION_END,
                QEMU_VM_SECTION_FULL, QEMU_VM_COMMAND)
_MAX_SECTION_ID = 0xFFFF


def describe_command(command: pc.PostcopyCommand) -> dict[str, Any]:
    """One command as the analyzer prints it."""
    name = {pc.OpenReturnPath: "OPEN_RETURN_PATH", pc.Ping: "PING",
            pc.PostcopyAdvise: "POSTCOPY_ADVISE", pc.PostcopyListen: "POSTCOPY_LISTEN",
            pc.PostcopyRun: "POSTCOPY_RUN", pc.RamDiscard: "POSTCOPY_RAM_DISCARD",
            pc.Packaged: "PACKAGED", pc.PostcopyResume: "POSTCOPY_RESUME",
            pc.RecvBitmap: "RECV_BITMAP"}[type(command)]
    out: dict[str, Any] = {"command": name}
    if isinstance(command, pc.Ping):
        out["value"] = command.value
    elif isinstance(command, pc.PostcopyAdvise):
        out["host page summary"] = f"0x{command.host_page_summary:x}"
        out["target page size"] = command.target_page_size
    elif isinstance(command, pc.RamDiscard):
        out["block"] = command.block
        out["ranges"] = len(command.ranges)
        out["pages"] = sum(length for _, length in command.ranges) // 4096
    elif isinstance(command, pc.Packaged):
        out["length"] = command.size
    elif isinstance(command, pc.RecvBitmap):
        out["block"] = command.block
    return out


class CommandLog:
    """``StreamDecoder.on_command`` for the analyzer: records each command; at
    ``POSTCOPY_LISTEN`` the stream is known to end at ``QEMU_VM_EOF`` (no vmdesc)."""

    def __init__(self, on_listen: Callable[[], None]) -> None:
        self.commands: list[dict[str, Any]] = []
        self.postcopy = False
        self._on_listen = on_listen

    def handle(self, cmd: int, payload: bytes) -> None:
        command = pc.parse_command(cmd, payload)
        self.commands.append(describe_command(command))
        if isinstance(command, (pc.PostcopyAdvise, pc.PostcopyListen, pc.Packaged)):
            self.postcopy = True
        if isinstance(command, pc.PostcopyListen):
            self._on_listen()


class OpaqueSection:
    """A device section the analyzer has no description for: its bytes are skipped up to
    the section footer, and its size is shown."""

    version_id = None

    def __init__(self, idstr: str) -> None:
        self.idstr = idstr
        self.values: dict[str, Any] = {}

    def load_section(self, r: StreamReader, version_id: int) -> Generator[None, None, None]:
        size = 0
        while True:
            # a footer candidate: 0x7e, a plausible id, then the next record's first byte
            while r.available >= 6:
                if r.peek(1) == bytes((QEMU_VM_SECTION_FOOTER,)):
                    head = r.peek(6)
                    section_id = int.from_bytes(head[1:5], "big")
                    if section_id <= _MAX_SECTION_ID and head[5] in _NEXT_RECORD:
                        self.values = {"size": size, "fields": "not described: the stream has "
                                       "no vmdesc (postcopy streams end without one)"}
                        return
                r.skip(1)
                size += 1
                if size > MAX_OPAQUE_SECTION:
                    raise StreamFormatError(f"Missing section footer for {self.idstr}",
                                            detail="no footer within "
                                            f"{MAX_OPAQUE_SECTION} bytes")
            ok = yield from r.wait_or_end(r.available + 1)
            if not ok:
                raise StreamFormatError(f"Missing section footer for {self.idstr}")
