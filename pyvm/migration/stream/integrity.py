"""Streams that cannot load half-right: section completeness and section checksums.

**Completeness.**

QEMU's loader (migration/savevm.c ``qemu_loadvm_state_main``) tolerates a section that
never arrives (the device keeps its reset state) and loads one that arrives twice (the
second wins).  A damaged or crafted stream can so "complete" with a vCPU that never got its
registers, or without ``globalstate`` (a guest the source had paused then runs).  pyvm's
destination knows which sections its own VM needs, so it refuses both:

* a START/FULL section for an (idstr, instance_id) already opened fails at once;
* at ``QEMU_VM_EOF`` every expected (idstr, instance_id) must have been opened.

The decoder only runs these checks when its caller names the expected sections (the VM's
migratable devices, ``ram`` and ``globalstate``); analyzers, which load any stream, do not.

**Checksums** (capability ``x-checksum``, off by default, so that by default the stream
stays QEMU's byte for byte).  With it on, every START/PART/END/FULL section is followed,
right after its footer, by::

    be32 crc32c      CRC-32C (Castagnoli) of the section's bytes, from its type byte to
                     the last byte of its footer, *chained*: the CRC starts from the
                     previous section's checksum (0 for the first section)

Chaining makes the checksum cover the order of sections too: a section dropped, repeated
or moved breaks every checksum after it, even though each section is intact on its own.

The source closes the ``ram`` section after every batch of at most 256 pages and opens a
new PART section, so each page batch carries its own checksum (a damaged batch is found
before the next one is loaded).  The capability is a *validated* one: it is listed in the
configuration section and both ends must agree, so a stream stripped of its checksums is
refused by a destination that asked for them (``Capability x-checksum is on, but received
capability is off``).  The header and configuration section are checked by their own
rules (magic, version, machine type, capabilities); the vmdesc trailer after
``QEMU_VM_EOF`` is never loaded.

Why CRC-32C rather than Firecracker's CRC-64: it is computed in hardware (SSE 4.2
``crc32`` instruction, ARMv8 CRC) by the ``google-crc32c`` package where the CPU has it, so
checksumming a page batch costs little next to sending it; its Hamming distance is at least
4 for messages far longer than a section (Koopman's CRC tables) and it detects every burst
error up to 32 bits at any length, which covers bit flips and torn writes.  It is not a MAC: against a peer that forges
streams use TLS (``tls-creds``), not a checksum.
"""

from __future__ import annotations

import struct
from typing import Collection, Union

import google_crc32c

from pyvm.migration.errors import StreamFormatError

#: the capability that adds a checksum after every section (validated by the destination)
CHECKSUM_CAPABILITY = "x-checksum"
CHECKSUM_SIZE = 4
_BE32 = struct.Struct(">I")

Bytes = Union[bytes, bytearray, memoryview]


def crc32c_extend(value: int, data: Bytes) -> int:
    """CRC-32C of the bytes so far (``value``) extended by ``data``.

    The C extension takes only ``bytes``, so views of writable buffers are copied first.
    """
    return int(google_crc32c.extend(value, data if isinstance(data, bytes) else bytes(data)))


def checksum_bytes(value: int) -> bytes:
    """The checksum as it follows a section footer."""
    return _BE32.pack(value)


def check_section_checksum(idstr: str, section_id: int, received: int, computed: int) -> None:
    """Refuse a section whose bytes do not match the checksum that follows it."""
    if received != computed:
        raise StreamFormatError(
            f"Checksum mismatch in section {section_id} ({idstr}): "
            f"received 0x{received:08x}, computed 0x{computed:08x}",
            detail="the section was damaged on its way")

Key = tuple[str, int]

#: sections the destination lists at most this many of in one error line
MAX_LISTED = 8


def _name(key: Key) -> str:
    return f"'{key[0]}' instance {key[1]}"


class SectionTally:
    """Counts START/FULL sections against the set the destination expects."""

    def __init__(self, expected: Collection[Key]) -> None:
        self.expected = frozenset(expected)
        self.seen: set[Key] = set()

    def opened(self, idstr: str, instance_id: int) -> None:
        """A START/FULL section for (idstr, instance_id) begins; a repeat is refused."""
        key = (idstr, instance_id)
        if key in self.seen:
            raise StreamFormatError(f"Section {_name(key)} appears twice in the migration stream",
                                    detail="a damaged or crafted stream repeats a device's state")
        self.seen.add(key)

    def missing(self) -> list[Key]:
        """Expected sections not received, in a stable order."""
        return sorted(self.expected - self.seen)

    def check_complete(self) -> None:
        """At ``QEMU_VM_EOF``: every expected section must have been received."""
        missing = self.missing()
        if not missing:
            return
        names = ", ".join(_name(k) for k in missing[:MAX_LISTED])
        more = f" and {len(missing) - MAX_LISTED} more" if len(missing) > MAX_LISTED else ""
        raise StreamFormatError(
            f"Migration stream ended without the state of {names}{more}",
            "load of an incomplete stream refused: the guest would run with reset device state")
