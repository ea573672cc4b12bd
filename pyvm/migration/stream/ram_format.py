"""The payload of the ``ram`` section, version 4 (QEMU migration/ram.c; fact sheet 1.8).

Every record starts with a be64 word holding a page-aligned offset inside a RAM block and
flags in the low 12 bits::

    setup (START)  be64 total|MEM_SIZE, then per block: counted name, be64 length
                   [, be64 GPA when x-ignore-shared is on]; be64 EOS
    pages          be64 offset|ZERO|[CONTINUE] [counted block name] u8 fill (0)
                   be64 offset|PAGE|[CONTINUE] [counted block name] 4096 bytes
    end            be64 EOS closes every START/PART/END payload

``CONTINUE`` means "same block as the previous record", so the name is sent only when the
block changes.

This module holds the block description both sides share (:class:`RamBlock`) and the
writing side: :meth:`RamPageWriter.batch_run` lays out a batch of records natively with
the page bytes left in guest RAM until a descriptor channel sends them with ``writev``.
The loading side is :mod:`pyvm.migration.stream.ram_loader`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import numpy as np

from pyvm.migration.errors import EncodeError
from pyvm.migration.stream.constants import (MAX_COUNTED_STRING, RAM_SAVE_FLAG_EOS,
                                             RAM_SAVE_FLAG_MEM_SIZE, TARGET_PAGE_BITS,
                                             TARGET_PAGE_SIZE)
from pyvm.migration.stream.writer import StreamWriter

_NO_PAGES = np.zeros(0, dtype=np.uint8)

#: Called for each page record a loader applies: ``(offset_in_block, is_zero)``.
PageObserver = Callable[[int, bool], None]


@dataclass(eq=False)
class RamBlock:
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


def write_ram_setup(w: StreamWriter, blocks: Iterable[RamBlock], ignore_shared: bool) -> None:
    """The START payload: MEM_SIZE total, the block list, EOS (ram_save_setup)."""
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
    w.be64(RAM_SAVE_FLAG_EOS)


def write_ram_eos(w: StreamWriter) -> None:
    w.be64(RAM_SAVE_FLAG_EOS)


class RamPageWriter:
    """Writes page records, naming a block only when it changes (CONTINUE otherwise)."""

    def __init__(self) -> None:
        self.last_block: str | None = None

    def reset(self) -> None:
        """Forget the last block: the next record names its block (start of a section)."""
        self.last_block = None

    def _name_to_send(self, block: RamBlock) -> bytes:
        """The block name the next record carries: empty when CONTINUE will do."""
        if self.last_block == block.name:
            return b""
        name = block.name.encode()
        if len(name) > MAX_COUNTED_STRING:
            raise EncodeError(f"name too long for the stream ({len(name)} > 255 bytes): "
                              f"{name[:40]!r}...")
        return name

    def batch_run(self, batch: Any, block: RamBlock, indices: np.ndarray, start: int,
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
