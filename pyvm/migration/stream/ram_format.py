"""The payload of the ``ram`` section, version 4 (QEMU migration/ram.c ``ram_save_setup``,
``save_zero_page``, ``save_normal_page``).

Every record starts with a be64 word holding a page-aligned offset inside a RAM block and
flags in the low 12 bits::

    setup (START)  be64 total|MEM_SIZE, then per block: counted name, be64 length
                   [, be64 GPA when x-ignore-shared is on]; be64 EOS
    pages          be64 offset|ZERO|[CONTINUE] [counted block name] u8 fill (0)
                   be64 offset|PAGE|[CONTINUE] [counted block name] 4096 bytes
    end            be64 EOS closes every START/PART/END payload

``CONTINUE`` means "same block as the previous record", so the name is sent only when the
block changes.

This module holds the block description both sides share (:class:`StreamBlock`) and the
writing side: :meth:`RamPageWriter.encode_pages` hands page bytes out as memoryviews of
guest RAM; :meth:`RamPageWriter.batch_run` lays out a batch of records natively with the
page bytes left in guest RAM until a descriptor channel sends them with ``writev``.  The
loading side is :mod:`pyvm.migration.stream.ram_loader`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import numpy as np

from pyvm.migration.errors import EncodeError
from pyvm.migration.stream.constants import (MAX_COUNTED_STRING, RAM_SAVE_FLAG_CONTINUE,
                                             RAM_SAVE_FLAG_EOS, RAM_SAVE_FLAG_MEM_SIZE,
                                             RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_ZERO,
                                             TARGET_PAGE_BITS, TARGET_PAGE_SIZE)
from pyvm.migration.stream.writer import StreamWriter

_NO_PAGES = np.zeros(0, dtype=np.uint8)

#: Called for each page record a loader applies: ``(offset_in_block, is_zero)``.
PageObserver = Callable[[int, bool], None]


@dataclass(eq=False)
class StreamBlock:
    """One RAM block as the stream sees it.

    ``length`` is QEMU's used_length (a multiple of the page size); ``gpa`` the guest
    physical address (sent and checked only with x-ignore-shared); ``buffer`` the block's
    bytes (readable on the source, writable on the destination; None for a block whose
    pages are not migrated); ``ignored`` marks a block x-ignore-shared leaves out (shared,
    file-backed): it is listed in the setup but no pages are sent for it.
    ``on_page`` lets an analyzer see every page record applied to the block.
    ``written`` (destination only, optional) is a uint8 array with one entry per page, 0
    where the page is known to be zero: a ZERO record for such a page is applied without
    reading it.  The loader keeps it current as it writes pages.
    """

    name: str
    length: int
    gpa: int = 0
    buffer: Any = None
    ignored: bool = False
    on_page: Optional[PageObserver] = None
    written: Any = None


# -- writing ---------------------------------------------------------------------------------


#: Called after each block's setup entry with the writer (mapped-ram writes its header).
BlockTrailer = Callable[[StreamWriter, StreamBlock], None]


def write_ram_setup(w: StreamWriter, blocks: Iterable[StreamBlock], ignore_shared: bool,
                    block_trailer: BlockTrailer | None = None) -> None:
    """The START payload: MEM_SIZE total, the block list, EOS (ram_save_setup);
    ``block_trailer`` adds what follows each entry (mapped-ram's header)."""
    blocks = list(blocks)
    for block in blocks:
        if block.length % TARGET_PAGE_SIZE:
            raise EncodeError(f"RAM block {block.name!r}: length 0x{block.length:x} is not page aligned")
    total = sum(block.length for block in blocks)
    w.be64(total | RAM_SAVE_FLAG_MEM_SIZE)
    for block in blocks:
        w.counted_string(block.name)
        w.be64(block.length)
        if ignore_shared:
            w.be64(block.gpa)
        if block_trailer is not None:
            block_trailer(w, block)
    w.be64(RAM_SAVE_FLAG_EOS)


def write_ram_eos(w: StreamWriter) -> None:
    w.be64(RAM_SAVE_FLAG_EOS)


class _Records:
    """The layout of one call's records: record ``i`` starts at ``starts[i]``, its header
    (be64 word, then the counted block name for a record that names its block) ends at
    ``body[i]``, where the fill byte (ZERO) or the page payload (PAGE) begins."""

    __slots__ = ("indices", "zero", "normal", "normals", "starts", "body", "total", "name", "headers")

    def __init__(self, indices: np.ndarray, zero: np.ndarray, name: bytes, page_payload: bool) -> None:
        self.indices, self.zero, self.name = indices, zero, name
        self.normal = ~zero
        self.normals = int(np.count_nonzero(self.normal))
        self.headers = (indices.astype(np.uint64) << np.uint64(TARGET_PAGE_BITS)) | np.where(
            zero, np.uint64(RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE),
            np.uint64(RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE))
        header_sizes = np.full(indices.size, 8, dtype=np.int64)
        if name:
            self.headers[0] &= ~np.uint64(RAM_SAVE_FLAG_CONTINUE)
            header_sizes[0] += 1 + len(name)
        sizes = header_sizes + zero
        if page_payload:
            sizes += self.normal * TARGET_PAGE_SIZE
        ends = np.cumsum(sizes)
        self.total = int(ends[-1])
        self.starts = ends - sizes
        self.body = self.starts + header_sizes

    def write_small(self, out: np.ndarray) -> None:
        """Headers, the block name and ZERO fill bytes into ``out`` (payload bytes untouched)."""
        out[(self.starts[:, None] + np.arange(8)).reshape(-1)] = (
            self.headers.astype(">u8").view(np.uint8))
        if self.name:
            out[8] = len(self.name)
            out[9:9 + len(self.name)] = np.frombuffer(self.name, dtype=np.uint8)
        out[self.body[self.zero]] = 0


class RamPageWriter:
    """Writes page records, naming a block only when it changes (CONTINUE otherwise)."""

    def __init__(self) -> None:
        self.last_block: str | None = None

    def reset(self) -> None:
        """Forget the last block: the next record names its block (start of a section)."""
        self.last_block = None

    def _checked(self, block: StreamBlock, page_indices: Iterable[int],
                 zero_mask: Iterable[bool]) -> tuple[np.ndarray, np.ndarray]:
        """The request as (indices, zero mask) arrays, checked against the block."""
        if block.ignored:
            raise EncodeError(f"RAM block {block.name!r} is not migrated (x-ignore-shared)")
        try:
            indices = np.asarray(page_indices if hasattr(page_indices, "__len__")
                                 else list(page_indices), dtype=np.int64).reshape(-1)
        except OverflowError:
            raise EncodeError(f"a page index lies outside RAM block {block.name!r}") from None
        zero = np.asarray(zero_mask if hasattr(zero_mask, "__len__") else list(zero_mask),
                          dtype=bool).reshape(-1)
        count = min(indices.size, zero.size)        # as zip() pairs them
        indices, zero = indices[:count], zero[:count]
        npages = block.length >> TARGET_PAGE_BITS
        outside = (indices < 0) | (indices >= npages)
        if outside.any():
            index = int(indices[int(np.argmax(outside))])
            raise EncodeError(f"page {index} outside RAM block {block.name!r} ({npages} pages)")
        if count and block.buffer is None and not zero.all():
            raise EncodeError(f"RAM block {block.name!r} has no buffer to send pages from")
        return indices, zero

    def _name_to_send(self, block: StreamBlock) -> bytes:
        """The block name the next record carries: empty when CONTINUE will do."""
        if self.last_block == block.name:
            return b""
        name = block.name.encode()
        if len(name) > MAX_COUNTED_STRING:
            raise EncodeError(f"name too long for the stream ({len(name)} > 255 bytes): "
                              f"{name[:40]!r}...")
        return name

    def _records(self, block: StreamBlock, page_indices: Iterable[int], zero_mask: Iterable[bool],
                 page_payload: bool) -> _Records | None:
        """Checks the request and lays out its records; None when there are none."""
        indices, zero = self._checked(block, page_indices, zero_mask)
        if indices.size == 0:
            return None
        records = _Records(indices, zero, self._name_to_send(block), page_payload)
        self.last_block = block.name
        return records

    def encode_pages(self, w: StreamWriter, block: StreamBlock, page_indices: Iterable[int],
                    zero_mask: Iterable[bool]) -> tuple[int, int]:
        """ZERO/PAGE records for ``page_indices``; returns (zero pages, normal pages).

        ``zero_mask[i]`` says whether page ``page_indices[i]`` is all zero.  Page bytes
        are appended as memoryviews of ``block.buffer``, not copied; the headers of the
        whole call are built at once (numpy, big-endian words), and what lies between two
        page payloads goes out as one ``bytes`` chunk.
        """
        records = self._records(block, page_indices, zero_mask, page_payload=False)
        if records is None:
            return 0, 0
        small = np.empty(records.total, dtype=np.uint8)
        records.write_small(small)
        small_bytes = small.tobytes()
        if records.normals:
            data = memoryview(block.buffer).cast("B")
            last = 0
            for cut, index in zip(records.body[records.normal].tolist(),
                                  records.indices[records.normal].tolist()):
                w.raw(small_bytes[last:cut])
                offset = index << TARGET_PAGE_BITS
                w.view(data[offset:offset + TARGET_PAGE_SIZE])
                last = cut
            if last < len(small_bytes):
                w.raw(small_bytes[last:])
        else:
            w.raw(small_bytes)
        return records.indices.size - records.normals, records.normals

    def batch_run(self, batch: Any, block: StreamBlock, indices: np.ndarray, start: int,
                  known_zero: np.ndarray | None = None) -> tuple[int, int, int]:
        """Records for ``indices[start:]`` into ``batch`` (a ``pyvm.fastpath.RecordBatch``),
        as many as it holds; page bytes stay in ``block.buffer`` until it is sent.

        A page goes as ZERO when ``known_zero[i]`` says so (pages never populated, for
        instance) or when it reads as all zero (scanned natively on the way); else as
        PAGE.  Returns (next start, bytes, zero pages).
        """
        if block.ignored:
            raise EncodeError(f"RAM block {block.name!r} is not migrated (x-ignore-shared)")
        known = _NO_PAGES if known_zero is None else known_zero.view(np.uint8)
        src = _NO_PAGES if block.buffer is None else np.frombuffer(block.buffer, dtype=np.uint8)
        try:
            end, nbytes, zeros = batch.pack(src, block.length >> TARGET_PAGE_BITS,
                                            np.ascontiguousarray(indices, dtype=np.int64), start,
                                            known, True, self._name_to_send(block))
        except ValueError as err:
            raise EncodeError(f"RAM block {block.name!r}: {err}") from None
        if end > start:
            self.last_block = block.name
        return end, nbytes, zeros
