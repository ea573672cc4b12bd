"""Human-monitor views of machine internals: ``info tlb``, ``info mem``, ``info pic``,
``info irq`` (texts from QEMU's hmp-commands-info.hx; layouts from target/i386/monitor.c
and hw/intc/i8259_common.c, reproduced by :mod:`pyvm.page_tables` and the PIC device)."""

from __future__ import annotations

from typing import Any

from pyvm.page_tables import mem_text, tlb_text
from pyvm.qmp.hmp import HmpContext
from pyvm.qmp.hmp_table import HmpTable


def _paging(ctx: HmpContext, render: Any) -> None:
    cpus = [c["cpu-index"] for c in ctx.qmp("query-cpus-fast")]
    if ctx.state.cpu_index not in cpus:
        ctx.print("No CPU available\n")
        return
    regs = ctx.vm.cpu_registers(ctx.state.cpu_index)

    def read(addr: int, size: int) -> bytes:
        return bytes(ctx.vm.read_physical(addr, size))

    try:
        ctx.print(render(read, regs.get("cr0", 0), regs.get("cr3", 0), regs.get("cr4", 0),
                         regs.get("efer", 0)))
    except ValueError as err:
        ctx.print(f"{err}\n")


def hmp_info_tlb(ctx: HmpContext, args: dict[str, Any]) -> None:
    _paging(ctx, tlb_text)


def hmp_info_mem(ctx: HmpContext, args: dict[str, Any]) -> None:
    _paging(ctx, mem_text)


def _controllers(ctx: HmpContext) -> list[tuple[str, str, list[int]]]:
    get = getattr(ctx.vm, "interrupt_controllers", None)
    return list(get()) if get is not None else []


def hmp_info_pic(ctx: HmpContext, args: dict[str, Any]) -> None:
    for _name, text, _counts in _controllers(ctx):
        ctx.print(text)


def hmp_info_irq(ctx: HmpContext, args: dict[str, Any]) -> None:
    # monitor/hmp-cmds.c hmp_info_irq_foreach: only lines that fired are listed
    for name, _text, counts in _controllers(ctx):
        ctx.print(f"IRQ statistics for {name}:\n")
        for line, count in enumerate(counts):
            if count > 0:
                ctx.print("%2d: %d\n" % (line, count))


def install(table: HmpTable) -> None:
    i = table.register_info
    i("tlb", "", "", "show virtual to physical memory mappings", hmp_info_tlb)
    i("mem", "", "", "show the active virtual memory mappings", hmp_info_mem)
    i("pic", "", "", "show PIC state", hmp_info_pic)
    i("irq", "", "", "show the interrupts statistics (if available)", hmp_info_irq)
