"""The migration commands on the QMP and human monitors.

QMP argument types come from :mod:`pyvm.migration.control.qmp_schema` (validated by the
monitor with QEMU's visitor texts); behaviour from :mod:`pyvm.migration.control.service`.
Nothing is registered on import: whoever builds a monitor passes :func:`install` to
:func:`pyvm.qmp.core.build_tables`, which registers the QMP commands and events and the
human-monitor commands on that monitor's tables.
"""

from __future__ import annotations

from typing import Any, Callable

from pyvm.errors import PyvmError
from pyvm.migration.control import dirty_commands, pagemap_query, postcopy_control
from pyvm.migration.control import service
from pyvm.migration.control.parameters import PARAMETER_SPECS
from pyvm.migration.control.postcopy_blocktime import format_uint32_list
from pyvm.migration.control.qmp_schema import COMMANDS_BY_NAME, MIGRATION_EVENTS
from pyvm.qmp.context import CommandContext
from pyvm.qmp.errors import CommandError
from pyvm.qmp.hmp import HmpContext
from pyvm.qmp.hmp_table import HmpTable
from pyvm.qmp.registry import CommandTable
from pyvm.qmp.tables import MonitorTables
from pyvm.size import parse_size

#: ``behaviour(machine, args)``: a command's work, from :mod:`pyvm.migration.control.service`.
#: The monitor knows the VM as a :class:`pyvm.qmp.vm_api.VmApi`; pyvm's is the Machine.
Behaviour = Callable[[Any, dict[str, Any]], Any]


def _guard(fn: Behaviour) -> Callable[[CommandContext, dict[str, Any]], Any]:
    def handler(ctx: CommandContext, args: dict[str, Any]) -> Any:
        try:
            return fn(ctx.vm, args)
        except CommandError:
            raise
        except PyvmError as err:
            raise CommandError(str(err)) from err
    return handler


HANDLERS: dict[str, Behaviour] = {
    "migrate": lambda vm, a: service.migrate(vm, a),
    "migrate-incoming": lambda vm, a: service.migrate_incoming(vm, a),
    "migrate_cancel": lambda vm, a: service.migrate_cancel(vm),
    "migrate-continue": lambda vm, a: service.migrate_continue(vm, a["state"]),
    "migrate-set-capabilities": lambda vm, a: service.set_capabilities(vm, a["capabilities"]),
    "query-migrate-capabilities": lambda vm, a: service.migration_of(vm).caps.query(),
    "migrate-set-parameters": lambda vm, a: service.set_parameters(vm, a),
    "query-migrate-parameters": lambda vm, a: service.migration_of(vm).params.query(),
    "query-migrate": lambda vm, a: service.query_migrate(vm),
    "migrate-start-postcopy": lambda vm, a: postcopy_control.start_postcopy(service.migration_of(vm)),
    "migrate-recover": lambda vm, a: postcopy_control.recover(vm, service.migration_of(vm), a["uri"]),
    "migrate-pause": lambda vm, a: postcopy_control.pause(service.migration_of(vm)),
}


def install_qmp(table: CommandTable) -> None:
    for name, fn in HANDLERS.items():
        spec = COMMANDS_BY_NAME[name]
        table.register(name, spec.args, spec.returns, _guard(fn))
    for ev in MIGRATION_EVENTS:
        table.register_event(ev.name, ev.data)
    pagemap_query.install(table)


# -- human monitor ------------------------------------------------------------------------------

def _on_off(value: bool) -> str:
    return "on" if value else "off"


def _kbytes(value: int) -> str:
    return f"{value >> 10} kbytes"


def hmp_info_migrate(ctx: HmpContext, args: dict[str, Any]) -> None:
    info = ctx.qmp("query-migrate")
    lines = []
    for reason in info.get("blocked-reasons", []):
        lines.append(f"Outgoing migration blocked:\n  {reason}")
    for addr in info.get("socket-address", []):
        where = addr.get("path") or f"{addr.get('host')}:{addr.get('port')}"
        lines.append(f"Socket address: {addr['type']}:{where}")
    if "status" in info:
        lines.append(f"Migration status: {info['status']}")
    for key, label in (("total-time", "total time"), ("expected-downtime", "expected downtime"),
                       ("downtime", "downtime"), ("setup-time", "setup")):
        if key in info:
            lines.append(f"{label}: {info[key]} ms")
    ram = info.get("ram")
    if ram:
        kb = _kbytes
        lines += [f"transferred ram: {kb(ram['transferred'])}",
                  f"throughput: {ram['mbps']:.2f} mbps",
                  f"remaining ram: {kb(ram['remaining'])}",
                  f"total ram: {kb(ram['total'])}",
                  f"duplicate: {ram['duplicate']} pages",
                  f"skipped: {ram['skipped']} pages",
                  f"normal: {ram['normal']} pages",
                  f"normal bytes: {kb(ram['normal-bytes'])}",
                  f"dirty sync count: {ram['dirty-sync-count']}",
                  f"page size: {ram['page-size'] >> 10} kbytes",
                  f"multifd bytes: {kb(ram['multifd-bytes'])}",
                  f"pages-per-second: {ram['pages-per-second']}",
                  f"dirty pages rate: {ram['dirty-pages-rate']} pages",
                  f"precopy ram: {kb(ram['precopy-bytes'])}",
                  f"downtime ram: {kb(ram['downtime-bytes'])}",
                  f"postcopy ram: {kb(ram['postcopy-bytes'])}"]
        if ram["postcopy-requests"]:       # hmp-cmds.c hmp_info_migrate
            lines.append(f"postcopy request count: {ram['postcopy-requests']}")
    if "cpu-throttle-percentage" in info:
        lines.append(f"cpu throttle percentage: {info['cpu-throttle-percentage']}")
    if "postcopy-blocktime" in info:        # migration-hmp-cmds.c (QEMU 8.2)
        lines.append(f"postcopy blocktime: {info['postcopy-blocktime']}")
    if "postcopy-vcpu-blocktime" in info:
        lines.append("postcopy vcpu blocktime: "
                     f"{format_uint32_list(info['postcopy-vcpu-blocktime'])}")
    cache = info.get("xbzrle-cache")
    if cache:
        # migration/migration-hmp-cmds.c hmp_info_migrate
        lines += [f"cache size: {cache['cache-size']} bytes",
                  f"xbzrle transferred: {_kbytes(cache['bytes'])}",
                  f"xbzrle pages: {cache['pages']} pages",
                  f"xbzrle cache miss: {cache['cache-miss']} pages",
                  f"xbzrle cache miss rate: {cache['cache-miss-rate']:.2f}",
                  f"xbzrle encoding rate: {cache['encoding-rate']:.2f}",
                  f"xbzrle overflow: {cache['overflow']}"]
    if "error-desc" in info:
        lines.append(f"Error: {info['error-desc']}")
    ctx.print("".join(line + "\n" for line in lines))


def hmp_info_migrate_capabilities(ctx: HmpContext, args: dict[str, Any]) -> None:
    caps = ctx.qmp("query-migrate-capabilities")
    ctx.print("".join(f"{c['capability']}: {_on_off(c['state'])}\n" for c in caps))


def hmp_info_migrate_parameters(ctx: HmpContext, args: dict[str, Any]) -> None:
    params = ctx.qmp("query-migrate-parameters")
    out = []
    for name, value in params.items():
        if isinstance(value, bool):
            value = _on_off(value)
        elif name in ("downtime-limit", "x-checkpoint-delay", "announce-initial", "announce-max",
                      "announce-step", "x-vcpu-dirty-limit-period"):
            value = f"{value} ms"
        elif name in ("max-bandwidth", "avail-switchover-bandwidth", "max-postcopy-bandwidth"):
            value = f"{value} bytes/second"
        elif name == "xbzrle-cache-size":
            value = f"{value} bytes"
        elif name in ("cpu-throttle-initial", "cpu-throttle-increment", "max-cpu-throttle",
                      "throttle-trigger-threshold"):
            value = f"{value}%"
        elif isinstance(value, str) and name.startswith("tls-"):
            value = f"'{value}'"
        out.append(f"{name}: {value}\n")
    ctx.print("".join(out))


def hmp_migrate(ctx: HmpContext, args: dict[str, Any]) -> None:
    ctx.qmp("migrate", {"uri": args["uri"], **({"resume": True} if args.get("resume") else {})})
    # Without -d QEMU's monitor waits for the end; pyvm returns at once either way and
    # 'info migrate' shows progress.


def hmp_migrate_incoming(ctx: HmpContext, args: dict[str, Any]) -> None:
    ctx.qmp("migrate-incoming", {"uri": args["uri"]})


def hmp_migrate_cancel(ctx: HmpContext, args: dict[str, Any]) -> None:
    ctx.qmp("migrate_cancel")


def hmp_migrate_continue(ctx: HmpContext, args: dict[str, Any]) -> None:
    ctx.qmp("migrate-continue", {"state": args["state"]})


def hmp_migrate_start_postcopy(ctx: HmpContext, args: dict[str, Any]) -> None:
    ctx.qmp("migrate-start-postcopy")


def hmp_migrate_recover(ctx: HmpContext, args: dict[str, Any]) -> None:
    ctx.qmp("migrate-recover", {"uri": args["uri"]})


def hmp_migrate_pause(ctx: HmpContext, args: dict[str, Any]) -> None:
    ctx.qmp("migrate-pause")


def hmp_migrate_set_capability(ctx: HmpContext, args: dict[str, Any]) -> None:
    ctx.qmp("migrate-set-capabilities",
            {"capabilities": [{"capability": args["capability"], "state": args["state"]}]})


_PARAM_TYPES = {spec.name: spec.kind for spec in PARAMETER_SPECS}


def hmp_migrate_set_parameter(ctx: HmpContext, args: dict[str, Any]) -> None:
    name, text = args["parameter"], args["value"]
    kind = _PARAM_TYPES.get(name)
    if kind is None:
        raise CommandError(f"Parameter '{name}' is unexpected")
    value: Any = text
    try:
        if kind == "bool":
            if text not in ("on", "off", "true", "false"):
                raise ValueError
            value = text in ("on", "true")
        elif kind == "size":
            # QEMU's HMP takes sizes with suffixes; bandwidths default to MiB/s
            default = "M" if name in ("max-bandwidth", "avail-switchover-bandwidth",
                                       "max-postcopy-bandwidth") else ""
            value = parse_size(text, default)
        elif kind.startswith("uint") or kind.startswith("int"):
            value = int(text, 0)
    except ValueError:
        raise CommandError(f"Parameter '{name}' expects {kind}") from None
    ctx.qmp("migrate-set-parameters", {name: value})


def install_hmp(table: HmpTable) -> None:
    r = table.register
    r("migrate", "detach:-d,resume:-r,uri:s", "[-d] [-r] uri",
      "migrate to URI (using -d to not wait for completion)", hmp_migrate)
    r("migrate_incoming", "uri:s", "uri", "Continue an incoming migration from an -incoming defer",
      hmp_migrate_incoming)
    r("migrate_cancel", "", "", "cancel the current VM migration", hmp_migrate_cancel)
    r("migrate_continue", "state:s", "state", "Continue migration from the given paused state",
      hmp_migrate_continue)
    r("migrate_set_capability", "capability:s,state:b", "capability state",
      "Enable/Disable the usage of a capability for migration", hmp_migrate_set_capability)
    r("migrate_set_parameter", "parameter:s,value:s", "parameter value",
      "Set the parameter for migration", hmp_migrate_set_parameter)
    # hmp-commands.hx
    r("migrate_start_postcopy", "", "",
      "Followup to a migration command to switch the migration to postcopy mode. The "
      "postcopy-ram capability must be set on both source and destination before the "
      "original migration command .", hmp_migrate_start_postcopy)
    r("migrate_recover", "uri:s", "uri", "Continue a paused incoming postcopy migration",
      hmp_migrate_recover)
    r("migrate_pause", "", "", "Pause an ongoing migration (postcopy-only)", hmp_migrate_pause)
    i = table.register_info
    i("migrate", "", "", "show migration status", hmp_info_migrate)
    i("migrate_capabilities", "", "", "show current migration capabilities",
      hmp_info_migrate_capabilities)
    i("migrate_parameters", "", "", "show current migration parameters",
      hmp_info_migrate_parameters)



def install(tables: MonitorTables) -> None:
    """Migration's QMP commands and events and its human-monitor commands, on one monitor."""
    install_qmp(tables.qmp)
    install_hmp(tables.hmp)
    dirty_commands.install(tables)
