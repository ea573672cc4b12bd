"""Run-state and machine queries: query-status, stop, cont, system_reset,
system_powerdown, quit, query-name, query-uuid, query-kvm, query-cpus-fast,
query-memdev, query-chardev, and the run-state events.

Texts and shapes: qapi/run-state.json, qapi/misc.json, qapi/machine.json, qapi/char.json
and softmmu/runstate.c.  ``stop`` on a stopped VM and ``cont`` on a running one return
``{}`` and emit nothing; the VM object decides that (see :class:`pyvm.qmp.vm_api.VmApi`).
"""

from __future__ import annotations

from typing import Any

from pyvm.qmp.context import CommandContext
from pyvm.qmp.registry import CommandTable
from pyvm.qmp.schema_core import (CHARDEV_INFO, CPU_INFO_FAST, KVM_INFO, MEMDEV, NAME_INFO,
                                  RESET_DATA, SHUTDOWN_DATA, STATUS_INFO, UUID_INFO)


def query_status(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    state = ctx.vm.runstate.state
    # singlestep: deprecated in 8.1, still reported (always false) at 8.2.
    return {"running": ctx.vm.runstate.running, "singlestep": False, "status": state.value}


def query_name(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    return {"name": ctx.vm.name} if ctx.vm.name is not None else {}


def query_uuid(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    return {"UUID": ctx.vm.uuid}


def query_kvm(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    return {"enabled": False, "present": False}


def query_cpus_fast(ctx: CommandContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    return ctx.vm.cpus_info()


def query_memdev(ctx: CommandContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    return ctx.vm.memdevs()


def query_chardev(ctx: CommandContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    devices = list(ctx.vm.chardevs())
    if ctx.service is not None:
        known = {d.get("label") for d in devices}
        devices += [d for d in ctx.service.monitor_chardevs() if d["label"] not in known]
    return devices


def stop(ctx: CommandContext, args: dict[str, Any]) -> None:
    ctx.vm.stop()


def cont(ctx: CommandContext, args: dict[str, Any]) -> None:
    ctx.vm.cont()


def system_reset(ctx: CommandContext, args: dict[str, Any]) -> None:
    ctx.vm.system_reset()


def system_powerdown(ctx: CommandContext, args: dict[str, Any]) -> None:
    ctx.vm.system_powerdown()


def quit_(ctx: CommandContext, args: dict[str, Any]) -> None:
    # The reply goes out first; SHUTDOWN and the exit follow (softmmu/runstate.c).
    ctx.call_after_reply(ctx.vm.quit)


def install(table: CommandTable) -> None:
    table.register("query-status", None, STATUS_INFO, query_status,
                   allow_preconfig=True, inline=True)
    table.register("query-name", None, NAME_INFO, query_name,
                   allow_preconfig=True, inline=True)
    table.register("query-uuid", None, UUID_INFO, query_uuid,
                   allow_preconfig=True, inline=True)
    table.register("query-kvm", None, KVM_INFO, query_kvm, inline=True)
    table.register("query-cpus-fast", None, [CPU_INFO_FAST], query_cpus_fast)
    table.register("query-memdev", None, [MEMDEV], query_memdev, allow_preconfig=True)
    table.register("query-chardev", None, [CHARDEV_INFO], query_chardev,
                   allow_preconfig=True)
    table.register("stop", None, None, stop)
    table.register("cont", None, None, cont)
    table.register("system_reset", None, None, system_reset)
    table.register("system_powerdown", None, None, system_powerdown)
    table.register("quit", None, None, quit_, allow_preconfig=True)
    table.register_event("SHUTDOWN", SHUTDOWN_DATA)
    table.register_event("POWERDOWN")
    table.register_event("RESET", RESET_DATA)
    table.register_event("STOP")
    table.register_event("RESUME")
