"""QAPI schema of the migration commands and events (qapi/migration.json, qapi/sockets.json
at QEMU 8.2), declared with :mod:`pyvm.qmp.schema`.

The monitor validates arguments against these types with QEMU's visitor texts and lists
them in ``query-qmp-schema``; member order is QEMU's, which decides the order of keys
in replies.  :data:`MIGRATION_COMMANDS` and :data:`MIGRATION_EVENTS` name each
command's argument and result types; the code that implements the commands registers
them on a :class:`pyvm.qmp.registry.CommandTable`::

    for spec in MIGRATION_COMMANDS:
        table.register(spec.name, spec.args, spec.returns, handlers[spec.name])

pyvm extension: ``migrate-incoming`` accepts ``*exit-on-error: bool`` (QEMU 9.1's member,
default true) already at the 8.2 level: with ``false`` a failed load leaves the
destination running in status ``failed`` instead of exiting.

This module is declarative data for the monitor; the migration code proper does not
import it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyvm.migration.control.capabilities import CAPABILITY_NAMES
from pyvm.migration.control.parameters import (MULTIFD_COMPRESSION_VALUES, PARAMETER_SPECS, MigMode,
                                       ParameterSpec)
from pyvm.migration.control.status import MigrationStatus
from pyvm.qmp.schema import Alternate, Array, Enum, QType, Struct, TypeRef, Union

# -- qapi/sockets.json ------------------------------------------------------------------------
SOCKET_ADDRESS_TYPE = Enum("SocketAddressType", ["inet", "unix", "vsock", "fd"])
INET_SOCKET_ADDRESS = Struct("InetSocketAddress", {
    "host": "str", "port": "str",                      # InetSocketAddressBase
    "*numeric": "bool", "*to": "uint16", "*ipv4": "bool", "*ipv6": "bool",
    "*keep-alive": "bool", "*mptcp": "bool"})
UNIX_SOCKET_ADDRESS = Struct("UnixSocketAddress",
                             {"path": "str", "*abstract": "bool", "*tight": "bool"})
VSOCK_SOCKET_ADDRESS = Struct("VsockSocketAddress", {"cid": "str", "port": "str"})
STRING = Struct("String", {"str": "str"})
SOCKET_ADDRESS = Union("SocketAddress", {"type": SOCKET_ADDRESS_TYPE}, "type", {
    "inet": INET_SOCKET_ADDRESS, "unix": UNIX_SOCKET_ADDRESS,
    "vsock": VSOCK_SOCKET_ADDRESS, "fd": STRING})

# -- addresses and channels (8.2) ---------------------------------------------------------------
MIGRATION_ADDRESS_TYPE = Enum("MigrationAddressType", ["socket", "exec", "rdma", "file"])
MIGRATION_EXEC_COMMAND = Struct("MigrationExecCommand", {"args": ["str"]})
FILE_MIGRATION_ARGS = Struct("FileMigrationArgs", {"filename": "str", "offset": "uint64"})
MIGRATION_ADDRESS = Union("MigrationAddress", {"transport": MIGRATION_ADDRESS_TYPE},
                          "transport", {
                              "socket": SOCKET_ADDRESS, "exec": MIGRATION_EXEC_COMMAND,
                              "rdma": INET_SOCKET_ADDRESS, "file": FILE_MIGRATION_ARGS})
MIGRATION_CHANNEL_TYPE = Enum("MigrationChannelType", ["main"])
MIGRATION_CHANNEL = Struct("MigrationChannel", {"channel-type": MIGRATION_CHANNEL_TYPE,
                                                "addr": MIGRATION_ADDRESS})

# -- status and statistics ----------------------------------------------------------------------
MIGRATION_STATUS = Enum("MigrationStatus", [s.value for s in MigrationStatus])
MIGRATION_STATS = Struct("MigrationStats", {
    "transferred": "int", "remaining": "int", "total": "int", "duplicate": "int",
    "skipped": "int", "normal": "int", "normal-bytes": "int", "dirty-pages-rate": "int",
    "mbps": "number", "dirty-sync-count": "int", "postcopy-requests": "int",
    "page-size": "int", "multifd-bytes": "uint64", "pages-per-second": "uint64",
    "precopy-bytes": "uint64", "downtime-bytes": "uint64", "postcopy-bytes": "uint64",
    "dirty-sync-missed-zero-copy": "uint64"})
VFIO_STATS = Struct("VfioStats", {"transferred": "int"})
XBZRLE_CACHE_STATS = Struct("XBZRLECacheStats", {
    "cache-size": "size", "bytes": "int", "pages": "int", "cache-miss": "int",
    "cache-miss-rate": "number", "encoding-rate": "number", "overflow": "int"})
COMPRESSION_STATS = Struct("CompressionStats", {
    "pages": "int", "busy": "int", "busy-rate": "number", "compressed-size": "int",
    "compression-rate": "number"})
MIGRATION_INFO = Struct("MigrationInfo", {
    "*status": MIGRATION_STATUS, "*ram": MIGRATION_STATS, "*disk": MIGRATION_STATS,
    "*vfio": VFIO_STATS, "*xbzrle-cache": XBZRLE_CACHE_STATS, "*total-time": "int",
    "*expected-downtime": "int", "*downtime": "int", "*setup-time": "int",
    "*cpu-throttle-percentage": "int", "*error-desc": "str", "*blocked-reasons": ["str"],
    "*postcopy-blocktime": "uint32", "*postcopy-vcpu-blocktime": ["uint32"],
    "*compression": COMPRESSION_STATS, "*socket-address": [SOCKET_ADDRESS],
    "*dirty-limit-throttle-time-per-round": "uint64", "*dirty-limit-ring-full-time": "uint64"})

# -- capabilities ---------------------------------------------------------------------------
MIGRATION_CAPABILITY = Enum("MigrationCapability", list(CAPABILITY_NAMES))
MIGRATION_CAPABILITY_STATUS = Struct("MigrationCapabilityStatus",
                                     {"capability": MIGRATION_CAPABILITY, "state": "bool"})

# -- parameters -----------------------------------------------------------------------------
MIG_MODE = Enum("MigMode", [m.value for m in MigMode])
MULTIFD_COMPRESSION = Enum("MultiFDCompression", list(MULTIFD_COMPRESSION_VALUES))
STR_OR_NULL = Alternate("StrOrNull", ["str", "null"])
BITMAP_ALIAS_TRANSFORM = Struct("BitmapMigrationBitmapAliasTransform", {"*persistent": "bool"})
BITMAP_ALIAS = Struct("BitmapMigrationBitmapAlias", {
    "name": "str", "alias": "str", "*transform": BITMAP_ALIAS_TRANSFORM})
NODE_ALIAS = Struct("BitmapMigrationNodeAlias", {
    "node-name": "str", "alias": "str", "bitmaps": [BITMAP_ALIAS]})

_KIND_TYPES: dict[str, TypeRef] = {
    "size": "size", "uint8": "uint8", "uint32": "uint32", "uint64": "uint64",
    "bool": "bool", "str": "str", "MigMode": MIG_MODE, "MultiFDCompression": MULTIFD_COMPRESSION,
    "BitmapMapping": [NODE_ALIAS],
}


def _parameter_members(set_side: bool) -> dict[str, TypeRef]:
    def type_of(spec: ParameterSpec) -> TypeRef:
        if spec.kind == "StrOrNull":
            return STR_OR_NULL if set_side else "str"
        return _KIND_TYPES[spec.kind]
    return {"*" + spec.name: type_of(spec) for spec in PARAMETER_SPECS}


# The set side takes tls-* as StrOrNull (null resets to ""); the query side gives strings.
MIGRATE_SET_PARAMETERS = Struct("MigrateSetParameters", _parameter_members(True))
MIGRATION_PARAMETERS = Struct("MigrationParameters", _parameter_members(False))

# -- command arguments ----------------------------------------------------------------------
MIGRATE_ARGS = Struct("q_obj_migrate-arg", {
    "*uri": "str", "*channels": [MIGRATION_CHANNEL],
    "*blk": "bool", "*inc": "bool",                 # deprecated in 8.2
    "*detach": "bool", "*resume": "bool"})
MIGRATE_INCOMING_ARGS = Struct("q_obj_migrate-incoming-arg", {
    "*uri": "str", "*channels": [MIGRATION_CHANNEL],
    "*exit-on-error": "bool"})                      # pyvm extension at the 8.2 level
MIGRATE_CONTINUE_ARGS = Struct("q_obj_migrate-continue-arg", {"state": MIGRATION_STATUS})
MIGRATE_RECOVER_ARGS = Struct("q_obj_migrate-recover-arg", {"uri": "str"})
MIGRATE_SET_CAPABILITIES_ARGS = Struct("q_obj_migrate-set-capabilities-arg",
                                       {"capabilities": [MIGRATION_CAPABILITY_STATUS]})

# -- event data -----------------------------------------------------------------------------
MIGRATION_EVENT_DATA = Struct("q_obj_MIGRATION-arg", {"status": MIGRATION_STATUS})
MIGRATION_PASS_EVENT_DATA = Struct("q_obj_MIGRATION_PASS-arg", {"pass": "int"})


@dataclass(frozen=True)
class CommandSchema:
    """A command's name, argument object type (``None``: none) and result type (``None``:
    ``{}``).  ``migrate-set-parameters`` is boxed: its arguments are the members of
    ``MigrateSetParameters`` themselves."""

    name: str
    args: Struct | None
    returns: QType | None


@dataclass(frozen=True)
class EventSchema:
    name: str
    data: Struct | None


MIGRATION_COMMANDS: tuple[CommandSchema, ...] = (
    CommandSchema("migrate", MIGRATE_ARGS, None),
    CommandSchema("migrate-incoming", MIGRATE_INCOMING_ARGS, None),
    CommandSchema("migrate_cancel", None, None),
    CommandSchema("migrate-continue", MIGRATE_CONTINUE_ARGS, None),
    CommandSchema("migrate-set-capabilities", MIGRATE_SET_CAPABILITIES_ARGS, None),
    CommandSchema("query-migrate-capabilities", None, Array(MIGRATION_CAPABILITY_STATUS)),
    CommandSchema("migrate-set-parameters", MIGRATE_SET_PARAMETERS, None),
    CommandSchema("query-migrate-parameters", None, MIGRATION_PARAMETERS),
    CommandSchema("query-migrate", None, MIGRATION_INFO),
    CommandSchema("migrate-start-postcopy", None, None),
    CommandSchema("migrate-recover", MIGRATE_RECOVER_ARGS, None),
    CommandSchema("migrate-pause", None, None),
)
MIGRATION_EVENTS: tuple[EventSchema, ...] = (
    EventSchema("MIGRATION", MIGRATION_EVENT_DATA),
    EventSchema("MIGRATION_PASS", MIGRATION_PASS_EVENT_DATA),
)
COMMANDS_BY_NAME: dict[str, CommandSchema] = {c.name: c for c in MIGRATION_COMMANDS}
