"""Bytes from a migration stream, shown in messages.

Names a stream carries (section idstrs, RAM block names, capability and subsection names,
the machine type, the run state) come from the peer.  Printed raw they could carry
newlines, terminal escape sequences or invalid UTF-8 into ``error-desc``, stderr and logs.
:func:`shown` keeps printable ASCII as it is and writes every other byte as ``\\xNN`` (a
backslash as ``\\\\``), so a name that matches a real device prints exactly as QEMU prints
it, and anything else is visible and harmless.
"""

from __future__ import annotations

# One entry per byte value: printable ASCII as itself, the rest escaped.
_TABLE = tuple(
    "\\\\" if b == 0x5C else chr(b) if 0x20 <= b < 0x7F else f"\\x{b:02x}"
    for b in range(256)
)

#: bytes shown before an ellipsis: a peer cannot make a message long
MAX_SHOWN = 256


def shown(raw: bytes | bytearray | memoryview, limit: int = MAX_SHOWN) -> str:
    """``raw`` as printable ASCII, escaped byte by byte, cut after ``limit`` bytes."""
    data = bytes(raw)
    text = "".join(_TABLE[b] for b in data[:limit])
    return text + "..." if len(data) > limit else text


def shown_name(raw: bytes | bytearray | memoryview) -> str:
    """A counted name as the C code sees it: up to its first NUL, then :func:`shown`."""
    return shown(bytes(raw).split(b"\0", 1)[0])
