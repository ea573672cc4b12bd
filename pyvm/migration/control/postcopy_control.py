"""The postcopy commands: ``migrate-start-postcopy``, ``migrate-pause``, ``migrate-recover``.

Their checks follow QEMU 8.2's ``qmp_migrate_start_postcopy``, ``qmp_migrate_pause`` and
``qmp_migrate_recover`` (migration/migration.c) in QEMU's order and with its texts.

``migrate-start-postcopy`` asks the source (:mod:`pyvm.migration.control.postcopy_source`)
to switch after its current round; ``migrate-pause`` cuts the channel of a running
postcopy (either side), which then pauses; ``migrate-recover`` makes a paused destination
listen on a new address, and ``migrate`` with ``resume: true`` on the source connects to
it and carries on (:mod:`pyvm.migration.control.service`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyvm.errors import PyvmError
from pyvm.migration.control.address import resolve_address
from pyvm.migration.control.connect import prepare_incoming
from pyvm.migration.control.incoming import IncomingMigration
from pyvm.migration.control.manager import MigrationCommandError, MigrationManager
from pyvm.migration.control.postcopy_source import PostcopySource
from pyvm.migration.control.status import MigrationStatus
from pyvm.migration.control.tls_setup import tls_accept

if TYPE_CHECKING:
    from pyvm.machine import Machine

St = MigrationStatus


def _postcopy_enabled(mgr: MigrationManager) -> bool:
    # options.c migrate_postcopy(): postcopy-ram or dirty-bitmaps
    return bool(mgr.caps["postcopy-ram"] or mgr.caps["dirty-bitmaps"])


def _incoming_status(mgr: MigrationManager) -> MigrationStatus:
    incoming = mgr.incoming
    status = incoming.status if incoming is not None else None
    return status or St.NONE


def start_postcopy(mgr: MigrationManager) -> None:
    """``migrate-start-postcopy``: ask the running migration to switch to postcopy."""
    if not _postcopy_enabled(mgr):
        raise MigrationCommandError("Enable postcopy with migrate_set_capability before "
                                    "the start of migration")
    if mgr.status is St.NONE:
        raise MigrationCommandError("Postcopy must be started after migration has been started")
    # QEMU raises no error once the migration finished (the request would race with it).
    job = mgr.precopy
    if isinstance(job, PostcopySource):
        job.request_postcopy()


def pause(mgr: MigrationManager) -> None:
    """``migrate-pause``: cut the migration channel of a postcopy migration (either side)."""
    job = mgr.precopy
    if mgr.status in (St.POSTCOPY_ACTIVE, St.POSTCOPY_RECOVER) and isinstance(job, PostcopySource):
        job.pause()
        return
    incoming = mgr.incoming
    if _incoming_status(mgr) in (St.POSTCOPY_ACTIVE, St.POSTCOPY_RECOVER) and \
            isinstance(incoming, IncomingMigration):
        incoming.pause()
        return
    raise MigrationCommandError("migrate-pause is currently only supported during "
                                "postcopy-active or postcopy-recover state")


def recover(machine: "Machine", mgr: MigrationManager, uri: str) -> None:
    """``migrate-recover URI``: the destination listens again for a paused postcopy."""
    incoming = mgr.incoming
    if _incoming_status(mgr) is not St.POSTCOPY_PAUSED or not isinstance(incoming, IncomingMigration):
        raise MigrationCommandError("Migrate recover can only be run when postcopy is paused.")
    try:
        addr = resolve_address(uri, None, "migrate-recover")
        prepared = prepare_incoming(
            addr, lambda: [b for b in machine.ram if not mgr.block_ignored(b)])
    except PyvmError as err:
        raise MigrationCommandError(str(err)) from err
    # postcopy-preempt: the source connects its preempt channel here too
    accept = tls_accept(machine, mgr, prepared, keep_listening=bool(mgr.caps["postcopy-preempt"]))
    incoming.recover(accept, prepared.socket_address, prepared.close)
