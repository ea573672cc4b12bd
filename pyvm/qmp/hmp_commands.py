"""pyvm's human-monitor commands (texts from QEMU's hmp-commands.hx / -info.hx).

Each handler goes through the QMP command of the same meaning where there is one, so the
two monitors cannot disagree.  Migration adds ``info migrate``, ``migrate``,
``migrate_set_capability`` and ``migrate_set_parameter`` when the monitor is built with
its installer (:func:`pyvm.migration.control.monitor_commands.install`).
"""

from __future__ import annotations

from typing import Any

from pyvm.qmp import hmp_inspect
from pyvm.qmp.hmp import HmpContext, help_text
from pyvm.qmp.hmp_table import HmpTable
from pyvm.qmp.hmp_format import code_mode, disassemble, memory_dump, printc, register_dump
from pyvm.qmp.limits import check_dump


def hmp_help(ctx: HmpContext, args: dict[str, Any]) -> None:
    ctx.print(help_text(ctx.table, args.get("name", "").split()))


def hmp_info(ctx: HmpContext, args: dict[str, Any]) -> None:
    ctx.print(help_text(ctx.table, ["info"]))


def hmp_info_status(ctx: HmpContext, args: dict[str, Any]) -> None:
    info = ctx.qmp("query-status")
    text = "VM status: " + ("running" if info["running"] else "paused")
    if info["singlestep"]:
        text += " (single step mode)"
    if not info["running"] and info["status"] != "paused":
        text += f" ({info['status']})"
    ctx.print(text + "\n")


def hmp_info_registers(ctx: HmpContext, args: dict[str, Any]) -> None:
    cpus = [c["cpu-index"] for c in ctx.qmp("query-cpus-fast")]
    if args.get("cpustate_all"):
        selected = cpus
    else:
        index = args.get("vcpu", ctx.state.cpu_index)
        if index not in cpus:
            ctx.print(f"CPU#{index} not available\n" if "vcpu" in args
                      else "No CPU available\n")
            return
        selected = [index]
    for index in selected:
        ctx.print(f"\nCPU#{index}\n")
        ctx.print(register_dump(ctx.vm.cpu_registers(index)))


def hmp_info_mtree(ctx: HmpContext, args: dict[str, Any]) -> None:
    text = ctx.vm.mtree()
    ctx.print(text if text.endswith("\n") else text + "\n")


def hmp_info_name(ctx: HmpContext, args: dict[str, Any]) -> None:
    info = ctx.qmp("query-name")
    if "name" in info:
        ctx.print(info["name"] + "\n")


def hmp_info_uuid(ctx: HmpContext, args: dict[str, Any]) -> None:
    ctx.print(ctx.qmp("query-uuid")["UUID"] + "\n")


def hmp_info_kvm(ctx: HmpContext, args: dict[str, Any]) -> None:
    info = ctx.qmp("query-kvm")
    state = ("enabled" if info["enabled"] else "disabled") if info["present"] \
        else "not compiled"
    ctx.print(f"kvm support: {state}\n")


def hmp_info_cpus(ctx: HmpContext, args: dict[str, Any]) -> None:
    for cpu in ctx.qmp("query-cpus-fast"):
        mark = "*" if cpu["cpu-index"] == ctx.state.cpu_index else " "
        ctx.print(f"{mark} CPU #{cpu['cpu-index']}: thread_id={cpu['thread-id']}\n")


def hmp_info_chardev(ctx: HmpContext, args: dict[str, Any]) -> None:
    for dev in ctx.qmp("query-chardev"):
        ctx.print(f"{dev['label']}: filename={dev['filename']}\n")


def hmp_stop(ctx: HmpContext, args: dict[str, Any]) -> None:
    ctx.qmp("stop")


def hmp_cont(ctx: HmpContext, args: dict[str, Any]) -> None:
    ctx.qmp("cont")


def hmp_system_reset(ctx: HmpContext, args: dict[str, Any]) -> None:
    ctx.qmp("system_reset")


def hmp_system_powerdown(ctx: HmpContext, args: dict[str, Any]) -> None:
    ctx.qmp("system_powerdown")


def hmp_quit(ctx: HmpContext, args: dict[str, Any]) -> None:
    ctx.qmp("quit")


def _dump(ctx: HmpContext, args: dict[str, Any], physical: bool) -> None:
    check_dump("xp" if physical else "x", args["count"], args["format"], args["size"])
    addr = args["addr"] & ((1 << 64) - 1)
    cpu = ctx.state.cpu_index

    def read(a: int, n: int) -> bytes:
        if physical:
            return bytes(ctx.vm.read_physical(a, n))
        return bytes(ctx.vm.read_virtual(cpu, a, n))

    if args["format"] == "i":
        mode = code_mode(ctx.vm.cpu_registers(cpu), args["size"])
        ctx.print(disassemble(read, addr, args["count"], mode))
    else:
        ctx.print(memory_dump(read, args["count"], args["format"], args["size"], addr))


def hmp_x(ctx: HmpContext, args: dict[str, Any]) -> None:
    _dump(ctx, args, physical=False)


def hmp_xp(ctx: HmpContext, args: dict[str, Any]) -> None:
    _dump(ctx, args, physical=True)


def hmp_print(ctx: HmpContext, args: dict[str, Any]) -> None:
    value, fmt = args["val"] & ((1 << 64) - 1), args["format"]
    if fmt == "o":
        text = "0" + format(value, "o") if value else "0"
    elif fmt == "x":
        text = "0x" + format(value, "x") if value else "0"
    elif fmt == "u":
        text = str(value)
    elif fmt == "c":
        text = printc(value)
    else:
        text = str(value - (1 << 64) if value >> 63 else value)
    ctx.print(text + "\n")


def hmp_memsave(ctx: HmpContext, args: dict[str, Any]) -> None:
    ctx.qmp("memsave", {"val": args["val"], "size": args["size"],
                        "filename": args["filename"], "cpu-index": ctx.state.cpu_index})


def hmp_pmemsave(ctx: HmpContext, args: dict[str, Any]) -> None:
    ctx.qmp("pmemsave", {"val": args["val"], "size": args["size"],
                         "filename": args["filename"]})


def hmp_cpu(ctx: HmpContext, args: dict[str, Any]) -> None:
    if args["index"] not in [c["cpu-index"] for c in ctx.qmp("query-cpus-fast")]:
        ctx.print("invalid CPU index\n")
        return
    ctx.state.cpu_index = args["index"]


def install(table: HmpTable) -> None:
    r = table.register
    r("help|?", "name:S?", "[cmd]", "show the help", hmp_help)
    r("info", "", "[subcommand]", "show various information about the system state",
      hmp_info)
    r("quit|q", "", "", "quit the emulator", hmp_quit)
    r("stop|s", "", "", "stop emulation", hmp_stop)
    r("cont|c", "", "", "resume emulation", hmp_cont)
    r("system_reset", "", "", "reset the system", hmp_system_reset)
    r("system_powerdown", "", "", "send system power down event", hmp_system_powerdown)
    r("x", "fmt:/,addr:l", "/fmt addr", "virtual memory dump starting at 'addr'", hmp_x)
    r("xp", "fmt:/,addr:l", "/fmt addr", "physical memory dump starting at 'addr'", hmp_xp)
    r("print|p", "fmt:/,val:l", "/fmt expr",
      "print expression value (use $reg for CPU register access)", hmp_print)
    r("memsave", "val:l,size:i,filename:s", "addr size file",
      "save to disk virtual memory dump starting at 'addr' of size 'size'", hmp_memsave)
    r("pmemsave", "val:l,size:i,filename:s", "addr size file",
      "save to disk physical memory dump starting at 'addr' of size 'size'", hmp_pmemsave)
    r("cpu", "index:i", "index", "set the default CPU", hmp_cpu)
    i = table.register_info
    i("status", "", "", "show the current VM status (running|paused)", hmp_info_status)
    i("registers", "cpustate_all:-a,vcpu:i?", "[-a|vcpu]",
      "show the cpu registers (-a: show register info for all cpus; vcpu: specific vCPU "
      "to query; show the current CPU's registers if no argument is specified)",
      hmp_info_registers)
    i("mtree", "flatview:-f,dispatch_tree:-d,owner:-o,disabled:-D", "[-f][-d][-o][-D]",
      "show memory tree (-f: dump flat view for address spaces;-d: dump dispatch tree, "
      "valid with -f only);-o: dump region owners/parents;-D: dump disabled regions",
      hmp_info_mtree)
    i("name", "", "", "show the current VM name", hmp_info_name)
    i("uuid", "", "", "show the current VM UUID", hmp_info_uuid)
    i("kvm", "", "", "show KVM information", hmp_info_kvm)
    i("cpus", "", "", "show infos for each CPU", hmp_info_cpus)
    i("chardev", "", "", "show the character devices", hmp_info_chardev)
    hmp_inspect.install(table)
