"""The dirty-rate and dirty-limit commands on the QMP and human monitors.

QMP (qapi/migration.json at QEMU 8.2): ``calc-dirty-rate``, ``query-dirty-rate``,
``set-vcpu-dirty-limit``, ``cancel-vcpu-dirty-limit``, ``query-vcpu-dirty-limit``.
HMP: ``calc_dirty_rate``, ``info dirty_rate``, ``set_vcpu_dirty_limit``,
``cancel_vcpu_dirty_limit``, ``info vcpu_dirty_limit`` with QEMU's output
(migration/dirtyrate.c, system/dirtylimit.c).  Behaviour: :mod:`pyvm.dirty_rate`,
:mod:`pyvm.dirty_limit`.  Registered by :func:`install` (called from
:func:`pyvm.migration.control.monitor_commands.install`).
"""

from __future__ import annotations

from typing import Any

from pyvm import dirty_limit, dirty_rate
from pyvm.migration.control import service
from pyvm.qmp.context import CommandContext
from pyvm.qmp.errors import CommandError
from pyvm.qmp.hmp import HmpContext
from pyvm.qmp.schema import Array, Enum, Struct
from pyvm.qmp.tables import MonitorTables

DIRTY_RATE_STATUS = Enum("DirtyRateStatus", list(dirty_rate.STATUSES))
DIRTY_RATE_MODE = Enum("DirtyRateMeasureMode", list(dirty_rate.MODES))
TIME_UNIT = Enum("TimeUnit", list(dirty_rate.TIME_UNITS))
DIRTY_RATE_VCPU = Struct("DirtyRateVcpu", {"id": "int", "dirty-rate": "int64"})
DIRTY_RATE_INFO = Struct("DirtyRateInfo", {
    "*dirty-rate": "int64", "status": DIRTY_RATE_STATUS, "start-time": "int64",
    "calc-time": "int64", "calc-time-unit": TIME_UNIT, "sample-pages": "uint64",
    "mode": DIRTY_RATE_MODE, "*vcpu-dirty-rate": [DIRTY_RATE_VCPU]})
CALC_DIRTY_RATE_ARGS = Struct("q_obj_calc-dirty-rate-arg", {
    "calc-time": "int64", "*calc-time-unit": TIME_UNIT, "*sample-pages": "int",
    "*mode": DIRTY_RATE_MODE})
QUERY_DIRTY_RATE_ARGS = Struct("q_obj_query-dirty-rate-arg", {"*calc-time-unit": TIME_UNIT})
DIRTY_LIMIT_INFO = Struct("DirtyLimitInfo", {
    "cpu-index": "int", "limit-rate": "uint64", "current-rate": "uint64"})
SET_DIRTY_LIMIT_ARGS = Struct("q_obj_set-vcpu-dirty-limit-arg", {
    "*cpu-index": "int", "dirty-rate": "uint64"})
CANCEL_DIRTY_LIMIT_ARGS = Struct("q_obj_cancel-vcpu-dirty-limit-arg", {"*cpu-index": "int"})


def _vm(ctx: CommandContext) -> Any:
    return ctx.vm           # the monitor's VM is a pyvm.machine.Machine


def _limit_blocked(machine: Any) -> bool:
    """``dirtylimit_is_allowed``: not while a migration with ``dirty-limit`` holds the limit."""
    mgr = service.migration_of(machine)
    return bool(mgr.active and mgr.caps["dirty-limit"]
                and dirty_limit.controller_of(machine).in_service)


def calc_dirty_rate(ctx: CommandContext, args: dict[str, Any]) -> None:
    try:
        dirty_rate.calc_of(_vm(ctx)).start(args["calc-time"], args.get("calc-time-unit"),
                                         args.get("sample-pages"), args.get("mode"))
    except dirty_rate.DirtyRateError as err:
        raise CommandError(str(err)) from err


def query_dirty_rate(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    return dirty_rate.calc_of(_vm(ctx)).query(args.get("calc-time-unit"))


def set_vcpu_dirty_limit(ctx: CommandContext, args: dict[str, Any]) -> None:
    ctl = dirty_limit.controller_of(_vm(ctx))
    try:
        index = args.get("cpu-index")
        ctl.check_index(index)                           # QEMU checks the index first
        if _limit_blocked(_vm(ctx)):
            raise CommandError("can't set dirty page rate limit while migration is running")
        ctl.set_limit(index, args["dirty-rate"])
    except dirty_limit.DirtyLimitError as err:
        raise CommandError(str(err)) from err


def cancel_vcpu_dirty_limit(ctx: CommandContext, args: dict[str, Any]) -> None:
    ctl = dirty_limit.controller_of(_vm(ctx))
    try:
        index = args.get("cpu-index")
        ctl.check_index(index)
        if _limit_blocked(_vm(ctx)):
            raise CommandError("can't cancel dirty page rate limit while migration is running")
        if ctl.in_service:
            ctl.cancel_limit(index)
    except dirty_limit.DirtyLimitError as err:
        raise CommandError(str(err)) from err


def query_vcpu_dirty_limit(ctx: CommandContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    return dirty_limit.controller_of(_vm(ctx)).query()


# -- human monitor ------------------------------------------------------------------------------

def hmp_calc_dirty_rate(ctx: HmpContext, args: dict[str, Any]) -> None:
    sec = args.get("second", 0)
    if not sec:
        ctx.print("Incorrect period length specified!\n")
        return
    ring, bitmap = args.get("dirty_ring", False), args.get("dirty_bitmap", False)
    if ring and bitmap:
        ctx.print("Either dirty ring or dirty bitmap can be specified!\n")
        return
    mode = "dirty-bitmap" if bitmap else "dirty-ring" if ring else "page-sampling"
    qargs: dict[str, Any] = {"calc-time": sec, "mode": mode}
    if "sample_pages_per_GB" in args:
        qargs["sample-pages"] = args["sample_pages_per_GB"]
    ctx.qmp("calc-dirty-rate", qargs)
    ctx.print(f"Starting dirty rate measurement with period {sec} seconds\n"
              "[Please use 'info dirty_rate' to check results]\n")


def hmp_info_dirty_rate(ctx: HmpContext, args: dict[str, Any]) -> None:
    info = ctx.qmp("query-dirty-rate")
    out = [f"Status: {info['status']}\n", f"Start Time: {info['start-time']} (ms)\n"]
    if info["mode"] == "page-sampling":
        out.append(f"Sample Pages: {info['sample-pages']} (per GB)\n")
    out.append(f"Period: {info['calc-time']} (sec)\n")
    out.append(f"Mode: {info['mode']}\n")
    if "dirty-rate" in info:
        out.append(f"Dirty rate: {info['dirty-rate']} (MB/s)\n")
        for v in info.get("vcpu-dirty-rate", []):
            out.append(f"vcpu[{v['id']}], Dirty rate: {v['dirty-rate']} (MB/s)\n")
    else:
        out.append("Dirty rate: (not ready)\n")
    ctx.print("".join(out))


def hmp_set_vcpu_dirty_limit(ctx: HmpContext, args: dict[str, Any]) -> None:
    rate = args["dirty_rate"]
    if rate < 0:
        raise CommandError(f"invalid dirty page limit {rate}")
    qargs: dict[str, Any] = {"dirty-rate": rate}
    if "cpu_index" in args:
        qargs["cpu-index"] = args["cpu_index"]
    ctx.qmp("set-vcpu-dirty-limit", qargs)


def hmp_cancel_vcpu_dirty_limit(ctx: HmpContext, args: dict[str, Any]) -> None:
    ctx.qmp("cancel-vcpu-dirty-limit",
            {"cpu-index": args["cpu_index"]} if "cpu_index" in args else {})
    ctx.print("[Please use 'info vcpu_dirty_limit' to query dirty limit for virtual CPU]\n")


def hmp_info_vcpu_dirty_limit(ctx: HmpContext, args: dict[str, Any]) -> None:
    limits = ctx.qmp("query-vcpu-dirty-limit")
    if not limits:
        ctx.print("Dirty page limit not enabled!\n")
        return
    ctx.print("".join(f"vcpu[{i['cpu-index']}], limit rate {i['limit-rate']} (MB/s), "
                      f"current rate {i['current-rate']} (MB/s)\n" for i in limits))


def install(tables: MonitorTables) -> None:
    q = tables.qmp
    q.register("calc-dirty-rate", CALC_DIRTY_RATE_ARGS, None, calc_dirty_rate)
    q.register("query-dirty-rate", QUERY_DIRTY_RATE_ARGS, DIRTY_RATE_INFO, query_dirty_rate)
    q.register("set-vcpu-dirty-limit", SET_DIRTY_LIMIT_ARGS, None, set_vcpu_dirty_limit)
    q.register("cancel-vcpu-dirty-limit", CANCEL_DIRTY_LIMIT_ARGS, None, cancel_vcpu_dirty_limit)
    q.register("query-vcpu-dirty-limit", None, Array(DIRTY_LIMIT_INFO), query_vcpu_dirty_limit)
    h = tables.hmp
    h.register("calc_dirty_rate", "dirty_ring:-r,dirty_bitmap:-b,second:l,sample_pages_per_GB:l?",
               "[-r] [-b] second [sample_pages_per_GB]",
               "start a round of guest dirty rate measurement (-r: dirty ring, "
               "-b: dirty bitmap)", hmp_calc_dirty_rate)
    h.register("set_vcpu_dirty_limit", "dirty_rate:l,cpu_index:l?", "dirty_rate [cpu_index]",
               "set dirty page rate limit, use cpu_index to set limit on a specified "
               "virtual cpu", hmp_set_vcpu_dirty_limit)
    h.register("cancel_vcpu_dirty_limit", "cpu_index:l?", "[cpu_index]",
               "cancel dirty page rate limit, use cpu_index to cancel limit on a "
               "specified virtual cpu", hmp_cancel_vcpu_dirty_limit)
    h.register_info("dirty_rate", "", "", "show dirty rate information", hmp_info_dirty_rate)
    h.register_info("vcpu_dirty_limit", "", "", "show dirty page limit information of all vCPU",
                    hmp_info_vcpu_dirty_limit)
