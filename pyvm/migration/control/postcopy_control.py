"""The postcopy commands: ``migrate-start-postcopy``, ``migrate-pause``, ``migrate-recover``.

Their checks follow QEMU 8.2's ``qmp_migrate_start_postcopy``, ``qmp_migrate_pause`` and
``qmp_migrate_recover`` (migration/migration.c) in QEMU's order and with its texts.

``migrate-start-postcopy`` asks the source (:mod:`pyvm.migration.control.postcopy_source`)
to switch after its current round.  Pausing and recovering a postcopy migration are not
implemented yet: ``migrate-pause`` and ``migrate-recover`` give QEMU's texts outside the
states they need and say so inside them.
"""

from __future__ import annotations

from pyvm.migration.control.manager import MigrationCommandError, MigrationManager
from pyvm.migration.control.postcopy_source import PostcopySource
from pyvm.migration.control.status import MigrationStatus

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
    if mgr.status in (St.POSTCOPY_ACTIVE, St.POSTCOPY_RECOVER) or \
            _incoming_status(mgr) in (St.POSTCOPY_ACTIVE, St.POSTCOPY_RECOVER):
        raise MigrationCommandError("pyvm cannot pause a postcopy migration yet")
    raise MigrationCommandError("migrate-pause is currently only supported during "
                                "postcopy-active or postcopy-recover state")


def recover(mgr: MigrationManager, uri: str) -> None:
    """``migrate-recover URI``: the destination listens again for a paused postcopy."""
    if _incoming_status(mgr) is not St.POSTCOPY_PAUSED:
        raise MigrationCommandError("Migrate recover can only be run when postcopy is paused.")
    raise MigrationCommandError("pyvm cannot recover a postcopy migration yet")
