"""pyvm's core command table: the commands and events of the monitor issue."""

from __future__ import annotations

from pyvm.qmp import commands_control, commands_memory, commands_vm, hmp_qmp
from pyvm.qmp.registry import CommandTable


def install_core(table: CommandTable) -> None:
    commands_control.install(table)
    commands_vm.install(table)
    commands_memory.install(table)
    hmp_qmp.install(table)
