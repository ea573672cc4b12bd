"""Reading a device section by its vmdesc description, without knowing the device.

The vmdesc trailer describes every FULL section exactly as it was written (QEMU
migration/vmstate.c ``vmsd_desc_field_start``/``vmsd_desc_field_end``): each field's name, type and element size, ``array_len`` for repeated elements,
nested ``struct`` descriptions and the subsections that were sent.  That is enough to
walk any QEMU or pyvm stream and show its values, which is what the analyzer does.

Values are shown as QEMU's scripts/analyze-migration.py shows them: integers as
zero-padded hex of the field's width (negative signed values add `` (-N)``), booleans as
JSON booleans, capabilities as their names, everything else (buffers, timers, unknown
types) as space-separated hex bytes.  A field name that occurs more than once collects
its values in a list, so arrays come out as lists.
"""

from __future__ import annotations

from typing import Any, Generator

from pyvm.migration.errors import StreamFormatError
from pyvm.migration.stream.constants import QEMU_VM_SUBSECTION
from pyvm.migration.stream.reader import StreamReader
from pyvm.migration.stream.text import shown

# vmdesc type names read as integers (the analyzer's signed/unsigned tables)
SIGNED_TYPES = frozenset({"int8", "int16", "int32", "int64", "int32 equal", "int32 le",
                          "int64 equal", "uint8 equal", "uint16 equal"})
UNSIGNED_TYPES = frozenset({"uint8", "uint16", "uint32", "uint64", "uint32 equal"})
MAX_FIELD_SIZE = 1 << 24   # one described element; bounds what a corrupt vmdesc can ask for


def format_int(data: bytes, signed: bool) -> str:
    """``0x`` and two hex digits per byte; a negative signed value adds its decimal."""
    unsigned_value = int.from_bytes(data, "big")
    text = f"0x{unsigned_value:0{2 * len(data)}x}"
    if signed:
        signed_value = int.from_bytes(data, "big", signed=True)
        if signed_value < 0:
            text += f" ({signed_value})"
    return text


def hex_bytes(data: bytes) -> str:
    return " ".join(f"{b:02x}" for b in data)


def _unfolded(fields: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per element: ``array_len`` N becomes N copies of the field."""
    out = []
    for f in fields:
        out.extend([f] * int(f.get("array_len", 1)))
    return out


def read_described(r: StreamReader, desc: dict[str, Any]) -> Generator[None, None, dict[str, Any]]:
    """Read fields and subsections described by ``desc`` (a vmsd object of the vmdesc)."""
    values: dict[str, Any] = {}
    for f in _unfolded(desc.get("fields", [])):
        value = yield from _read_field(r, f)
        name = f["name"]
        if name not in values:
            values[name] = value
        elif isinstance(values[name], list):   # values are never lists themselves
            values[name].append(value)
        else:
            values[name] = [values[name], value]
    for sub in desc.get("subsections", []):
        marker = yield from r.read_u8(f"subsection {sub.get('vmsd_name')}")
        if marker != QEMU_VM_SUBSECTION:
            raise StreamFormatError(f"Subsection {sub.get('vmsd_name')} not found at offset "
                                    f"{r.offset:x}")
        name = shown((yield from r.read_counted("a subsection name")))
        yield from r.read_be32("a subsection version")
        values[name] = yield from read_described(r, sub)
    return values


def _read_field(r: StreamReader, f: dict[str, Any]) -> Generator[None, None, Any]:
    ftype = f.get("type", "unknown")
    what = f"field {f.get('name')}"
    if ftype == "struct":
        return (yield from read_described(r, f.get("struct", {})))
    if ftype == "capability":
        return shown((yield from r.read_counted(what)))
    size = int(f.get("size", 0))
    if not 0 <= size <= MAX_FIELD_SIZE:
        raise StreamFormatError(detail=f"vmdesc field {f.get('name')} has size {size}")
    data = yield from r.read_bytes(size, what)
    if ftype == "bool":
        return bool(data and data[0])
    if ftype == "nullptr":
        return "nullptr"
    if ftype in SIGNED_TYPES and size:
        return format_int(data, signed=True)
    if ftype in UNSIGNED_TYPES and size:
        return format_int(data, signed=False)
    return hex_bytes(data)


class DescribedSection:
    """A section loader driven by one ``devices`` entry of the vmdesc (any version)."""

    version_id = None

    def __init__(self, desc: dict[str, Any]) -> None:
        if "fields" not in desc:
            raise StreamFormatError(f"vmstate for device {desc.get('name')} has no fields")
        self.desc = desc
        self.values: dict[str, Any] = {}

    def load_section(self, reader: StreamReader, version_id: int) -> Generator[None, None, None]:
        self.values = yield from read_described(reader, self.desc)
