"""pyvm's core monitor commands, and the one place tables are built."""

from __future__ import annotations

from pyvm.qmp import commands_control, commands_memory, commands_vm, hmp_commands, hmp_qmp
from pyvm.qmp.tables import Installer, MonitorTables


def build_tables(*installers: Installer) -> MonitorTables:
    """New tables with pyvm's core QMP and HMP commands, then each installer's, in order."""
    tables = MonitorTables()
    commands_control.install(tables.qmp)
    commands_vm.install(tables.qmp)
    commands_memory.install(tables.qmp)
    hmp_qmp.install(tables.qmp)
    hmp_commands.install(tables.hmp)
    for install in installers:
        install(tables)
    return tables
