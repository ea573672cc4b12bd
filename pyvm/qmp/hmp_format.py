"""Text the human monitor prints: memory dumps and x86 register dumps.

Layouts follow QEMU: ``memory_dump`` in monitor/hmp-cmds-target.c (16 bytes a line, 8
for byte units; ``0x%0*x`` hex cells; the ``c`` format's quirk of keeping the line length
of the previous unit size) and ``x86_cpu_dump_state`` in target/i386/cpu-dump.c (long
mode vs. legacy layout, segment caches, FPU and XMM lines).  Everything here is a pure
function of bytes or register values.
"""

from __future__ import annotations

from typing import Callable, Mapping

ReadFn = Callable[[int, int], bytes]
_ADDR_MASK = (1 << 64) - 1

# target/i386/cpu.h descriptor-cache flag bits
DESC_TYPE_SHIFT = 8
DESC_A_MASK = 1 << 8
DESC_R_MASK = DESC_W_MASK = 1 << 9
DESC_C_MASK = DESC_E_MASK = 1 << 10
DESC_CS_MASK = 1 << 11
DESC_S_MASK = 1 << 12
DESC_DPL_SHIFT = 13
DESC_P_MASK = 1 << 15
DESC_L_MASK = 1 << 21
DESC_B_MASK = 1 << 22
EFER_LMA = 1 << 10
CR0_PE = 1

_SYS_TYPES = (
    ("Reserved", "TSS16-avl", "LDT", "TSS16-busy", "CallGate16", "TaskGate", "IntGate16",
     "TrapGate16", "Reserved", "TSS32-avl", "Reserved", "TSS32-busy", "CallGate32",
     "Reserved", "IntGate32", "TrapGate32"),
    ("<hiword>", "Reserved", "LDT", "Reserved", "Reserved", "Reserved", "Reserved",
     "Reserved", "Reserved", "TSS64-avl", "Reserved", "TSS64-busy", "CallGate64",
     "Reserved", "IntGate64", "TrapGate64"),
)


def printc(value: int) -> str:
    """monitor_printc: a quoted character, escaped."""
    special = {0x27: "\\'", 0x5C: "\\\\", 0x0A: "\\n", 0x0D: "\\r"}
    if value in special:
        body = special[value]
    elif 32 <= value <= 126:
        body = chr(value)
    else:
        body = "\\x%02x" % (value & 0xFF)
    return "'" + body + "'"


def _cell(fmt: str, value: int, wsize: int, digits: int) -> str:
    if fmt == "o":
        text = "0" + format(value, "o") if value else "0"
        return text.rjust(digits)
    if fmt == "u":
        return str(value).rjust(digits)
    if fmt == "d":
        signed = value - (1 << 64) if value >> 63 else value
        return str(signed).rjust(digits)
    if fmt == "c":
        return printc(value)
    return "0x" + format(value, "x").zfill(digits)


def memory_dump(read: ReadFn, count: int, fmt: str, wsize: int, addr: int) -> str:
    """``x``/``xp`` output for ``count`` units of ``wsize`` bytes in format ``fmt``."""
    if wsize not in (1, 2, 4, 8):
        wsize = 4
    length = wsize * count
    line_size = 8 if wsize == 1 else 16
    if fmt == "o":
        digits = (wsize * 8 + 2) // 3
    elif fmt in ("u", "d"):
        digits = (wsize * 8 * 10 + 32) // 33
    elif fmt == "c":
        digits, wsize = 0, 1
    else:
        digits = wsize * 2
    out: list[str] = []
    while length > 0:
        out.append("%016x:" % addr)
        chunk = min(length, line_size)
        try:
            data = read(addr, chunk)
        except ValueError:
            out.append(" Cannot access memory\n")
            break
        for i in range(0, chunk, wsize):
            value = int.from_bytes(data[i:i + wsize], "little")
            out.append(" " + _cell(fmt, value, wsize, digits))
        out.append("\n")
        addr = (addr + chunk) & _ADDR_MASK
        length -= chunk
    return "".join(out)


def disassemble(read: ReadFn, addr: int, count: int, mode: int) -> str:
    """``x/Ni``: AT&T syntax, bytes split after 8 as QEMU's capstone printer does."""
    try:
        # Deferred: capstone loads its native library, and only ``x/i`` needs it.
        import capstone
    except ImportError:  # pragma: no cover - capstone is a pyvm dependency
        return "no disassembler available\n"
    cs_mode = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32}.get(mode, capstone.CS_MODE_64)
    md = capstone.Cs(capstone.CS_ARCH_X86, cs_mode)
    md.syntax = capstone.CS_OPT_SYNTAX_ATT
    out: list[str] = []
    for _ in range(count):
        try:
            code = read(addr, 16)
        except ValueError:
            try:
                code = read(addr, 1)
            except ValueError:
                out.append("0x%08x: Cannot access memory\n" % addr)
                break
        insn = next(md.disasm(code, addr, 1), None)
        if insn is None:
            out.append("0x%08x:  %02x%s  %-8s\n" % (addr, code[0], " " * 21, "(bad)"))
            addr = (addr + 1) & _ADDR_MASK
            continue
        raw = bytes(insn.bytes)
        cells = "".join(" %02x" % b for b in raw[:8]).ljust(24)
        out.append("0x%08x: %s  %-8s %s\n" % (addr, cells, insn.mnemonic, insn.op_str))
        for i in range(8, len(raw), 8):
            out.append("0x%08x: %s\n" % (addr + i, "".join(" %02x" % b for b in raw[i:i + 8])))
        addr = (addr + len(raw)) & _ADDR_MASK
    return "".join(out)


def code_mode(regs: Mapping[str, int], size: int) -> int:
    """Instruction width for ``x/i``: ``h`` 16-bit, ``w`` 32-bit, else the CPU's mode."""
    if size == 2:
        return 16
    if size == 4:
        return 32
    cs_flags = regs.get("cs_flags")
    if regs.get("efer", 0) & EFER_LMA and (cs_flags is None or cs_flags & DESC_L_MASK):
        return 64
    if cs_flags is not None:
        return 32 if cs_flags & DESC_B_MASK else 16
    return 32 if regs.get("cr0", 0) & CR0_PE else 16


def _seg_line(regs: Mapping[str, int], label: str, key: str, cs64: bool, lma: bool,
              pe: bool) -> str:
    sel = regs.get(key, 0) & 0xFFFF
    base = regs.get(f"{key}_base", (sel << 4) if not pe else 0)
    limit = regs.get(f"{key}_limit", 0xFFFF)
    flags = regs.get(f"{key}_flags")
    shown = (flags or 0) & 0x00FFFF00
    if cs64:
        line = "%-3s=%04x %016x %08x %08x" % (label, sel, base, limit, shown)
    else:
        line = "%-3s=%04x %08x %08x %08x" % (label, sel, base & 0xFFFFFFFF, limit, shown)
    if flags is None or not pe or not flags & DESC_P_MASK:
        return line + "\n"
    line += " DPL=%d " % ((flags >> DESC_DPL_SHIFT) & 3)
    if flags & DESC_S_MASK:
        if flags & DESC_CS_MASK:
            line += "CS64" if flags & DESC_L_MASK else ("CS32" if flags & DESC_B_MASK
                                                          else "CS16")
            line += " [%s%s" % ("C" if flags & DESC_C_MASK else "-",
                                "R" if flags & DESC_R_MASK else "-")
        else:
            line += "DS  " if flags & DESC_B_MASK or lma else "DS16"
            line += " [%s%s" % ("E" if flags & DESC_E_MASK else "-",
                                "W" if flags & DESC_W_MASK else "-")
        line += "%s]" % ("A" if flags & DESC_A_MASK else "-")
    else:
        line += _SYS_TYPES[1 if lma else 0][(flags >> DESC_TYPE_SHIFT) & 15]
    return line + "\n"


def register_dump(regs: Mapping[str, int]) -> str:
    """``info registers`` body for one CPU (x86_cpu_dump_state with CPU_DUMP_FPU)."""
    g = regs.get
    efer = g("efer", 0)
    lma = bool(efer & EFER_LMA)
    pe = bool(g("cr0", 0) & CR0_PE)
    cs_flags = g("cs_flags")
    cs64 = lma and (cs_flags is None or bool(cs_flags & DESC_L_MASK))
    fl = g("rflags", 2)
    flag_text = "".join(ch if fl & bit else "-" for ch, bit in
                        (("D", 0x400), ("O", 0x800), ("S", 0x80), ("Z", 0x40), ("A", 0x10),
                         ("P", 0x04), ("C", 0x01)))
    cpl = g("cpl", (g("cs", 0) & 3) if pe else 0)
    tail = "CPL=%d II=0 A20=%d SMM=0 HLT=%d\n" % (cpl, g("a20", 1), g("halted", 0))
    out: list[str] = []
    if cs64:
        names = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
                 "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"]
        cells = ["%-3s=%016x" % (n.upper(), g(n, 0)) for n in names]
        for row in range(4):
            out.append(" ".join(cells[row * 4:row * 4 + 4]) + "\n")
        out.append("RIP=%016x RFL=%08x [%s] " % (g("rip", 0), fl, flag_text) + tail)
    else:
        names = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp"]
        cells = ["E%s=%08x" % (n[1:].upper(), g(n, 0) & 0xFFFFFFFF) for n in names]
        out.append(" ".join(cells[:4]) + "\n" + " ".join(cells[4:]) + "\n")
        out.append("EIP=%08x EFL=%08x [%s] " % (g("rip", 0) & 0xFFFFFFFF, fl, flag_text) + tail)
    for label, key in (("ES", "es"), ("CS", "cs"), ("SS", "ss"), ("DS", "ds"), ("FS", "fs"),
                       ("GS", "gs"), ("LDT", "ldtr"), ("TR", "tr")):
        out.append(_seg_line(regs, label, key, cs64, lma, pe))
    if lma:
        out.append("GDT=     %016x %08x\n" % (g("gdtr_base", 0), g("gdtr_limit", 0xFFFF)))
        out.append("IDT=     %016x %08x\n" % (g("idtr_base", 0), g("idtr_limit", 0xFFFF)))
        out.append("CR0=%08x CR2=%016x CR3=%016x CR4=%08x\n" % (
            g("cr0", 0) & 0xFFFFFFFF, g("cr2", 0), g("cr3", 0), g("cr4", 0) & 0xFFFFFFFF))
    else:
        out.append("GDT=     %08x %08x\n" % (g("gdtr_base", 0) & 0xFFFFFFFF,
                                             g("gdtr_limit", 0xFFFF)))
        out.append("IDT=     %08x %08x\n" % (g("idtr_base", 0) & 0xFFFFFFFF,
                                             g("idtr_limit", 0xFFFF)))
        out.append("CR0=%08x CR2=%08x CR3=%08x CR4=%08x\n" % tuple(
            g(k, 0) & 0xFFFFFFFF for k in ("cr0", "cr2", "cr3", "cr4")))
    out.append("".join("DR%d=%016x " % (i, g(f"dr{i}", 0)) for i in range(4)) + "\n")
    out.append("DR6=%016x DR7=%016x\n" % (g("dr6", 0xFFFF0FF0), g("dr7", 0x400)))
    out.append("EFER=%016x\n" % efer)
    fpsw, top = g("fpsw", 0), (g("fpsw", 0) >> 11) & 7
    out.append("FCW=%04x FSW=%04x [ST=%d] FTW=%02x MXCSR=%08x\n" % (
        g("fpcw", 0x37F), fpsw, top, g("fptw", 0), g("mxcsr", 0x1F80)))
    for i in range(8):
        value = g(f"st{i}", 0)
        out.append("FPR%d=%016x %04x" % (i, value & ((1 << 64) - 1), (value >> 64) & 0xFFFF))
        out.append("\n" if i & 1 else " ")
    for i in range(16 if cs64 else 8):
        value = g(f"xmm{i}", 0)
        out.append("XMM%02d=%08x%08x%08x%08x" % (i, (value >> 96) & 0xFFFFFFFF,
                                                 (value >> 64) & 0xFFFFFFFF,
                                                 (value >> 32) & 0xFFFFFFFF,
                                                 value & 0xFFFFFFFF))
        out.append("\n" if i & 1 else " ")
    return "".join(out)
