"""The postcopy preempt channel's byte format: RAM page records only (sans-IO).

With ``postcopy-preempt`` (QEMU 7.1+, docs/devel/migration/postcopy.rst "Postcopy
Preemption Mode") the source sends the pages the destination asked for on a second
connection of their own.  That channel has no header and no sections: it carries the
records of the ``ram`` section (migration/ram.c ``save_normal_page``,
``save_zero_page``), each ``be64 offset | flags``, the block name (one length byte, then
the name) unless ``RAM_SAVE_FLAG_CONTINUE`` says "same block as the record before on this
channel", then the page (``PAGE``) or one fill byte (``ZERO``).  ``RAM_SAVE_FLAG_EOS``
ends it (``postcopy_preempt_shutdown_file``).  The destination reads it on its own thread
(migration/postcopy-ram.c ``postcopy_preempt_thread`` -> ram.c ``ram_load_postcopy`` on
``RAM_CHANNEL_POSTCOPY``).

:class:`PreemptPageParser` is fed bytes and yields :class:`PreemptPage` records and, at the
end, :data:`END`.  Every length it reads is bounded (one page, a 255-byte name).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterator, Union

from pyvm.migration.errors import StreamFormatError
from pyvm.migration.stream.constants import (RAM_SAVE_FLAG_CONTINUE, RAM_SAVE_FLAG_EOS,
                                             RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_ZERO,
                                             TARGET_PAGE_SIZE)

_BE64 = struct.Struct(">Q")
_FLAG_BITS = TARGET_PAGE_SIZE - 1
#: the end of the preempt stream
EOS_RECORD = _BE64.pack(RAM_SAVE_FLAG_EOS)


@dataclass(frozen=True)
class PreemptPage:
    """One page: block, byte offset in it, and its bytes (None: a zero page)."""

    block: str
    offset: int
    data: bytes | None


class _End:
    def __repr__(self) -> str:
        return "END"


END = _End()
Record = Union[PreemptPage, _End]


class PreemptPageParser:
    """Push parser for the preempt channel; refuses any use after an error or the end."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._block: str | None = None
        self.ended = False
        self._error: StreamFormatError | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[Record]:
        """The records completed by ``data``, in order (a generator: iterate it)."""
        if self._error is not None:
            raise self._error
        if self.ended:
            if len(data):
                self._error = StreamFormatError("postcopy preempt channel: data after its end")
                raise self._error
            return
        self._buf += data
        try:
            yield from self._parse()
        except StreamFormatError as err:
            self._error = err
            raise

    def _parse(self) -> Iterator[Record]:
        buf = self._buf
        pos = 0
        try:
            while len(buf) - pos >= 8:
                (word,) = _BE64.unpack_from(buf, pos)
                flags, offset = word & _FLAG_BITS, word & ~_FLAG_BITS
                if flags & RAM_SAVE_FLAG_EOS:
                    if flags != RAM_SAVE_FLAG_EOS:
                        raise StreamFormatError(f"Unknown combination of migration flags: "
                                                f"0x{flags:x} (postcopy mode)")
                    pos += 8
                    self.ended = True
                    if len(buf) > pos:
                        raise StreamFormatError("postcopy preempt channel: data after its end")
                    yield END
                    return
                kind = flags & ~RAM_SAVE_FLAG_CONTINUE
                if kind not in (RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_ZERO):
                    raise StreamFormatError(f"Unknown combination of migration flags: "
                                            f"0x{flags:x} (postcopy mode)")
                at = pos + 8
                if flags & RAM_SAVE_FLAG_CONTINUE:
                    if self._block is None:
                        raise StreamFormatError("Ack, bad migration stream!")
                    block = self._block
                else:
                    if len(buf) - at < 1:
                        return
                    n = buf[at]
                    if len(buf) - at < 1 + n:
                        return
                    block = bytes(buf[at + 1:at + 1 + n]).decode("latin-1")
                    at += 1 + n
                size = TARGET_PAGE_SIZE if kind == RAM_SAVE_FLAG_PAGE else 1
                if len(buf) - at < size:
                    return
                if kind == RAM_SAVE_FLAG_PAGE:
                    page: bytes | None = bytes(buf[at:at + size])
                else:
                    if buf[at] != 0:
                        raise StreamFormatError(f"Found a zero page with value {buf[at]}")
                    page = None
                self._block = block
                pos = at + size
                yield PreemptPage(block, offset, page)
        finally:
            del buf[:pos]
