"""The ``multifd`` capability and its parameters turned into channels at migrate time.

The commands (:mod:`pyvm.migration.control.service`) call these three functions: the
transport check both ends make (QEMU 8.2 migration.c
``migration_channels_and_transport_compatible``), the source's configuration for
:class:`~pyvm.migration.control.multifd_channel.MultifdChannel`, and the destination's
:class:`~pyvm.migration.control.multifd_incoming.MultifdIncoming`.  Parameters are read
when the migration starts, as QEMU reads them.
"""

from __future__ import annotations

import uuid as uuidlib
from typing import TYPE_CHECKING

import numpy as np

from pyvm.migration.control.address import (FileMigrationAddress, InetSocketAddress,
                                            MigrationAddress, SocketMigrationAddress,
                                            UnixSocketAddress)
from pyvm.migration.control.manager import MigrationCommandError, MigrationManager
from pyvm.migration.control.multifd_channel import MultifdConfig
from pyvm.migration.control.multifd_incoming import MultifdIncoming

if TYPE_CHECKING:
    from pyvm.machine import Machine
    from pyvm.migration.control.connect import PreparedIncoming


def needs_multiple_sockets(mgr: MigrationManager) -> bool:
    """migration_needs_multiple_sockets: multifd or postcopy-preempt."""
    return bool(mgr.caps["multifd"] or mgr.caps["postcopy-preempt"])


def supports_multiple_channels(addr: MigrationAddress) -> bool:
    """tcp and unix sockets can be connected again for each channel (fd cannot)."""
    return isinstance(addr, SocketMigrationAddress) and isinstance(
        addr.socket, (InetSocketAddress, UnixSocketAddress))


def refuse_single_channel(mgr: MigrationManager, addr: MigrationAddress) -> None:
    # QEMU 9 migration.c migrate_multi_channels_is_allowed: a file is one "channel" per
    # multifd thread when mapped-ram gives every page a fixed offset.
    if mgr.caps["mapped-ram"] and isinstance(addr, FileMigrationAddress):
        return
    if needs_multiple_sockets(mgr) and not supports_multiple_channels(addr):
        raise MigrationCommandError("Migration requires multi-channel URIs (e.g. tcp)")


def _uuid(machine: "Machine") -> bytes:
    return uuidlib.UUID(machine.uuid).bytes


def multifd_config(machine: "Machine", mgr: MigrationManager) -> MultifdConfig | None:
    """The source's channels, or None without the capability (or with mapped-ram, whose
    multifd threads write the file themselves: pyvm.migration.control.mapped_ram_channel)."""
    if not mgr.caps["multifd"] or mgr.caps["mapped-ram"]:
        return None
    p = mgr.params
    return MultifdConfig(channels=int(p["multifd-channels"]),
                         compression=str(p["multifd-compression"]),
                         zlib_level=int(p["multifd-zlib-level"]),
                         zstd_level=int(p["multifd-zstd-level"]),
                         uuid=_uuid(machine),
                         zero_copy=bool(mgr.caps["zero-copy-send"]),
                         stats=lambda: mgr.stats)


def multifd_incoming(machine: "Machine", mgr: MigrationManager,
                     prepared: "PreparedIncoming") -> MultifdIncoming | None:
    """The destination's page channels, or None without the capability (or with
    mapped-ram, read from the file by its own threads)."""
    if not mgr.caps["multifd"] or mgr.caps["mapped-ram"]:
        return None
    channels = int(mgr.params["multifd-channels"])
    if prepared.listener is not None:
        prepared.listener.set_backlog(channels)

    def block_memory(name: str) -> np.ndarray | None:
        block = machine.ram.by_name(name)
        if block is None or mgr.block_ignored(block):
            return None
        mem: np.ndarray = block.mem
        return mem
    return MultifdIncoming(channels, str(mgr.params["multifd-compression"]), _uuid(machine),
                           block_memory, first_is_main=bool(mgr.params["tls-creds"]))


__all__ = ["multifd_config", "multifd_incoming", "needs_multiple_sockets",
           "refuse_single_channel", "supports_multiple_channels"]
