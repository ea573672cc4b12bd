"""One monitor's commands: its QMP table and its human-monitor table, built together.

There is no process-wide table and importing a module never adds a command: whoever
builds a monitor calls :func:`pyvm.qmp.core.build_tables` with the installers it wants
(the command line adds migration's), and hands the result to the monitor service.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from pyvm.qmp.hmp_table import HmpTable
from pyvm.qmp.registry import CommandTable


@dataclass
class MonitorTables:
    """The QMP commands and events, and the human monitor's commands, of one monitor."""

    qmp: CommandTable = field(default_factory=CommandTable)
    hmp: HmpTable = field(default_factory=HmpTable)


#: ``install(tables)`` registers a feature's QMP and HMP commands on both tables.
Installer = Callable[[MonitorTables], None]
