"""Monitor control commands: qmp_capabilities, query-version, query-commands,
query-qmp-schema (qapi/control.json, qapi/introspect.json, monitor/qmp-cmds-control.c)."""

from __future__ import annotations

from typing import Any

import pyvm
from pyvm.qmp.context import CommandContext
from pyvm.qmp.errors import COMMAND_NOT_FOUND, CommandError
from pyvm.qmp.introspect import cached_schema_info
from pyvm.qmp.registry import CommandTable
from pyvm.qmp.schema_core import COMMAND_INFO, QMP_CAPABILITY, SCHEMA_INFO, VERSION_INFO


def version_info() -> dict[str, Any]:
    """``query-version``'s value; the greeting carries the same object."""
    major, minor, micro = pyvm.QEMU_API_VERSION
    return {"qemu": {"major": major, "minor": minor, "micro": micro},
            "package": "pyvm " + pyvm.__version__}


def qmp_capabilities(ctx: CommandContext, args: dict[str, Any]) -> None:
    state = ctx.monitor
    if state.negotiated:
        raise CommandError("Capabilities negotiation is already complete, command ignored",
                           COMMAND_NOT_FOUND)
    wanted = args.get("enable", [])
    missing = [cap for cap in wanted if cap not in state.offered]
    if missing:
        raise CommandError(f"Capability {', '.join(missing)} not available")
    state.enabled = frozenset(wanted)
    state.negotiated = True


def query_version(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    return version_info()


def query_commands(ctx: CommandContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"name": cmd.name} for cmd in ctx.table.commands()]


def query_qmp_schema(ctx: CommandContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    return cached_schema_info(ctx.table)


def install(table: CommandTable) -> None:
    table.register("qmp_capabilities", {"*enable": [QMP_CAPABILITY]}, None, qmp_capabilities,
                   allow_preconfig=True, inline=True)
    table.register("query-version", None, VERSION_INFO, query_version,
                   allow_preconfig=True, inline=True)
    table.register("query-commands", None, [COMMAND_INFO], query_commands,
                   allow_preconfig=True, inline=True)
    table.register("query-qmp-schema", None, [SCHEMA_INFO], query_qmp_schema,
                   allow_preconfig=True, inline=True)
