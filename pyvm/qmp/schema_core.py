"""QAPI types of the core commands and events, as declared by QEMU 8.2.

Sources: qapi/control.json (capabilities, version, commands), qapi/run-state.json
(RunState, StatusInfo, ShutdownCause), qapi/misc.json (NameInfo, UuidInfo, KvmInfo),
qapi/machine.json (CpuInfoFast, Memdev), qapi/char.json (ChardevInfo) and
qapi/introspect.json (SchemaInfo).  Member order is QEMU's: it decides output key order.
"""

from __future__ import annotations

from pyvm.qmp.schema import Enum, Struct, Union
from pyvm.runstate import RunState

# -- control.json ---------------------------------------------------------------------------
QMP_CAPABILITY = Enum("QMPCapability", ["oob"])
VERSION_TRIPLE = Struct("VersionTriple", {"major": "int", "minor": "int", "micro": "int"})
VERSION_INFO = Struct("VersionInfo", {"qemu": VERSION_TRIPLE, "package": "str"})
COMMAND_INFO = Struct("CommandInfo", {"name": "str"})

# -- run-state.json -------------------------------------------------------------------------
RUN_STATE = Enum("RunState", [s.value for s in RunState])
STATUS_INFO = Struct("StatusInfo", {"running": "bool", "singlestep": "bool",
                                    "status": RUN_STATE})
SHUTDOWN_CAUSE = Enum("ShutdownCause", [
    "none", "host-error", "host-qmp-quit", "host-qmp-system-reset", "host-signal", "host-ui",
    "guest-shutdown", "guest-reset", "guest-panic", "subsystem-reset", "snapshot-load"])
SHUTDOWN_DATA = Struct("q_obj_SHUTDOWN-arg", {"guest": "bool", "reason": SHUTDOWN_CAUSE})
RESET_DATA = Struct("q_obj_RESET-arg", {"guest": "bool", "reason": SHUTDOWN_CAUSE})

# -- misc.json ------------------------------------------------------------------------------
NAME_INFO = Struct("NameInfo", {"*name": "str"})
UUID_INFO = Struct("UuidInfo", {"UUID": "str"})
KVM_INFO = Struct("KvmInfo", {"enabled": "bool", "present": "bool"})

# -- machine.json ---------------------------------------------------------------------------
SYS_EMU_TARGET = Enum("SysEmuTarget", [
    "aarch64", "alpha", "arm", "avr", "cris", "hppa", "i386", "loongarch64", "m68k",
    "microblaze", "microblazeel", "mips", "mips64", "mips64el", "mipsel", "nios2", "or1k",
    "ppc", "ppc64", "riscv32", "riscv64", "rx", "s390x", "sh4", "sh4eb", "sparc",
    "sparc64", "tricore", "x86_64", "xtensa", "xtensaeb"])
CPU_INSTANCE_PROPERTIES = Struct("CpuInstanceProperties", {
    "*node-id": "int", "*drawer-id": "int", "*book-id": "int", "*socket-id": "int",
    "*die-id": "int", "*cluster-id": "int", "*core-id": "int", "*thread-id": "int"})
CPU_S390_STATE = Enum("CpuS390State",
                      ["uninitialized", "stopped", "check-stop", "operating", "load"])
CPU_INFO_S390 = Struct("CpuInfoS390", {"cpu-state": CPU_S390_STATE})
CPU_INFO_FAST = Union("CpuInfoFast",
                      base={"cpu-index": "int", "qom-path": "str", "thread-id": "int",
                            "*props": CPU_INSTANCE_PROPERTIES, "target": SYS_EMU_TARGET},
                      discriminator="target", variants={"s390x": CPU_INFO_S390})
HOST_MEM_POLICY = Enum("HostMemPolicy", ["default", "preferred", "bind", "interleave"])
MEMDEV = Struct("Memdev", {"*id": "str", "size": "size", "merge": "bool", "dump": "bool",
                           "prealloc": "bool", "share": "bool", "*reserve": "bool",
                           "host-nodes": ["uint16"], "policy": HOST_MEM_POLICY})

# -- char.json ------------------------------------------------------------------------------
CHARDEV_INFO = Struct("ChardevInfo",
                      {"label": "str", "filename": "str", "frontend-open": "bool"})

# -- introspect.json (8.2) ------------------------------------------------------------------
SCHEMA_META_TYPE = Enum("SchemaMetaType", ["builtin", "enum", "array", "object",
                                           "alternate", "command", "event"])
JSON_TYPE = Enum("JSONType", ["string", "number", "int", "boolean", "null", "object",
                              "array", "value"])
_INFO_ENUM_MEMBER = Struct("SchemaInfoEnumMember", {"name": "str", "*features": ["str"]})
_INFO_OBJECT_MEMBER = Struct("SchemaInfoObjectMember", {
    "name": "str", "type": "str", "*default": "any", "*features": ["str"]})
_INFO_OBJECT_VARIANT = Struct("SchemaInfoObjectVariant", {"case": "str", "type": "str"})
_INFO_ALTERNATE_MEMBER = Struct("SchemaInfoAlternateMember", {"type": "str"})
SCHEMA_INFO = Union("SchemaInfo",
                    base={"name": "str", "meta-type": SCHEMA_META_TYPE, "*features": ["str"]},
                    discriminator="meta-type", variants={
    "builtin": Struct("SchemaInfoBuiltin", {"json-type": JSON_TYPE}),
    "enum": Struct("SchemaInfoEnum", {"members": [_INFO_ENUM_MEMBER], "values": ["str"]}),
    "array": Struct("SchemaInfoArray", {"element-type": "str"}),
    "object": Struct("SchemaInfoObject", {"members": [_INFO_OBJECT_MEMBER], "*tag": "str",
                                          "*variants": [_INFO_OBJECT_VARIANT]}),
    "alternate": Struct("SchemaInfoAlternate", {"members": [_INFO_ALTERNATE_MEMBER]}),
    "command": Struct("SchemaInfoCommand", {"arg-type": "str", "ret-type": "str",
                                            "*allow-oob": "bool"}),
    "event": Struct("SchemaInfoEvent", {"arg-type": "str"})})
