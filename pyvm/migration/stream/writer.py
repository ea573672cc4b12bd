"""Stream primitives, writing side: big-endian integers, counted strings and raw bytes.

A :class:`StreamWriter` collects small writes in a bytearray and page payloads as
memoryviews, without copying them.  :meth:`StreamWriter.take_chunks` hands out the list of
chunks written so far (``bytes`` for the small writes, the caller's memoryviews as they
were given) so that a transport can ``writev``/``sendmsg`` them straight from guest RAM.

Nothing here knows about sections or RAM; the layers above decide what to write.
"""

from __future__ import annotations

import struct
from typing import Union

from pyvm.migration.errors import EncodeError
from pyvm.migration.stream.constants import MAX_COUNTED_STRING

Chunk = Union[bytes, memoryview]

_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")


class StreamWriter:
    """Appends stream items to an in-memory list of chunks."""

    def __init__(self) -> None:
        self._small = bytearray()
        self._chunks: list[Chunk] = []
        self._flushed_bytes = 0

    # -- integers ------------------------------------------------------------------------
    def u8(self, value: int) -> None:
        self._small.append(value)

    def be16(self, value: int) -> None:
        self._small += _BE16.pack(value)

    def be32(self, value: int) -> None:
        self._small += _BE32.pack(value)

    def be64(self, value: int) -> None:
        self._small += _BE64.pack(value)

    # -- strings and bytes -------------------------------------------------------------------
    def counted_string(self, text: str | bytes) -> None:
        """One length byte, then the bytes (no NUL); at most 255 bytes."""
        data = text.encode() if isinstance(text, str) else bytes(text)
        if len(data) > MAX_COUNTED_STRING:
            raise EncodeError(f"name too long for the stream ({len(data)} > 255 bytes): {data[:40]!r}...")
        self._small.append(len(data))
        self._small += data

    def raw(self, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into the stream (small items)."""
        self._small += data

    def view(self, data: memoryview) -> None:
        """Append ``data`` as its own chunk without copying it (page payloads)."""
        if self._small:
            self._flush_small()
        self._chunks.append(data)
        self._flushed_bytes += data.nbytes

    # -- output ------------------------------------------------------------------------------
    def _flush_small(self) -> None:
        piece = bytes(self._small)
        self._chunks.append(piece)
        self._flushed_bytes += len(piece)
        self._small.clear()

    @property
    def size(self) -> int:
        """Bytes written since the last :meth:`take_chunks`."""
        return self._flushed_bytes + len(self._small)

    def take_chunks(self) -> list[Chunk]:
        """Everything written so far, in order; the writer starts empty again."""
        if self._small:
            self._flush_small()
        chunks, self._chunks = self._chunks, []
        self._flushed_bytes = 0
        return chunks
