"""The migration commands' behaviour, independent of how they are called (QMP or HMP).

Each function checks the VM and migration state in QEMU's order and raises
:class:`MigrationCommandError` with QEMU 8.2's text when it refuses.  The monitor's
command table (:mod:`pyvm.migration.control.monitor_commands`) and the ``-incoming``
option (:func:`start_incoming_from_cli`) call these.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from pyvm import dirty_limit, dirty_rate
from pyvm.errors import ConfigError, PyvmError
from pyvm.migration.control.address import FileMigrationAddress, MigrationAddress, resolve_address
from pyvm.migration.control.capabilities import CapabilityContext
from pyvm.migration.control.connect import STREAMING, outgoing_opener, prepare_incoming
from pyvm.migration.control.incoming import IncomingMigration
from pyvm.migration.control.manager import MigrationCommandError, MigrationManager
from pyvm.migration.control.postcopy_source import PostcopySource
from pyvm.migration.control.multifd_setup import (multifd_config, multifd_incoming,
                                                  refuse_single_channel)
from pyvm.migration.control.mapped_ram_channel import refusal as mapped_ram_refusal
from pyvm.migration.control.precopy import Precopy
from pyvm.migration.control.status import POSTCOPY_STATES, MigrationStats, MigrationStatus
from pyvm.migration.control.tls_setup import tls_accept, tls_upgrade
from pyvm.migration.transports import AbortSignal
from pyvm.runstate import RunState

if TYPE_CHECKING:
    from pyvm.machine import Machine
    from pyvm.ram import RamBlock

_LOCK = threading.Lock()


def migration_of(machine: "Machine") -> MigrationManager:
    """The machine's migration manager, created on first use."""
    with _LOCK:
        if machine.migration is None:
            mgr = MigrationManager(machine)
            for obj in machine.migratable():
                if getattr(obj, "vmsd", None) is None:
                    mgr.blockers.add(f"State blocked by non-migratable device '{obj.idstr}'")
            for reason, modes in machine.migration_blockers:
                mgr.blockers.add(reason, modes)
            machine.migration = mgr
        found: MigrationManager = machine.migration
        return found


def _migrated_blocks(machine: "Machine", mgr: MigrationManager) -> list["RamBlock"]:
    return [b for b in machine.ram if not mgr.block_ignored(b)]


def _refuse(text: str) -> MigrationCommandError:
    return MigrationCommandError(text)


def _address(uri: str | None, channels: Sequence[Mapping[str, Any]] | None,
             command: str) -> MigrationAddress:
    try:
        return resolve_address(uri, channels, command)
    except PyvmError as err:
        raise _refuse(str(err)) from err


def migrate(machine: "Machine", args: Mapping[str, Any]) -> None:
    mgr = migration_of(machine)
    state = machine.runstate.state
    if args.get("resume"):
        job = mgr.precopy
        if mgr.status is not MigrationStatus.POSTCOPY_PAUSED or not isinstance(job, PostcopySource):
            raise _refuse("Cannot resume if there is no paused migration")
        addr = _address(args.get("uri"), args.get("channels"), "migrate")
        abort = AbortSignal()
        job.resume(outgoing_opener(addr, abort, lambda: _migrated_blocks(machine, mgr),
                                   mgr.caps["rdma-pin-all"], tls_upgrade(machine, mgr, addr, abort)),
                   abort)
        mgr.start_outgoing(job, job.resume_run)
        return
    if state is RunState.INMIGRATE:
        raise _refuse("Guest is waiting for an incoming migration")
    if mgr.active:
        raise _refuse("There's a migration process in progress")
    if state is RunState.POSTMIGRATE:
        raise _refuse("Can't migrate the vm that was paused due to previous migration")
    if args.get("blk") or args.get("inc"):
        raise _refuse("pyvm has no block migration: copy disk images separately")
    addr = _address(args.get("uri"), args.get("channels"), "migrate")
    refuse_single_channel(mgr, addr)
    mode = mgr.params.mode.value
    blocker = mgr.blockers.first_for(mode)
    if blocker is not None:
        raise _refuse(blocker)
    _check_mapped_ram(mgr, addr)
    if mode == "cpr-reboot":
        if isinstance(addr, STREAMING):
            raise _refuse("cpr-reboot mode saves the VM for a later restart: use a file: URI or an "
                          "exec: command that stores the stream (tcp, unix and rdma need a live "
                          "destination)")
        if mgr.caps["x-ignore-shared"]:
            for block in machine.ram:
                if block.backend.cfg.qom_type == "memory-backend-memfd":
                    raise _refuse(f"memory-backend-memfd '{block.name}' does not survive its process: "
                                  "cpr-reboot with x-ignore-shared needs memory-backend-file,share=on")
    abort = AbortSignal()
    opener = outgoing_opener(addr, abort, lambda: _migrated_blocks(machine, mgr),
                             mgr.caps["rdma-pin-all"], tls_upgrade(machine, mgr, addr, abort),
                             multifd_config(machine, mgr))
    with mgr.lock:
        mgr.incoming = None
        mgr.stats = MigrationStats()
        mgr.error_desc = None
        mgr.setup_time_ms = mgr.total_time_ms = mgr.downtime_ms = mgr.expected_downtime_ms = 0
        mgr.start_time = 0.0
        mgr.runstate_at_start = state
        mgr.address = addr
        pre = (PostcopySource if mgr.caps["postcopy-ram"] else Precopy)(mgr, machine, opener, abort)
        mgr.precopy = pre
    mgr.set_status(MigrationStatus.SETUP)
    mgr.start_outgoing(pre, pre.run)


def migrate_cancel(machine: "Machine") -> None:
    mgr = migration_of(machine)
    pre = mgr.precopy
    if mgr.status in POSTCOPY_STATES:
        # The guest runs on the destination already (QEMU 9.x refuses the same way).
        raise _refuse("Postcopy migration in progress, cannot cancel.")
    if pre is None or not mgr.active or mgr.status is MigrationStatus.CANCELLING:
        return
    mgr.set_status(MigrationStatus.CANCELLING)
    pre.cancel()


def migrate_continue(machine: "Machine", state: str) -> None:
    mgr = migration_of(machine)
    if mgr.status.value != state or mgr.precopy is None:
        raise _refuse(f"Migration not in expected state: {mgr.status.value}")
    mgr.precopy.continue_event.set()


def migrate_incoming(machine: "Machine", args: Mapping[str, Any]) -> None:
    mgr = migration_of(machine)
    if mgr.deferred_incoming is None:
        raise _refuse("'-incoming' was not specified on the command line")
    if mgr.incoming is not None or not mgr.deferred_incoming:
        raise _refuse("The incoming migration has already been started")
    start_incoming(machine, args.get("uri"), args.get("channels"),
                   exit_on_error=bool(args.get("exit-on-error", True)))


def start_incoming(machine: "Machine", uri: str | None,
                   channels: Sequence[Mapping[str, Any]] | None, exit_on_error: bool = True,
                   from_cli: bool = False) -> None:
    mgr = migration_of(machine)
    addr = _address(uri, channels, "migrate-incoming")
    refuse_single_channel(mgr, addr)
    _check_mapped_ram(mgr, addr)
    if not from_cli:
        mgr.set_status(MigrationStatus.SETUP)
    try:
        prepared = prepare_incoming(addr, lambda: _migrated_blocks(machine, mgr))
    except PyvmError as err:
        raise _refuse(str(err)) from err
    multifd = multifd_incoming(machine, mgr, prepared)
    accept = tls_accept(machine, mgr, prepared,
                        keep_listening=multifd is not None or bool(mgr.caps["postcopy-preempt"]))
    if multifd is not None:
        accept = multifd.opener(accept, prepared.close)
    inc = IncomingMigration(mgr, machine, accept, exit_on_error=exit_on_error,
                            socket_address=prepared.socket_address, on_close=prepared.close,
                            multifd=multifd)
    mgr.deferred_incoming = False
    mgr.incoming = inc
    inc.start()


def _check_mapped_ram(mgr: MigrationManager, addr: MigrationAddress) -> None:
    if mgr.caps["mapped-ram"]:
        text = mapped_ram_refusal(addr, bool(mgr.params["tls-creds"]),
                                  mgr.params["multifd-compression"])
        if text is not None:
            raise _refuse(text)


def start_incoming_from_cli(machine: "Machine", uri: str) -> None:
    """``-incoming URI`` / ``-incoming defer`` at start-up."""
    mgr = migration_of(machine)
    mgr.deferred_incoming = uri == "defer"
    if uri != "defer":
        try:
            start_incoming(machine, uri, None, exit_on_error=True, from_cli=True)
        except PyvmError as err:
            raise ConfigError(f"-incoming {uri}: {err}") from err


def shutdown(machine: "Machine") -> None:
    """Stop and join the VM's migration threads, if it ever had a migration manager."""
    mgr = machine.migration
    if mgr is not None:
        mgr.shutdown()
    dirty_limit.shutdown(machine)
    dirty_rate.shutdown(machine)


def set_capabilities(machine: "Machine", caps: Sequence[Mapping[str, Any]]) -> None:
    mgr = migration_of(machine)
    if mgr.active or (mgr.incoming is not None and mgr.incoming.status is MigrationStatus.ACTIVE):
        raise _refuse("There's a migration process in progress")
    try:
        mgr.caps.set_many([(c["capability"], c["state"]) for c in caps], CapabilityContext(
            incoming_started=mgr.incoming is not None,
            multifd_compression=str(mgr.params["multifd-compression"]),
            tls=bool(mgr.params["tls-creds"])))
    except PyvmError as err:
        raise _refuse(str(err)) from err


def set_parameters(machine: "Machine", params: Mapping[str, Any]) -> None:
    mgr = migration_of(machine)
    try:
        mgr.params.apply(params, zero_copy_send=mgr.caps["zero-copy-send"])
    except PyvmError as err:
        raise _refuse(str(err)) from err


def query_migrate(machine: "Machine") -> dict[str, Any]:
    return migration_of(machine).query()


__all__ = ["FileMigrationAddress", "migrate", "migrate_cancel", "migrate_continue",
           "migrate_incoming", "migration_of", "query_migrate", "set_capabilities",
           "set_parameters", "shutdown", "start_incoming", "start_incoming_from_cli"]
