"""pyvm-analyze: show what a migration stream contains, as JSON.

Works on any stream pyvm or QEMU wrote to a file (``migrate file:...`` or
``exec:cat > FILE``), mapped-ram files included (their RAM section then lists each block's
header and the number of pages its bitmap holds under ``"mapped-ram"``), with the options
of QEMU's scripts/analyze-migration.py::

    pyvm-analyze -f FILE              device state, one JSON object per section
    pyvm-analyze -f FILE -m           ... plus the contents of every RAM page sent
    pyvm-analyze -f FILE -d desc      the stream's own description (the vmdesc trailer)
    pyvm-analyze -f FILE -x           write desc.json, state.json and one file per RAM
                                      block (named after the block) in the current directory

Postcopy streams (which end without a vmdesc) are read to their end too: the
``QEMU_VM_COMMAND`` records are listed under ``"commands"`` (``PACKAGED``'s nested stream
is read inline), and device sections are shown by their size (pyvm.analyze_postcopy).

How it works, for the curious: a stream ends with a JSON "vmdesc" that describes every
device section (field names, types, sizes).  The analyzer finds it first, then runs pyvm's
own stream decoder (:mod:`pyvm.migration.stream.decoder`) over the file with a target that
accepts whatever the stream holds: RAM blocks are created as they are announced, and
device sections are read by their description (:mod:`pyvm.migration.stream.vmdesc_loader`).
The output has the same shape as QEMU's tool, so the two can be compared.
"""

from __future__ import annotations

import argparse
import functools
import json
import mmap
import os
import struct
import sys
from typing import Any, Sequence

from pyvm.analyze_postcopy import CommandLog, OpaqueSection
from pyvm.migration.stream.decoder import SectionLoaded, StreamDecoder
from pyvm.migration.errors import MigrationError, StreamFormatError
from pyvm.migration.stream.ram_format import StreamBlock
from pyvm.migration.stream.constants import (QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION,
                                             QEMU_VM_SECTION_FULL, QEMU_VM_SECTION_START,
                                             QEMU_VM_VMDESCRIPTION, RAM_SECTION_IDSTR)
from pyvm.migration.stream.sections import GLOBALSTATE_IDSTR
from pyvm.migration.stream.vmdesc_loader import DescribedSection, hex_bytes
from pyvm.private_files import PRIVATE_MODE

FEED_SIZE = 1 << 20            # bytes handed to the decoder at a time
MAX_VMDESC_SEARCH = 64 << 20   # how far from the end of the file the trailer may start
MAX_BLOCK_LENGTH = 1 << 48     # a RAM block larger than x86-64's physical address space is damage


NO_VMDESC = ("No Debug Migration device found: the stream has no vmdesc trailer "
             "(was it written with suppress-vmdesc=on?)")


class AnalyzeError(Exception):
    """A file the analyzer cannot read (not a stream, no vmdesc, unsafe block name)."""


# -- finding the vmdesc trailer ----------------------------------------------------------------

def find_vmdesc(data: Any) -> dict[str, Any]:
    """The vmdesc JSON at the end of the stream: ``0x06, be32 length, JSON`` ends the file.

    JSON text never contains the byte 0x06, so the marker is the last 0x06 whose length
    word reaches exactly to the end of the file.
    """
    size = len(data)
    floor = max(0, size - MAX_VMDESC_SEARCH)
    pos = data.rfind(bytes((QEMU_VM_VMDESCRIPTION,)), floor)
    while pos >= 0:
        if pos + 5 <= size:
            (length,) = struct.unpack(">I", data[pos + 1:pos + 5])
            if pos + 5 + length == size:
                text = bytes(data[pos + 5:size])
                try:
                    desc = json.loads(text)
                except ValueError as err:
                    raise AnalyzeError(f"the vmdesc trailer is not valid JSON: {err}") from err
                if not isinstance(desc, dict) or not isinstance(desc.get("devices"), list):
                    raise AnalyzeError("the vmdesc trailer has no device list")
                return desc
        pos = data.rfind(bytes((QEMU_VM_VMDESCRIPTION,)), floor, pos)
    raise AnalyzeError(NO_VMDESC)


def check_header(data: Any) -> None:
    """Magic "QEVM" and version 3, as the analyzer and QEMU expect."""
    if len(data) < 8:
        raise AnalyzeError("file too short for a migration stream")
    magic, version = struct.unpack(">II", data[:8])
    if magic != QEMU_VM_FILE_MAGIC:
        raise AnalyzeError(f"Invalid file magic {magic:x}")
    if version != QEMU_VM_FILE_VERSION:
        raise AnalyzeError(f"Invalid version number {version}")


# -- a target that accepts any stream --------------------------------------------------------

def safe_block_path(name: str) -> str:
    """Where ``-x`` writes a RAM block: its name below the current directory, no escapes."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise AnalyzeError(f"refusing to write RAM block with unsafe name {name!r}")
    return os.path.join(*parts)


class AnalyzerTarget:
    """A :class:`~pyvm.migration.stream.decoder.LoadTarget` that records instead of checking."""

    def __init__(self, vmdesc: dict[str, Any] | None, dump_memory: bool, extract: bool) -> None:
        #: no vmdesc (a postcopy stream): device sections are shown by their size
        self.opaque = vmdesc is None
        devices = [] if vmdesc is None else vmdesc["devices"]
        self.descriptions = {(d.get("name"), d.get("instance_id")): d for d in devices}
        self.dump_memory = dump_memory
        self.extract = extract
        self.blocks: dict[str, StreamBlock] = {}
        self.section_sizes: dict[str, str] = {}
        self.pages: dict[str, tuple[str, int, bool]] = {}    # key -> (block, offset, zero)
        self.loaders: dict[tuple[str, int], DescribedSection | OpaqueSection] = {}
        self._files: list[Any] = []

    def machine_type(self) -> None:
        return None            # accept any machine

    def capabilities(self) -> None:
        return None            # adopt the stream's capabilities

    def ram_block(self, name: str, length: int) -> StreamBlock | None:
        if name in self.blocks:
            return self.blocks[name]
        if length == 0:
            return None
        if not 0 < length <= MAX_BLOCK_LENGTH:
            # a damaged stream must not make the analyzer map (or create) any size it names
            raise StreamFormatError(detail=f"RAM block {name}: length 0x{length:x} is out of range")
        try:
            return self._map_block(name, length)
        except (OSError, OverflowError, ValueError) as err:
            raise StreamFormatError(
                detail=f"RAM block {name}: cannot map 0x{length:x} bytes: {err}") from err

    def _map_block(self, name: str, length: int) -> StreamBlock:
        if self.extract:
            path = safe_block_path(name)
            print(name)
            if os.path.dirname(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
            f = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                                  PRIVATE_MODE), "w+b")      # guest RAM: mode 0600
            f.truncate(length)
            self._files.append(f)
            buffer: Any = mmap.mmap(f.fileno(), length)
        else:
            buffer = mmap.mmap(-1, length)   # pages are only allocated when written
        observer = functools.partial(self._page_seen, name) if self.dump_memory else None
        block = StreamBlock(name, length, 0, buffer, on_page=observer)
        self.blocks[name] = block
        self.section_sizes[name] = f"0x{length:016x}"
        return block

    def _page_seen(self, name: str, offset: int, zero: bool) -> None:
        self.pages[f"{name} (0x{offset:016x})"] = (name, offset, zero)

    def device(self, idstr: str, instance_id: int) -> DescribedSection | OpaqueSection | None:
        desc = self.descriptions.get((idstr, instance_id))
        if desc is None:
            if self.opaque and idstr != GLOBALSTATE_IDSTR:
                opaque = self.loaders[(idstr, instance_id)] = OpaqueSection(idstr)
                return opaque
            return None
        loader = self.loaders[(idstr, instance_id)] = DescribedSection(desc)
        return loader

    def set_runstate(self, runstate: str) -> None:
        pass

    def memory_dump(self) -> dict[str, str]:
        """Each page record's final contents, keyed as QEMU's analyzer keys them."""
        out = {}
        for key, (name, offset, zero) in self.pages.items():
            if zero:
                out[key] = "Filled with 0x00"
            else:
                buffer = self.blocks[name].buffer
                out[key] = hex_bytes(bytes(buffer[offset:offset + 4096]))
        return out

    def close(self) -> None:
        for block in self.blocks.values():
            try:
                block.buffer.close()
            except BufferError:
                # A view of the block is still alive: the traceback of the stream error
                # being reported holds the decoder's frames, and so the page views they
                # had (a damaged XBZRLE page does this).  The mapping goes with the last
                # view; closing must not replace that error with this one.
                pass
        for f in self._files:
            f.close()


def read_state(data: Any, vmdesc: dict[str, Any] | None, dump_memory: bool = False,
               extract: bool = False) -> dict[str, Any]:
    """Decode the whole stream; returns the state as QEMU's analyzer shows it.

    ``vmdesc`` None: the stream has none, which only a postcopy stream may lack
    (:mod:`pyvm.analyze_postcopy`); AnalyzeError if it is not one.
    """
    target = AnalyzerTarget(vmdesc, dump_memory, extract)
    decoder = StreamDecoder(target)
    commands = CommandLog(on_listen=lambda: setattr(decoder, "stop_at_eof", True))
    decoder.on_command = commands.handle
    state: dict[str, Any] = {}
    ram: dict[str, Any] = {"section sizes": target.section_sizes}
    try:
        events = []
        try:
            for start in range(0, len(data), FEED_SIZE):
                events += decoder.feed(data[start:start + FEED_SIZE])   # a copy: the mmap stays closable
            events += decoder.close()
        except MigrationError:
            if vmdesc is None and not commands.postcopy:
                raise AnalyzeError(NO_VMDESC) from None
            raise
        if vmdesc is None and not commands.postcopy:
            raise AnalyzeError(NO_VMDESC)
        if commands.commands:
            state["commands"] = commands.commands
        for event in events:
            if isinstance(event, SectionLoaded) and event.section_type in (QEMU_VM_SECTION_START,
                                                                          QEMU_VM_SECTION_FULL):
                key = f"{event.idstr} ({event.section_id})"
                if event.idstr == RAM_SECTION_IDSTR:
                    state[key] = ram
                else:
                    loader = target.loaders.get((event.idstr, event.instance_id))
                    state[key] = loader.values if loader else {}
                    if loader is None and event.idstr == GLOBALSTATE_IDSTR and decoder.runstate:
                        state[key] = {"runstate": decoder.runstate}
        if decoder.ram is not None and decoder.ram.mapped_blocks:
            # mapped-ram files: each block's header and how many pages its bitmap holds
            ram["mapped-ram"] = {name: dict(info)
                                 for name, info in decoder.ram.mapped_blocks.items()}
        if dump_memory:
            ram["memory"] = target.memory_dump()
    finally:
        target.close()
    return state


# -- the command ---------------------------------------------------------------------------------

def _dumps(value: Any) -> str:
    return json.dumps(value, indent=4, separators=(",", ": "))


def _write_json(name: str, value: Any) -> None:
    print(name)
    with open(name, "w") as f:
        f.write(_dumps(value))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pyvm-analyze", description="Show the contents of a QEMU/pyvm migration stream.")
    parser.add_argument("-f", "--file", required=True, help="migration stream to read")
    parser.add_argument("-m", "--memory", action="store_true", help="dump RAM contents as well")
    parser.add_argument("-d", "--dump", default="state", help='what to dump ("state" or "desc")')
    parser.add_argument("-x", "--extract", action="store_true",
                        help="extract contents into individual files")
    args = parser.parse_args(argv)
    if not args.extract and args.dump not in ("state", "desc"):
        parser.error("Please specify either -x, -d state or -d desc")
    try:
        with open(args.file, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise AnalyzeError("empty file")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                check_header(data)
                try:
                    vmdesc: dict[str, Any] | None = find_vmdesc(data)
                except AnalyzeError:
                    if args.dump == "desc" and not args.extract:
                        raise
                    vmdesc = None          # a postcopy stream has none (read_state checks)
                if args.extract:
                    if vmdesc is not None:
                        _write_json("desc.json", vmdesc)
                    state = read_state(data, vmdesc, extract=True)
                    _write_json("state.json", state)
                elif args.dump == "desc":
                    print(_dumps(vmdesc))
                else:
                    print(_dumps(read_state(data, vmdesc, dump_memory=args.memory)))
    except MigrationError as err:
        extra = f" ({err.detail})" if err.detail and err.detail != str(err) else ""
        print(f"pyvm-analyze: {args.file}: {err}{extra}", file=sys.stderr)
        for line in err.lines[1:]:
            print(f"pyvm-analyze:   {line}", file=sys.stderr)
        return 1
    except (AnalyzeError, OSError, ValueError) as err:
        print(f"pyvm-analyze: {args.file}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
