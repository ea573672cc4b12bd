"""Section framing and the fixed sections of a stream (QEMU migration/savevm.c).

* section headers and footers (``save_section_header``, ``save_section_footer``): START/FULL carry ``be32 id, counted idstr,
  be32 instance_id, be32 version_id``; PART/END only the id; every section ends with
  ``u8 0x7e, be32 id``;
* the configuration section (``vmstate_configuration``): ``u8 0x07``, then the ``configuration`` vmstate
  (``be32 len``, machine type name, optional subsections), and its destination checks;
* the ``globalstate`` section (migration/global_state.c): ``be32 strlen+1`` and the run state name NUL-padded
  to 100 bytes;
* ``QEMU_VM_COMMAND`` records (``loadvm_process_command``): parsed and refused, since pyvm's precopy needs none.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Any, Collection, Generator

from pyvm.migration.errors import (EncodeError, MigrationError, StreamFormatError,
                                   StreamMismatchError, UnsupportedFeatureError)
from pyvm.migration.stream.constants import (MAX_CAPABILITIES, MAX_MACHINE_TYPE_LEN,
                                             MIG_CMD_MAX, MIG_CMD_OPEN_RETURN_PATH, MIG_CMD_PING,
                                             MIG_COMMANDS, MIGRATION_CAPABILITIES,
                                             QEMU_VM_CONFIGURATION, QEMU_VM_SECTION_FOOTER,
                                             QEMU_VM_SECTION_FULL, QEMU_VM_SECTION_START,
                                             QEMU_VM_SUBSECTION, TARGET_PAGE_BITS,
                                             VALIDATED_CAPABILITIES)
from pyvm.migration.stream.reader import StreamReader
from pyvm.migration.stream.text import shown, shown_name
from pyvm.migration.stream.writer import StreamWriter
from pyvm.runstate import RunState
from pyvm.vmstate import Field, VMStateDescription

# -- section header and footer -----------------------------------------------------------------


def write_section_header(w: StreamWriter, section_type: int, section_id: int,
                         idstr: str = "", instance_id: int = 0, version_id: int = 0) -> None:
    """``u8 type, be32 id`` and, for START/FULL, the idstr, instance and version."""
    w.u8(section_type)
    w.be32(section_id)
    if section_type in (QEMU_VM_SECTION_START, QEMU_VM_SECTION_FULL):
        w.counted_string(idstr)
        w.be32(instance_id)
        w.be32(version_id)


def write_section_footer(w: StreamWriter, section_id: int) -> None:
    w.u8(QEMU_VM_SECTION_FOOTER)
    w.be32(section_id)


def read_section_footer(r: StreamReader, idstr: str,
                        section_id: int) -> Generator[None, None, None]:
    """QEMU's check_section_footer, with its texts."""
    try:
        if r.available < 1:
            yield from r.wait(1, f"the footer of section '{idstr}'")
    except MigrationError as err:
        err.lines.insert(0, "check_section_footer: Read section footer failed: -5")
        err.errno = errno.EINVAL
        raise
    if r.u8() != QEMU_VM_SECTION_FOOTER:
        raise StreamFormatError(f"Missing section footer for {idstr}")
    read_id = yield from r.read_be32(f"the footer of section '{idstr}'")
    if read_id != section_id:
        raise StreamFormatError(
            f"Mismatched section id in footer for {idstr} - read 0x{read_id:x} expected 0x{section_id:x}")


# -- configuration section ---------------------------------------------------------------------

CONFIGURATION_VMSD_NAME = "configuration"
SUB_PAGE_BITS = b"configuration/target-page-bits"
SUB_CAPABILITIES = b"configuration/capabilities"
SUB_UUID = b"configuration/uuid"


@dataclass
class Configuration:
    """What the configuration section says about the source."""

    machine_type: bytes
    capabilities: list[str] = field(default_factory=list)
    target_page_bits: int = TARGET_PAGE_BITS   # absent subsection: the target's minimum
    uuid: bytes | None = None


def validated_capabilities(enabled: Collection[str]) -> list[str]:
    """The validated capabilities among ``enabled``, in QAPI enum order."""
    return [cap for cap in MIGRATION_CAPABILITIES
            if cap in VALIDATED_CAPABILITIES and cap in enabled]


def write_configuration(w: StreamWriter, machine_type: str,
                        capabilities: Collection[str] = ()) -> dict[str, Any]:
    """``u8 0x07`` and the configuration vmstate; returns its vmdesc object (QEMU 9.0+ style)."""
    name = machine_type.encode()
    if len(name) > MAX_MACHINE_TYPE_LEN:
        raise EncodeError(f"machine type name too long: {machine_type!r}")
    caps = validated_capabilities(capabilities)
    w.u8(QEMU_VM_CONFIGURATION)
    w.be32(len(name))
    w.raw(name)
    desc: dict[str, Any] = {
        "vmsd_name": "configuration", "version": 1,
        "fields": [{"name": "len", "type": "uint32", "size": 4},
                   {"name": "name", "type": "buffer", "size": len(name)}],
    }
    if caps:
        w.u8(QEMU_VM_SUBSECTION)
        w.counted_string(SUB_CAPABILITIES)
        w.be32(1)
        w.be32(len(caps))
        for cap in caps:
            w.counted_string(cap)
        cap_field: dict[str, Any] = {"name": "capabilities"}
        if len(caps) > 1:
            cap_field["array_len"] = len(caps)
        cap_field["type"] = "capability"
        cap_field["size"] = 1 + len(caps[0])
        desc["subsections"] = [{
            "vmsd_name": SUB_CAPABILITIES.decode(), "version": 1,
            "fields": [{"name": "caps_count", "type": "uint32", "size": 4}, cap_field],
        }]
    return desc


def _check_sub_version(name: bytes, version_id: int) -> None:
    # all configuration subsections are version 1, minimum 1 (savevm.c)
    if version_id > 1:
        raise StreamMismatchError(
            f"{name.decode()}: incoming version_id {version_id} is too new for local version_id 1")
    if version_id < 1:
        raise StreamMismatchError(
            f"{name.decode()}: incoming version_id {version_id} is too old for local minimum version_id  1")


def read_configuration(r: StreamReader) -> Generator[None, None, Configuration]:
    """The configuration vmstate after its ``0x07`` marker (savevm.c vmstate_configuration)."""
    length = yield from r.read_be32("configuration:len")
    if length > MAX_MACHINE_TYPE_LEN:
        raise StreamFormatError("Failed to load configuration:name",
                                detail=f"machine type name of {length} bytes (pyvm accepts {MAX_MACHINE_TYPE_LEN})")
    try:
        name = yield from r.read_bytes(length, "configuration:name")
    except MigrationError as err:
        err.add_context("Failed to load configuration:name")
        raise
    config = Configuration(machine_type=name)
    while True:
        if not (yield from r.wait_or_end(2)) or r.buffer[r.pos] != QEMU_VM_SUBSECTION:
            return config
        n = r.buffer[r.pos + 1]
        if n < len("configuration/"):
            return config
        if not (yield from r.wait_or_end(2 + n)):
            return config
        sub = r.peek(n, 2)
        if not sub.startswith(b"configuration"):
            return config
        if sub not in (SUB_PAGE_BITS, SUB_CAPABILITIES, SUB_UUID):
            raise StreamMismatchError(errno=errno.ENOENT,
                                      detail=f"unknown subsection '{shown(sub)}' in 'configuration'")
        r.skip(2 + n)
        version_id = (yield from r.read_be32(f"{sub.decode()} version")) & 0xFF
        _check_sub_version(sub, version_id)
        if sub == SUB_PAGE_BITS:
            config.target_page_bits = yield from r.read_be32(f"{sub.decode()}:target_page_bits")
        elif sub == SUB_UUID:
            config.uuid = yield from r.read_bytes(16, f"{sub.decode()}:uuid.data")
        else:
            yield from _read_capabilities(r, config)


def _read_capabilities(r: StreamReader, config: Configuration) -> Generator[None, None, None]:
    count = yield from r.read_be32("configuration/capabilities:caps_count")
    if count > MAX_CAPABILITIES:
        raise StreamFormatError("Failed to load configuration/capabilities:capabilities",
                                detail=f"{count} capabilities listed")
    config.capabilities = []
    for _ in range(count):
        try:
            raw = yield from r.read_counted("configuration/capabilities:capabilities")
        except MigrationError as err:
            err.add_context("Failed to load configuration/capabilities:capabilities")
            raise
        cap = shown_name(raw)
        if cap not in MIGRATION_CAPABILITIES:
            raise StreamMismatchError(f"Received unknown capability {cap}",
                                      "Failed to load configuration/capabilities:capabilities")
        config.capabilities.append(cap)


def _strncmp_equal(a: bytes, b: bytes, n: int) -> bool:
    """C's ``strncmp(a, b, n) == 0`` for byte strings that may lack a NUL."""
    for i in range(n):
        ca = a[i] if i < len(a) else 0
        cb = b[i] if i < len(b) else 0
        if ca != cb:
            return False
        if ca == 0:
            return True
    return True


def check_configuration(config: Configuration, machine_type: str | None,
                        capabilities: Collection[str] | None) -> None:
    """The destination's configuration_post_load checks; None skips a check."""
    if machine_type is not None and not _strncmp_equal(config.machine_type, machine_type.encode(),
                                                       len(config.machine_type)):
        received = shown_name(config.machine_type)
        raise StreamMismatchError(f"Machine type received is '{received}' and local is '{machine_type}'")
    if config.target_page_bits != TARGET_PAGE_BITS:
        raise StreamMismatchError(f"Received TARGET_PAGE_BITS is {config.target_page_bits} "
                                  f"but local is {TARGET_PAGE_BITS}")
    if capabilities is None:
        return
    lines = []
    for cap in VALIDATED_CAPABILITIES:
        source_on = cap in config.capabilities
        local_on = cap in capabilities
        if source_on != local_on:
            lines.append(f"Capability {cap} is {'on' if local_on else 'off'}, "
                         f"but received capability is {'on' if source_on else 'off'}")
    if lines:
        raise StreamMismatchError(*lines)


# -- globalstate ---------------------------------------------------------------------------------

GLOBALSTATE_IDSTR = "globalstate"
RUNSTATE_NAME_SIZE = 100
GLOBALSTATE_VMSD = VMStateDescription(
    name="globalstate", version_id=1, minimum_version_id=1,
    fields=(Field("size", "uint32"), Field("runstate", "buffer", size=RUNSTATE_NAME_SIZE)),
)
_RUNSTATE_NAMES = frozenset(state.value for state in RunState)


class GlobalState:
    """The object behind the ``globalstate`` section: the run state the source was in."""

    vmsd = GLOBALSTATE_VMSD

    def __init__(self, runstate: str = "") -> None:
        name = runstate.encode()
        if len(name) >= RUNSTATE_NAME_SIZE:
            raise EncodeError(f"run state name too long: {runstate!r}")
        self.size = len(name) + 1
        self.runstate = name.ljust(RUNSTATE_NAME_SIZE, b"\0")

    def runstate_name(self) -> str:
        """The loaded name, checked as QEMU's global_state_post_load does."""
        name = bytes(self.runstate)[:RUNSTATE_NAME_SIZE - 1].split(b"\0", 1)[0]
        text = shown(name)
        if text not in _RUNSTATE_NAMES:
            raise StreamMismatchError(f"invalid parameter value: {text}")
        return text


# -- QEMU_VM_COMMAND ---------------------------------------------------------------------------


def read_command(r: StreamReader) -> Generator[None, None, None]:
    """Parse one command after its ``0x08`` marker and refuse it (pyvm sends none)."""
    cmd = yield from r.read_be16("QEMU_VM_COMMAND")
    length = yield from r.read_be16("QEMU_VM_COMMAND")
    if cmd >= MIG_CMD_MAX or cmd == 0:
        raise StreamFormatError(f"MIG_CMD 0x{cmd:x} unknown (len 0x{length:x})")
    name, expected = MIG_COMMANDS[cmd]
    if expected != -1 and expected != length:
        raise StreamFormatError(f"{name} received with bad length - expecting {expected}, got {length}",
                                errno=errno.ERANGE)
    if cmd == MIG_CMD_OPEN_RETURN_PATH:
        raise UnsupportedFeatureError("CMD_OPEN_RETURN_PATH failed", errno=errno.EPERM,
                                      detail="pyvm's stream decoder has no return path")
    if cmd == MIG_CMD_PING:
        value = yield from r.read_be32("PING")
        raise UnsupportedFeatureError(f"CMD_PING (0x{value:x}) received with no return path",
                                      errno=errno.EPERM)
    raise UnsupportedFeatureError(f"MIG_CMD 0x{cmd:x} unknown (len 0x{length:x})",
                                  detail=f"pyvm does not implement the {name} command")
