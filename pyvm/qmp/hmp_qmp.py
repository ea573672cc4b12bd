"""``human-monitor-command``: run one human-monitor line over QMP (monitor/qmp-cmds.c).

Each call gets a fresh human monitor (QEMU creates one per call), optionally bound to
``cpu-index``; the output is returned as a string with ``\\r\\n`` line ends.
"""

from __future__ import annotations

from typing import Any

from pyvm.qmp.context import CommandContext
from pyvm.qmp.errors import CommandError
from pyvm.qmp.hmp import HmpState, run_line
from pyvm.qmp.limits import command_line_too_long
from pyvm.qmp.registry import CommandTable


def human_monitor_command(ctx: CommandContext, args: dict[str, Any]) -> str:
    state = HmpState()
    if "cpu-index" in args:
        if args["cpu-index"] not in {c["cpu-index"] for c in ctx.vm.cpus_info()}:
            raise CommandError("Parameter 'cpu-index' expects a CPU number")
        state.cpu_index = args["cpu-index"]
    if ctx.hmp_table is None:
        raise CommandError("this monitor has no human monitor commands")
    text = command_line_too_long(args["command-line"]) \
        or run_line(ctx.hmp_table, ctx, state, args["command-line"])
    return text.replace("\n", "\r\n")


def install(table: CommandTable) -> None:
    table.register("human-monitor-command", {"command-line": "str", "*cpu-index": "int"},
                   "str", human_monitor_command)
