"""Declarative device state, in the shape of QEMU's VMStateDescription.

A device declares *what* it saves as data; ``pyvm.migration`` encodes and decodes it
(QEMU stream format, migration/vmstate.c) without knowing the device.  The device only
keeps its state in attributes named after the fields, and may define ``pre_save()`` and
``post_load()`` to translate between those attributes and its live representation.

Field types are QEMU's VMStateInfo names as they appear in the vmdesc JSON trailer:
``uint8 uint16 uint32 uint64 int8 int16 int32 int64 bool buffer``.  ``count`` > 1 makes a
fixed-length array (the attribute is a list); ``buffer`` fields hold ``bytes`` of
``size`` bytes.  A field with ``version_id`` N is sent only when the section version is
at least N (VMSTATE_*_V).

Dropping or reordering a field breaks compatibility with saved streams: add new state in
a new field with a higher ``version_id`` or in a subsection instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

# Byte size of each scalar type (migration/vmstate-types.c); all big-endian on the wire.
SCALAR_SIZES: dict[str, int] = {
    "uint8": 1, "uint16": 2, "uint32": 4, "uint64": 8,
    "int8": 1, "int16": 2, "int32": 4, "int64": 8,
    "bool": 1,
}
FIELD_TYPES = frozenset(SCALAR_SIZES) | {"buffer"}


@dataclass(frozen=True)
class Field:
    """One saved field: attribute ``name`` of the device, of QEMU type ``type``."""

    name: str
    type: str
    count: int = 1          # > 1: a fixed array of ``count`` elements
    size: int = 0           # buffer fields: bytes in the buffer
    version_id: int = 0     # sent only when the section version >= version_id

    def __post_init__(self) -> None:
        if self.type not in FIELD_TYPES:
            raise ValueError(f"unknown vmstate field type {self.type!r}")
        if self.type == "buffer" and self.size <= 0:
            raise ValueError(f"buffer field {self.name!r} needs a size")
        if self.count < 1:
            raise ValueError(f"field {self.name!r}: count must be >= 1")

    @property
    def element_size(self) -> int:
        return self.size if self.type == "buffer" else SCALAR_SIZES[self.type]

    @property
    def wire_size(self) -> int:
        return self.element_size * self.count


@dataclass(frozen=True)
class Subsection:
    """An optional part of a state, sent only when ``needed(obj)`` is true."""

    vmsd: "VMStateDescription"
    needed: Callable[[Any], bool]


@dataclass(frozen=True)
class VMStateDescription:
    """What one device (or one part of it) saves; ``name`` is QEMU's vmsd name."""

    name: str
    version_id: int
    fields: tuple[Field, ...]
    minimum_version_id: int = 0
    subsections: tuple[Subsection, ...] = field(default=())

    def __post_init__(self) -> None:
        for sub in self.subsections:
            if not sub.vmsd.name.startswith(self.name + "/"):
                raise ValueError(f"subsection {sub.vmsd.name!r} must start with {self.name + '/'!r}")
        names = [f.name for f in self.fields]
        if len(set(names)) != len(names):
            raise ValueError(f"vmsd {self.name!r} repeats a field name")


def default_value(f: Field) -> Any:
    """The reset value of a field's attribute (0, False, zero bytes, or a list of them)."""
    if f.type == "buffer":
        one: Any = bytes(f.size)
    elif f.type == "bool":
        one = False
    else:
        one = 0
    return [one] * f.count if f.count > 1 else one
