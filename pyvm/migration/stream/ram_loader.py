"""Loading the ``ram`` section (QEMU migration/ram.c ``ram_load_precopy``).

The record layout is described in :mod:`pyvm.migration.stream.ram_format`.  Pages are written
straight into the block buffers the destination provided, after checking that the offset
lies inside the block.  Runs of ``CONTINUE`` PAGE/ZERO records go through the native
:func:`pyvm.fastpath.load_page_run`; every other record, and every error, is handled by
the Python parser here.
"""

from __future__ import annotations

import errno
import struct
from typing import Callable, Generator, Optional, Protocol

import numpy as np

from pyvm.fastpath import load_page_run
from pyvm.xbzrle import ENCODING_FLAG_XBZRLE, decode as xbzrle_decode
from pyvm.migration.errors import (StreamFormatError, StreamMismatchError, TruncatedStreamError,
                                   UnsupportedFeatureError)
from pyvm.migration.stream.mapped_ram import (HEADER_SIZE, MAPPED_RAM_HDR_VERSION, MappedRamHeader,
                                              bitmap_size, unpack_bitmap)
from pyvm.migration.stream.ram_format import StreamBlock
from pyvm.migration.stream.constants import (MAX_RAM_BLOCKS, RAM_SAVE_FLAG_COMPRESS_PAGE,
                                             RAM_SAVE_FLAG_CONTINUE, RAM_SAVE_FLAG_EOS,
                                             RAM_SAVE_FLAG_HOOK, RAM_SAVE_FLAG_MEM_SIZE,
                                             RAM_SAVE_FLAG_MULTIFD_FLUSH, RAM_SAVE_FLAG_PAGE,
                                             RAM_SAVE_FLAG_XBZRLE, RAM_SAVE_FLAG_ZERO,
                                             TARGET_PAGE_BITS, TARGET_PAGE_SIZE)
from pyvm.migration.stream.reader import StreamReader
from pyvm.migration.stream.text import shown

_BE64 = struct.Struct(">Q")
_FLAG_BITS = TARGET_PAGE_SIZE - 1
_ZERO_PAGE = bytes(TARGET_PAGE_SIZE)

BlockLookup = Callable[[str, int], Optional[StreamBlock]]



class MappedPageReader(Protocol):
    """Reads a mapped-ram block's pages itself (pyvm.migration.control.mapped_ram_restore)."""

    def read_block(self, name: str, view: memoryview, pages_offset: int,
                   present: np.ndarray) -> int:
        """Read the pages whose bit is set from their slots into ``view``; how many."""

    def skip_input(self, n: int) -> None:
        """Move the input ``n`` bytes on (the pages region)."""


_EOS = object()
_MEM_SIZE = object()


def load_xbzrle_page(encoding: int, length: int, data: memoryview, page: memoryview,
                     addr: int) -> None:
    """Apply one XBZRLE record's payload to the page it names (ram.c ``load_xbzrle``):
    the encoding flag must be ENCODING_FLAG_XBZRLE, the length at most a page (``data``
    holds the encoding then; nothing past the length word is read otherwise), and the runs
    must decode within the page."""
    where = f"Failed to decompress XBZRLE page at {addr:x}"
    if encoding != ENCODING_FLAG_XBZRLE:
        raise StreamFormatError("Failed to load XBZRLE page - wrong compression!", where)
    if length > TARGET_PAGE_SIZE:
        raise StreamFormatError("Failed to load XBZRLE page - len overflow!", where)
    if xbzrle_decode(data, page) == -1:
        raise StreamFormatError("Failed to load XBZRLE page - decode error!", where)


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


class _LoadedBlock:
    """A destination block checked against the stream, with a writable byte view."""

    __slots__ = ("block", "view", "limit", "written")

    def __init__(self, block: StreamBlock) -> None:
        self.block = block
        self.view: memoryview | None = None
        self.limit = 0        # first offset a page may not start at
        self.written: np.ndarray | None = None
        if block.buffer is not None and not block.ignored:
            view = memoryview(block.buffer).cast("B")
            if view.readonly:
                raise StreamMismatchError(errno=errno.EACCES,
                                          detail=f"RAM block {block.name!r} buffer is read-only")
            self.view = view
            self.limit = min(block.length, view.nbytes) - TARGET_PAGE_SIZE + 1
            written = block.written
            if written is not None and len(written) >= view.nbytes >> TARGET_PAGE_BITS:
                self.written = np.frombuffer(written, dtype=np.uint8)


class RamLoader:
    """Applies ``ram`` section payloads to destination blocks (ram_load_precopy).

    ``lookup(name, length)`` returns the destination's block named ``name`` (``length`` is
    what the stream announced, 0 when a page names a block the setup did not list).
    ``ignore_shared`` is the destination's own x-ignore-shared setting.
    ``on_multifd_flush`` runs at each ``RAM_SAVE_FLAG_MULTIFD_FLUSH`` (ram.c calls
    ``multifd_recv_sync_main`` there); without it the record is a no-op.
    """

    def __init__(self, lookup: BlockLookup, ignore_shared: bool,
                 on_multifd_flush: Callable[[], None] | None = None,
                 mapped_ram: bool = False) -> None:
        self._lookup = lookup
        self.on_multifd_flush = on_multifd_flush
        self.ignore_shared = ignore_shared
        #: mapped-ram: each block entry is followed by a header, its bitmap and its pages
        #: (pyvm.migration.stream.mapped_ram); ``_origin`` is the file offset of stream byte 0
        self.mapped_ram = mapped_ram
        self._origin: int | None = None
        #: mapped-ram: per block, its header fields and the pages its bitmap holds
        self.mapped_blocks: dict[str, dict[str, int]] = {}
        self.blocks: dict[bytes, _LoadedBlock] = {}
        self._last: _LoadedBlock | None = None
        self._pending_total = 0
        self.zero_pages = 0
        self.normal_pages = 0
        #: postcopy: pages are handed to ``placer(block name, offset, page or None for a
        #: zero page)`` instead of being written (a registered missing range must be filled
        #: with UFFDIO_COPY, pyvm.userfault)
        self.placer: Callable[[str, int, memoryview | None], None] | None = None
        self.xbzrle_pages = 0
        #: mapped-ram with multifd: the pages regions are read by this reader's threads
        #: and skipped in the stream (QEMU ram.c read_ramblock_mapped_ram)
        self.page_reader: MappedPageReader | None = None

    def release(self) -> None:
        """Drop the views of the destination buffers (so that an mmap can be closed)."""
        for loaded in self.blocks.values():
            if loaded.view is not None:
                loaded.view.release()
                loaded.view = None
                loaded.limit = 0
        self._last = None

    def reopen(self) -> None:
        """Views of the destination buffers again after :meth:`release` (a postcopy stream
        carried on over a new connection)."""
        for key, loaded in list(self.blocks.items()):
            self.blocks[key] = _LoadedBlock(loaded.block)
        self._last = None

    # -- one section payload -----------------------------------------------------------------
    def load(self, r: StreamReader, version_id: int) -> Generator[None, None, None]:
        """Read records up to and including EOS."""
        if version_id != 4:
            raise StreamMismatchError(detail=f"RAM section version {version_id}, pyvm reads 4")
        while True:
            status = self._parse_buffered(r)
            if status is _EOS:
                return
            if status is _MEM_SIZE:
                yield from self._load_block_list(r, self._pending_total)
                continue
            assert isinstance(status, int)
            yield from r.wait(status, "a RAM page record")

    # -- setup: the block list ---------------------------------------------------------------
    def _load_block_list(self, r: StreamReader, total: int) -> Generator[None, None, None]:
        count = 0
        while total:
            count += 1
            if count > MAX_RAM_BLOCKS:
                raise StreamFormatError(detail=f"more than {MAX_RAM_BLOCKS} RAM blocks listed")
            raw = yield from r.read_counted("a RAM block name")
            raw = raw.split(b"\0", 1)[0]
            name = shown(raw)
            length = yield from r.read_be64(f"the length of RAM block {name}")
            block = self._lookup(name, length)
            if block is None:
                raise StreamMismatchError(f'Unknown ramblock "{name}", cannot accept migration')
            if length != block.length:
                raise StreamMismatchError(
                    f"Size mismatch: {name}: 0x{length:x} != 0x{block.length:x}: Invalid argument")
            if self.ignore_shared:
                gpa = yield from r.read_be64(f"the address of RAM block {name}")
                if block.ignored and gpa != block.gpa:
                    raise StreamMismatchError(f"Mismatched GPAs for block {name} "
                                              f"{_signed64(gpa)}!= {_signed64(block.gpa)}")
            self.blocks[raw] = _LoadedBlock(block)
            if self.mapped_ram:
                yield from load_mapped_block(self, r, self.blocks[raw], length)
            if length > total:
                raise StreamFormatError(detail="RAM block lengths exceed the MEM_SIZE total")
            total -= length

    def _block_named(self, raw: bytes, offset: int) -> _LoadedBlock:
        name = raw.split(b"\0", 1)[0]
        loaded = self.blocks.get(name)
        if loaded is None:
            block = self._lookup(shown(name), 0)
            if block is None:
                raise StreamMismatchError(f"Can't find block {shown(name)}",
                                          f"Illegal RAM offset {offset:x}")
            loaded = self.blocks[name] = _LoadedBlock(block)
        if loaded.block.ignored:
            raise StreamMismatchError(f"block {loaded.block.name} should not be migrated !",
                                      f"Illegal RAM offset {offset:x}")
        return loaded

    # -- pages: parsed in place while whole records are buffered ----------------------------
    def _parse_buffered(self, r: StreamReader) -> object:
        """Apply every complete record in the buffer.

        Returns ``_EOS``, ``_MEM_SIZE`` (header consumed, block list follows) or the
        number of bytes the next record needs.
        """
        buf = r.buffer
        pos = r.pos
        end = r.end
        unpack = _BE64.unpack_from
        page = TARGET_PAGE_SIZE
        whole = memoryview(buf)
        mv = whole[:end]            # the native run must not read past the input
        try:
            while True:
                loaded = self._last
                if (loaded is not None and loaded.view is not None and loaded.block.on_page is None
                        and self.placer is None):
                    # The common case in native code: CONTINUE PAGE/ZERO records of the
                    # current block; it stops before anything else, which is parsed below.
                    pos, normals, zeros = load_page_run(mv, pos, loaded.view, loaded.limit,
                                                        loaded.written)
                    self.normal_pages += normals
                    self.zero_pages += zeros
                if end - pos < 8:
                    r.pos = pos
                    return 8
                (word,) = unpack(buf, pos)
                flags = word & _FLAG_BITS
                addr = word - flags
                if flags & RAM_SAVE_FLAG_COMPRESS_PAGE:
                    raise UnsupportedFeatureError("Received an unexpected compressed page")
                kind = flags & ~RAM_SAVE_FLAG_CONTINUE
                if flags & (RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_XBZRLE):
                    if flags & RAM_SAVE_FLAG_CONTINUE:
                        header = 8
                    elif end - pos < 9:
                        r.pos = pos
                        return 9
                    else:
                        header = 9 + buf[pos + 8]
                    payload = 1 if kind == RAM_SAVE_FLAG_ZERO else page if kind == RAM_SAVE_FLAG_PAGE else 0
                    if kind == RAM_SAVE_FLAG_XBZRLE:
                        # u8 ENCODING_FLAG_XBZRLE, be16 length, the encoding (ram.c load_xbzrle)
                        if end - pos < header + 3:
                            r.pos = pos
                            return header + 3
                        length = int.from_bytes(buf[pos + header + 1:pos + header + 3], "big")
                        payload = 3 + (length if length <= page else 0)
                    if end - pos < header + payload:
                        r.pos = pos
                        return header + payload
                    if header == 8:
                        loaded = self._last
                        if loaded is None:
                            raise StreamFormatError("Ack, bad migration stream!",
                                                    f"Illegal RAM offset {addr:x}")
                    else:
                        loaded = self._block_named(bytes(buf[pos + 9:pos + header]), addr)
                        self._last = loaded
                    view = loaded.view
                    if view is None or addr >= loaded.limit:
                        raise StreamFormatError(f"Illegal RAM offset {addr:x}")
                    data = pos + header
                    written = loaded.written
                    if self.placer is not None and kind in (RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_ZERO):
                        if kind == RAM_SAVE_FLAG_PAGE:
                            self.placer(loaded.block.name, addr, mv[data:data + page])
                            self.normal_pages += 1
                        else:
                            self.placer(loaded.block.name, addr, None if buf[data] == 0 else
                                        memoryview(bytes((buf[data],)) * page))
                            self.zero_pages += 1
                    elif kind == RAM_SAVE_FLAG_PAGE:
                        view[addr:addr + page] = mv[data:data + page]
                        if written is not None:
                            written[addr >> TARGET_PAGE_BITS] = 1
                        self.normal_pages += 1
                    elif kind == RAM_SAVE_FLAG_ZERO:
                        fill = buf[data]
                        if fill:
                            view[addr:addr + page] = bytes((fill,)) * page
                            if written is not None:
                                written[addr >> TARGET_PAGE_BITS] = 1
                        elif written is None or written[addr >> TARGET_PAGE_BITS]:
                            # only write when needed, so untouched RAM stays unallocated
                            # (ram.c ram_handle_zero)
                            if view[addr:addr + page].tobytes() != _ZERO_PAGE:
                                view[addr:addr + page] = _ZERO_PAGE
                            if written is not None:
                                written[addr >> TARGET_PAGE_BITS] = 0
                        self.zero_pages += 1
                    elif kind == RAM_SAVE_FLAG_XBZRLE:
                        load_xbzrle_page(buf[data], int.from_bytes(buf[data + 1:data + 3], "big"),
                                         mv[data + 3:data + payload], view[addr:addr + page], addr)
                        if written is not None:
                            written[addr >> TARGET_PAGE_BITS] = 1
                        self.xbzrle_pages += 1
                    else:
                        raise StreamFormatError(f"Unknown combination of migration flags: 0x{flags:x}")
                    pos = data + payload
                    observer = loaded.block.on_page
                    if observer is not None:
                        observer(addr, kind == RAM_SAVE_FLAG_ZERO)
                elif kind == RAM_SAVE_FLAG_EOS:
                    r.pos = pos + 8
                    return _EOS
                elif kind == RAM_SAVE_FLAG_MEM_SIZE:
                    r.pos = pos + 8
                    self._pending_total = addr
                    return _MEM_SIZE
                elif kind == RAM_SAVE_FLAG_MULTIFD_FLUSH and self.on_multifd_flush is not None:
                    r.pos = pos + 8
                    self.on_multifd_flush()
                    pos = r.pos
                elif kind in (RAM_SAVE_FLAG_MULTIFD_FLUSH, RAM_SAVE_FLAG_HOOK):
                    # multifd sync marker without multifd, RDMA hook without RDMA: no-ops
                    pos += 8
                else:
                    raise StreamFormatError(f"Unknown combination of migration flags: 0x{flags:x}")
        finally:
            mv.release()
            whole.release()


#: bytes of a mapped-ram pages region taken from the stream at a time
MAPPED_RAM_LOAD_BUF_SIZE = 1 << 20


def load_mapped_block(loader: RamLoader, r: StreamReader, loaded: _LoadedBlock,
                      length: int) -> Generator[None, None, None]:
    """One block of a mapped-ram file (ram.c ``parse_ramblock_mapped_ram``): its header,
    then its bitmap and the pages whose bit is set, read in file order; the stream goes
    on after the pages region.  Absent pages are left as they are (zero in a fresh VM)."""
    name = loaded.block.name
    raw = yield from r.read_bytes(HEADER_SIZE, f"the mapped-ram header of RAM block {name}")
    header = MappedRamHeader.unpack(raw)
    if header.version > MAPPED_RAM_HDR_VERSION:
        raise StreamFormatError("Migration mapped-ram capability version not supported "
                                f"(expected <= {MAPPED_RAM_HDR_VERSION}, got {header.version})")
    if loaded.block.ignored and header.bitmap_offset == 0 and header.pages_offset == 0:
        return
    if header.pages_offset % TARGET_PAGE_SIZE:
        raise StreamFormatError(f"Error reading ramblock {name} pages, region has bad alignment")
    if header.page_size != TARGET_PAGE_SIZE:
        raise StreamMismatchError(f"Mapped-ram page size {header.page_size} of RAM block {name} "
                                  f"is not {TARGET_PAGE_SIZE}")
    # The bitmap follows the header in every file QEMU and pyvm write: that fixes where the
    # stream starts in the file (file: URIs may carry an offset).
    here = r.offset
    if loader._origin is None:
        loader._origin = header.bitmap_offset - here
    position = loader._origin + here
    size = bitmap_size(length)
    if header.bitmap_offset != position or header.pages_offset < position + size:
        raise StreamFormatError("Error reading dirty bitmap",
                                detail=f"RAM block {name}: bitmap at {header.bitmap_offset:#x}, "
                                       f"pages at {header.pages_offset:#x}, stream at {position:#x}")
    bitmap = yield from r.read_bytes(size, f"the mapped-ram bitmap of RAM block {name}")
    npages = length >> TARGET_PAGE_BITS
    present = unpack_bitmap(bitmap, npages)
    loader.mapped_blocks[name] = {"version": header.version, "page_size": header.page_size,
                                  "bitmap_offset": header.bitmap_offset,
                                  "pages_offset": header.pages_offset,
                                  "pages": int(np.count_nonzero(present))}
    gap = header.pages_offset - (position + size)
    if not (yield from r.skip_or_end(gap)):
        raise StreamFormatError("Error reading dirty bitmap")
    view = loaded.view
    if view is None:
        raise StreamFormatError(f"page outside of ramblock {name} range")
    written = loaded.written
    reader = loader.page_reader
    if reader is not None and loaded.block.on_page is None and loader.placer is None:
        loader.normal_pages += reader.read_block(name, view, header.pages_offset, present)
        if written is not None:
            written[present] = 1
        rest = r.skip_unread(length)
        if rest:
            reader.skip_input(rest)
        return
    page = 0
    chunk_pages = MAPPED_RAM_LOAD_BUF_SIZE >> TARGET_PAGE_BITS
    while page < npages:
        n = min(chunk_pages, npages - page)
        want = present[page:page + n]
        if want.any():
            yield from r.wait(n * TARGET_PAGE_SIZE, f"the mapped-ram pages of RAM block {name}")
            src = np.frombuffer(r.buffer, dtype=np.uint8, count=n * TARGET_PAGE_SIZE,
                                offset=r.pos).reshape(n, TARGET_PAGE_SIZE)
            idx = np.flatnonzero(want)
            ram = np.frombuffer(view, dtype=np.uint8)
            dst = ram[page * TARGET_PAGE_SIZE:(page + n) * TARGET_PAGE_SIZE].reshape(
                n, TARGET_PAGE_SIZE)
            if idx.size == n:
                np.copyto(dst, src)                 # the whole stretch: one copy
            else:
                dst[idx] = src[idx]
            del src, dst, ram       # no export of a buffer may outlive a wait
            if written is not None:
                written[page + idx] = 1
            loader.normal_pages += int(idx.size)
            r.skip(n * TARGET_PAGE_SIZE)
            observer = loaded.block.on_page
            if observer is not None:
                for i in idx.tolist():
                    observer((page + i) << TARGET_PAGE_BITS, False)
        elif not (yield from r.skip_or_end(n * TARGET_PAGE_SIZE)):
            raise TruncatedStreamError(what=f"the mapped-ram pages of RAM block {name}",
                                       offset=r.offset)
        page += n
