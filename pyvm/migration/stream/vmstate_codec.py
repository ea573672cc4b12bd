"""Device state in the stream: encode and decode a :class:`~pyvm.vmstate.VMStateDescription`.

This is pyvm's counterpart of QEMU's migration/vmstate.c for the field types pyvm devices
use (``vmstate_save_state_v``/``vmstate_load_state`` and migration/vmstate-types.c):

* fields go out in declaration order, each only if its ``version_id`` is not above the
  version being written; scalars big-endian, ``bool`` one byte 0/1, ``buffer`` raw bytes,
  ``count`` > 1 repeats the element;
* then every subsection whose ``needed(obj)`` is true: ``u8 0x05, counted name,
  be32 version_id``, its fields and its own subsections;
* while saving, the vmdesc description of what was written is built as an ordered dict
  (``vmsd_name``, ``version``, ``fields``[, ``subsections``]; fields ``name``[,
  ``array_len``], ``type``, ``size``), as migration/vmstate.c ``vmsd_desc_field_start``
  writes it.

Loading reads into a plain dict of field values; the caller sets the attributes and calls
``post_load()`` only when the whole section was read, so a failed load leaves the device
as it was.
"""

from __future__ import annotations

import errno
import struct
from typing import Any, Generator

from pyvm.migration.errors import EncodeError, MigrationError, StreamMismatchError
from pyvm.migration.stream.constants import QEMU_VM_SUBSECTION
from pyvm.migration.stream.reader import StreamReader
from pyvm.migration.stream.text import shown
from pyvm.migration.stream.writer import StreamWriter
from pyvm.vmstate import Field, VMStateDescription

# struct format letter of each scalar type (migration/vmstate-types.c)
_FORMATS = {"uint8": "B", "uint16": "H", "uint32": "I", "uint64": "Q",
            "int8": "b", "int16": "h", "int32": "i", "int64": "q", "bool": "B"}

_structs: dict[tuple[str, int], struct.Struct] = {}


def _packer(f: Field) -> struct.Struct:
    key = (f.type, f.count)
    packer = _structs.get(key)
    if packer is None:
        packer = _structs[key] = struct.Struct(f">{f.count}{_FORMATS[f.type]}")
    return packer


# -- saving ----------------------------------------------------------------------------------

def field_description(f: Field) -> dict[str, Any]:
    """The vmdesc object of one field (vmstate.c vmsd_desc_field_start/end)."""
    desc: dict[str, Any] = {"name": f.name}
    if f.count > 1:
        desc["array_len"] = f.count      # pyvm fields have no field_exists: always compressed
    desc["type"] = f.type
    desc["size"] = f.element_size
    return desc


def encode_field(f: Field, value: Any) -> bytes:
    """The wire bytes of one field's value; raises ValueError/TypeError when it does not fit."""
    if f.type == "buffer":
        items = [value] if f.count == 1 else list(value)
        if len(items) != f.count:
            raise ValueError(f"expected {f.count} buffers, got {len(items)}")
        out = bytearray()
        for item in items:
            data = bytes(item)
            if len(data) != f.size:
                raise ValueError(f"buffer of {len(data)} bytes, the field holds {f.size}")
            out += data
        return bytes(out)
    values = [value] if f.count == 1 else list(value)
    if len(values) != f.count:
        raise ValueError(f"expected {f.count} elements, got {len(values)}")
    if f.type == "bool":
        for v in values:
            if v not in (0, 1) or isinstance(v, float):
                raise ValueError(f"bool field holds {v!r}")
        values = [1 if v else 0 for v in values]
    else:
        for v in values:
            if isinstance(v, float) or not hasattr(v, "__index__"):
                raise TypeError(f"{f.type} field holds {v!r}")
    return _packer(f).pack(*values)


def save_vmstate(w: StreamWriter, vmsd: VMStateDescription, obj: Any,
                 desc: dict[str, Any] | None = None) -> None:
    """Write ``obj``'s state as ``vmsd`` version ``vmsd.version_id``; describe it into ``desc``.

    Raises :class:`EncodeError` (``Save of field %s/%s failed``) for a value that does
    not fit its field.
    """
    version = vmsd.version_id
    fields_desc: list[dict[str, Any]] = []
    if desc is not None:
        desc["vmsd_name"] = vmsd.name
        desc["version"] = version
        desc["fields"] = fields_desc
    for f in vmsd.fields:
        if f.version_id > version:
            continue
        try:
            w.raw(encode_field(f, getattr(obj, f.name)))
        except (AttributeError, TypeError, ValueError, struct.error) as err:
            raise EncodeError(f"Save of field {vmsd.name}/{f.name} failed",
                              detail=f"{vmsd.name}/{f.name}: {err}") from err
        fields_desc.append(field_description(f))
    subs_desc: list[dict[str, Any]] = []
    for sub in vmsd.subsections:
        if not sub.needed(obj):
            continue
        w.u8(QEMU_VM_SUBSECTION)
        w.counted_string(sub.vmsd.name)
        w.be32(sub.vmsd.version_id)
        sub_desc: dict[str, Any] = {}
        save_vmstate(w, sub.vmsd, obj, sub_desc)
        subs_desc.append(sub_desc)
    if desc is not None and subs_desc:
        desc["subsections"] = subs_desc


# -- loading ---------------------------------------------------------------------------------

def decode_field(f: Field, data: bytes) -> Any:
    """The attribute value of one field from its wire bytes (any non-zero bool is True)."""
    if f.type == "buffer":
        if f.count == 1:
            return data
        return [data[i * f.size:(i + 1) * f.size] for i in range(f.count)]
    values = _packer(f).unpack(data)
    if f.type == "bool":
        values = tuple(v != 0 for v in values)
    return values[0] if f.count == 1 else list(values)


def check_version(vmsd: VMStateDescription, version_id: int) -> None:
    """QEMU's vmstate_load_state version checks, with its texts."""
    if version_id > vmsd.version_id:
        raise StreamMismatchError(
            f"{vmsd.name}: incoming version_id {version_id} is too new "
            f"for local version_id {vmsd.version_id}")
    if version_id < vmsd.minimum_version_id:
        raise StreamMismatchError(
            f"{vmsd.name}: incoming version_id {version_id} is too old "
            f"for local minimum version_id  {vmsd.minimum_version_id}")


def load_vmstate(r: StreamReader, vmsd: VMStateDescription, version_id: int,
                 values: dict[str, Any]) -> Generator[None, None, None]:
    """Read the fields and subsections of ``vmsd`` at ``version_id`` into ``values``."""
    check_version(vmsd, version_id)
    for f in vmsd.fields:
        if f.version_id > version_id:
            continue
        n = f.wire_size
        try:
            if r.available < n:
                yield from r.wait(n, f"field {vmsd.name}:{f.name}")
        except MigrationError as err:
            err.add_context(f"Failed to load {vmsd.name}:{f.name}")
            raise
        values[f.name] = decode_field(f, r.take(n))
    yield from load_subsections(r, vmsd, values)


def load_subsections(r: StreamReader, vmsd: VMStateDescription,
                     values: dict[str, Any]) -> Generator[None, None, None]:
    """QEMU's vmstate_subsection_load: peek for 0x05 and a name under ``vmsd.name``.

    Anything else ends the subsections without consuming it (the section footer check
    then reports it); a name with the right prefix that this vmsd does not declare is an
    error.
    """
    prefix = vmsd.name.encode()
    by_name = {sub.vmsd.name.encode(): sub for sub in vmsd.subsections}
    while True:
        if not (yield from r.wait_or_end(2)) or r.buffer[r.pos] != QEMU_VM_SUBSECTION:
            return
        n = r.buffer[r.pos + 1]
        if n < len(prefix) + 1:
            return
        if not (yield from r.wait_or_end(2 + n)):
            return
        name = r.peek(n, 2)
        if not name.startswith(prefix):
            return
        sub = by_name.get(name)
        if sub is None:
            raise StreamMismatchError(errno=errno.ENOENT,
                                      detail=f"unknown subsection '{shown(name)}'"
                                             f" in '{vmsd.name}'")
        r.skip(2 + n)
        # QEMU stores the be32 version in a uint8_t (vmstate.c), so only its low byte counts.
        version_id = (yield from r.read_be32(f"subsection {sub.vmsd.name} version")) & 0xFF
        yield from load_vmstate(r, sub.vmsd, version_id, values)


def apply_loaded(obj: Any, values: dict[str, Any]) -> None:
    """Set the loaded attributes on ``obj`` and call its ``post_load()`` if it has one."""
    for name, value in values.items():
        setattr(obj, name, value)
    post_load = getattr(obj, "post_load", None)
    if callable(post_load):
        post_load()
