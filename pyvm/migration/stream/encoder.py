"""The source side: the calls precopy orchestration makes to produce a stream (sans-IO).

Each method returns the bytes to send as a list of chunks, except
:meth:`StreamEncoder.ram_batch`, which packs page records into a record batch whose page
bytes stay in guest RAM (never copied) until the channel writes it.  A complete precopy stream is::

    enc = StreamEncoder()
    send(enc.header())
    send(enc.configuration("pc-i440fx-8.2", enabled_caps))
    send(enc.ram_setup(blocks, ignore_shared))                 # START section of "ram"
    for each round (the last one with final=True, vCPUs stopped):
        send(enc.ram_section_begin(final=...))                # PART (END for the last)
        while start < len(indices):                           # any number of blocks
            start, _, _ = enc.ram_batch(batch, block, indices, start)
            channel.write_records(batch)                      # headers + pages, writev
        send(enc.ram_eos())                                   # EOS + footer
    send(enc.device_sections([(idstr, instance_id, device), ...]))   # FULL each
    send(enc.globalstate("running"))                          # FULL "globalstate"
    send(enc.eof_and_vmdesc())                                # 0x00, 0x06 + JSON

Section ids: ``ram`` is registered first and gets id 2 (QEMU 8.2 gives ``ram`` id 2 on
a pc machine); every other (idstr, instance_id) gets the next id when it is first
registered or written, so devices are numbered 3, 4, ... in the order the orchestration
lists them and ``globalstate`` follows them.  :meth:`StreamEncoder.register` lets the
caller fix the numbering up front (QEMU numbers by registration, not by stream order).

The vmdesc trailer describes every FULL section written, as QEMU does; by default it also
carries the ``configuration`` object that QEMU 9.0+ writes first, so that
analyze-migration.py can learn x-ignore-shared from it (QEMU 8.2 omits that key and a
destination never reads the JSON; pass ``describe_configuration=False`` for 8.2's exact
shape).
"""

from __future__ import annotations

from typing import Any, Collection, Iterable, Sequence

import numpy as np

from pyvm.migration.stream import vmdesc_json
from pyvm.migration.errors import EncodeError
from pyvm.migration.stream.integrity import checksum_bytes, crc32c_extend
from pyvm.migration.stream.ram_format import (BlockTrailer, StreamBlock, RamPageWriter,
                                             write_ram_eos, write_ram_setup)
from pyvm.migration.stream.sections import (GLOBALSTATE_IDSTR, GlobalState, write_configuration,
                                     write_section_footer, write_section_header)
from pyvm.migration.stream.constants import (QEMU_VM_EOF, QEMU_VM_FILE_MAGIC,
                                             QEMU_VM_FILE_VERSION, QEMU_VM_SECTION_END,
                                             QEMU_VM_SECTION_FULL, QEMU_VM_SECTION_PART,
                                             QEMU_VM_SECTION_START, QEMU_VM_VMDESCRIPTION,
                                             RAM_SECTION_IDSTR, RAM_SECTION_VERSION,
                                             TARGET_PAGE_SIZE)
from pyvm.migration.stream.writer import Chunk, StreamWriter
from pyvm.migration.stream.vmstate_codec import save_vmstate

RAM_SECTION_ID = 2


class StreamEncoder:
    """Builds one outgoing migration stream, piece by piece."""

    def __init__(self, *, describe_configuration: bool = True, checksum: bool = False) -> None:
        self.describe_configuration = describe_configuration
        #: x-checksum: a CRC-32C after every section footer (pyvm.migration.stream.integrity); page
        #: payloads are then copied when written, so the checksum matches what is sent
        self.checksum = checksum
        self._crc = 0
        self._w = StreamWriter()
        self._ids: dict[tuple[str, int], int] = {(RAM_SECTION_IDSTR, 0): RAM_SECTION_ID}
        self._next_id = RAM_SECTION_ID + 1
        self._pages = RamPageWriter()
        self._ram_open = False
        self._configuration_desc: dict[str, Any] | None = None
        self._devices_desc: list[dict[str, Any]] = []
        #: pages packed by :meth:`ram_batch` so far (query-migrate duplicate / normal)
        self.zero_pages = 0
        self.normal_pages = 0

    # -- section ids ---------------------------------------------------------------------------
    def register(self, idstr: str, instance_id: int = 0, section_id: int | None = None) -> int:
        """The section id of (idstr, instance_id), assigning the next free one if new.

        ``section_id`` pins an id for a new section instead (ids must stay unique).
        """
        key = (idstr, instance_id)
        known = self._ids.get(key)
        if known is not None:
            if section_id is not None and section_id != known:
                raise EncodeError(f"section {idstr!r} {instance_id} already has id {known}")
            return known
        if section_id is None:
            while self._next_id in self._ids.values():
                self._next_id += 1
            section_id = self._next_id
        elif section_id in self._ids.values():
            raise EncodeError(f"section id {section_id} is already used")
        self._ids[key] = section_id
        return section_id

    # -- header --------------------------------------------------------------------------------
    def header(self) -> list[Chunk]:
        """Magic and stream version."""
        self._w.be32(QEMU_VM_FILE_MAGIC)
        self._w.be32(QEMU_VM_FILE_VERSION)
        return self._w.take_chunks()

    def configuration(self, machine_type: str, capabilities: Collection[str] = ()) -> list[Chunk]:
        """The configuration section; ``capabilities`` are the enabled ones (only validated
        capabilities such as x-ignore-shared are listed in the stream)."""
        self._configuration_desc = write_configuration(self._w, machine_type, capabilities)
        return self._w.take_chunks()

    # -- RAM -----------------------------------------------------------------------------------
    def ram_setup(self, blocks: Sequence[StreamBlock], ignore_shared: bool,
                  block_trailer: BlockTrailer | None = None) -> list[Chunk]:
        """The START section of ``ram``: the block list (with GPAs if ``ignore_shared``;
        ``block_trailer`` writes what follows each entry, mapped-ram's header)."""
        write_section_header(self._w, QEMU_VM_SECTION_START, RAM_SECTION_ID,
                             RAM_SECTION_IDSTR, 0, RAM_SECTION_VERSION)
        write_ram_setup(self._w, blocks, ignore_shared, block_trailer)
        write_section_footer(self._w, RAM_SECTION_ID)
        return self._take(end_section=True)

    def ram_section_begin(self, final: bool = False) -> list[Chunk]:
        """Open a PART section of ``ram`` (END when ``final``) for one round of pages."""
        if self._ram_open:
            raise EncodeError("a RAM section is already open; close it with ram_eos()")
        write_section_header(self._w, QEMU_VM_SECTION_END if final else QEMU_VM_SECTION_PART,
                             RAM_SECTION_ID)
        self._pages.reset()
        self._ram_open = True
        return self._take()

    def ram_pages(self, block: StreamBlock, page_indices: Iterable[int],
                  zero_mask: Iterable[bool]) -> list[Chunk]:
        """Page records for ``page_indices`` of ``block`` as chunks; ``zero_mask[i]`` marks
        zero pages.  The x-checksum path sends pages this way (each batch a section of its
        own, summed as it is written); every other path packs with :meth:`ram_batch`.
        """
        if not self._ram_open:
            raise EncodeError("ram_pages() outside a RAM section; call ram_section_begin()")
        zeros, normals = self._pages.encode_pages(self._w, block, page_indices, zero_mask)
        self.zero_pages += zeros
        self.normal_pages += normals
        return self._take()

    def abandon_ram_section(self) -> None:
        """The channel broke inside a RAM section (postcopy recovery goes on over a new
        one, which starts at a section boundary): forget it was open."""
        self._w.take_chunks()
        self._ram_open = False

    def ram_eos(self) -> list[Chunk]:
        """EOS and the footer: closes the RAM section opened by :meth:`ram_section_begin`."""
        if not self._ram_open:
            raise EncodeError("ram_eos() without an open RAM section")
        write_ram_eos(self._w)
        write_section_footer(self._w, RAM_SECTION_ID)
        self._ram_open = False
        return self._take(end_section=True)

    # -- devices -------------------------------------------------------------------------------
    def device_section(self, idstr: str, instance_id: int, obj: Any) -> list[Chunk]:
        """One FULL section from ``obj.vmsd`` (``obj.pre_save()`` is called first)."""
        vmsd = getattr(obj, "vmsd", None)
        if vmsd is None:
            raise EncodeError(f"State blocked by non-migratable device '{idstr}'")
        pre_save = getattr(obj, "pre_save", None)
        if callable(pre_save):
            pre_save()
        section_id = self.register(idstr, instance_id)
        write_section_header(self._w, QEMU_VM_SECTION_FULL, section_id, idstr, instance_id,
                             vmsd.version_id)
        desc: dict[str, Any] = {"name": idstr, "instance_id": instance_id}
        save_vmstate(self._w, vmsd, obj, desc)
        write_section_footer(self._w, section_id)
        self._devices_desc.append(desc)
        return self._take(end_section=True)

    def device_sections(self, devices: Iterable[tuple[str, int, Any]]) -> list[Chunk]:
        """FULL sections for (idstr, instance_id, obj) in the given order."""
        chunks: list[Chunk] = []
        for idstr, instance_id, obj in devices:
            chunks += self.device_section(idstr, instance_id, obj)
        return chunks

    def globalstate(self, runstate: str) -> list[Chunk]:
        """The ``globalstate`` FULL section carrying the source's run state name."""
        return self.device_section(GLOBALSTATE_IDSTR, 0, GlobalState(runstate))

    # -- checksums (x-checksum) -------------------------------------------------------------------
    def _take(self, end_section: bool = False) -> list[Chunk]:
        """The chunks written since the last call; with x-checksum they extend the open
        section's CRC, and ``end_section`` (after a footer) appends it and starts anew."""
        chunks = self._w.take_chunks()
        if not self.checksum:
            return chunks
        # A page view may change under a running guest before it is sent: copy it, so the
        # bytes sent are the bytes summed.
        chunks = [bytes(c) if isinstance(c, memoryview) else c for c in chunks]
        for chunk in chunks:
            self._crc = crc32c_extend(self._crc, chunk)
        if end_section:           # chained: the next section's CRC goes on from this one
            chunks.append(checksum_bytes(self._crc))
        return chunks

    # -- end -----------------------------------------------------------------------------------
    def vmdesc(self) -> dict[str, Any]:
        """The vmdesc object describing the FULL sections written so far."""
        desc: dict[str, Any] = {}
        if self.describe_configuration and self._configuration_desc is not None:
            desc["configuration"] = self._configuration_desc
        desc["page_size"] = TARGET_PAGE_SIZE
        desc["devices"] = self._devices_desc
        return desc

    def eof_and_vmdesc(self, send_vmdesc: bool = True) -> list[Chunk]:
        """``QEMU_VM_EOF`` and, unless suppressed, the ``0x06`` vmdesc trailer."""
        if self._ram_open:
            raise EncodeError("the RAM section is still open; close it with ram_eos()")
        self._w.u8(QEMU_VM_EOF)
        if send_vmdesc:
            text = vmdesc_json.dumps(self.vmdesc()).encode()
            self._w.u8(QEMU_VM_VMDESCRIPTION)
            self._w.be32(len(text))
            self._w.raw(text)
        return self._w.take_chunks()
