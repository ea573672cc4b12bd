"""Migration's monitor commands are registered explicitly, per monitor, on QMP and HMP at once."""

from __future__ import annotations

import importlib

from pyvm.migration.control import monitor_commands
from pyvm.qmp.core import build_tables

QMP = ["migrate", "migrate-incoming", "migrate_cancel", "migrate-continue",
       "migrate-set-capabilities", "query-migrate-capabilities", "migrate-set-parameters",
       "query-migrate-parameters", "query-migrate", "migrate-start-postcopy", "migrate-recover",
       "migrate-pause"]
HMP = ["migrate", "migrate_incoming", "migrate_cancel", "migrate_continue",
       "migrate_set_capability", "migrate_set_parameter", "migrate_start_postcopy",
       "migrate_recover", "migrate_pause"]
HMP_INFO = ["migrate", "migrate_capabilities", "migrate_parameters"]


def _hmp_names(cmds: list) -> set[str]:
    return {alias for c in cmds for alias in c.name.split("|")}


def test_importing_registers_nothing() -> None:
    importlib.reload(monitor_commands)
    plain = build_tables()
    assert not {c.name for c in plain.qmp.commands()} & set(QMP)
    assert plain.qmp.event("MIGRATION") is None
    assert not _hmp_names(plain.hmp.commands()) & set(HMP)
    assert not _hmp_names(plain.hmp.info_commands()) & set(HMP_INFO)


def test_one_installer_fills_both_tables_of_one_monitor() -> None:
    tables = build_tables(monitor_commands.install)
    assert set(QMP) <= {c.name for c in tables.qmp.commands()}
    assert tables.qmp.event("MIGRATION") is not None
    assert tables.qmp.event("MIGRATION_PASS") is not None
    assert set(HMP) <= _hmp_names(tables.hmp.commands())
    assert set(HMP_INFO) <= _hmp_names(tables.hmp.info_commands())
    other = build_tables()                      # another monitor's tables stay as built
    assert other.qmp.lookup("migrate") is None
