"""A vCPU's registers as the monitor names them, in every CPU mode.

``info registers``, ``$reg`` expressions and ``x /i`` read one map with QEMU's names
(``rax`` … ``r15``, ``rip``, ``rflags``, ``cs`` and ``cs_base``/``cs_limit``/``cs_flags``,
``gdtr_base`` …, ``cr0`` … ``cr4``, ``efer``), whatever width the Unicorn engine was opened
with: a ``UC_MODE_32`` engine reports ``eax``/``eip``/``eflags`` only, so those fill the low
halves of the 64-bit names (see pyvm/cpu.py for the engine modes).

Segment caches: Unicorn does not expose the hidden part of a segment register, so the
base, limit and flags shown are those the selector loads today: ``selector << 4`` and a
64 KiB limit in real mode (target/i386/cpu.h ``cpu_x86_load_seg_cache`` in
``x86_cpu_reset_hold`` gives data segments 0x93 and CS 0x9b access bytes), and the
descriptor the selector names in the GDT in protected and long mode (Intel SDM Vol. 3,
3.4.5 "Segment Descriptors").  A guest that changed a descriptor after loading its
selector (or runs in unreal mode) sees the descriptor, not the stale cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from unicorn import x86_const as X

if TYPE_CHECKING:
    from pyvm.cpu import VCpu

GPR64 = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
SEGMENTS = ("es", "cs", "ss", "ds", "fs", "gs")
CR0_PE = 1
EFER_LMA = 1 << 10
# target/i386/cpu.h DESC_* bits as they sit in a descriptor's high dword
DESC_G_MASK = 1 << 23
# Real-mode access bytes (present, S, accessed; CS also code+readable), shifted into place.
REAL_DATA_FLAGS = 0x93 << 8
REAL_CODE_FLAGS = 0x9B << 8


def descriptor_fields(desc: int) -> tuple[int, int, int]:
    """(base, limit, flags) of an 8-byte segment descriptor; ``flags`` is the high dword
    without the base bits, as QEMU keeps it in ``SegmentCache.flags``."""
    base = ((desc >> 16) & 0xFFFFFF) | (((desc >> 56) & 0xFF) << 24)
    limit = (desc & 0xFFFF) | (((desc >> 48) & 0xF) << 16)
    hi = desc >> 32
    if hi & DESC_G_MASK:
        limit = (limit << 12) | 0xFFF
    return base, limit, hi & 0x00FFFF00


def _read(cpu: "VCpu", name: str) -> int:
    try:
        return cpu.get(name)
    except Exception:  # noqa: BLE001 - a register this engine mode does not report
        return 0


def _segment(cpu: "VCpu", selector: int, pe: bool, is_cs: bool,
             gdt: tuple[int, int]) -> tuple[int, int, int]:
    if not pe:
        return (selector << 4, 0xFFFF, REAL_CODE_FLAGS if is_cs else REAL_DATA_FLAGS)
    index = selector & ~7
    gdt_base, gdt_limit = gdt
    if index == 0 or selector & 4 or index + 7 > gdt_limit:
        return 0, 0, 0                  # null selector, LDT (not walked) or past the limit
    try:
        desc = int.from_bytes(cpu.read_linear(gdt_base + index, 8), "little")
    except ValueError:
        return 0, 0, 0
    return descriptor_fields(desc)


def monitor_registers(cpu: "VCpu") -> dict[str, int]:
    """The register map of :meth:`pyvm.qmp.vm_api.VmApi.cpu_registers` (run-loop thread)."""
    out: dict[str, int] = {}
    if cpu.wide:
        for name in GPR64:
            out[name] = _read(cpu, name)
        out["rip"] = _read(cpu, "rip")
        out["rflags"] = _read(cpu, "rflags")
    else:
        for name in GPR64[:8]:
            out[name] = _read(cpu, "e" + name[1:])
        out["rip"] = _read(cpu, "eip")
        out["rflags"] = _read(cpu, "eflags")
    for c in ("cr0", "cr2", "cr3", "cr4"):
        out[c] = _read(cpu, c)
    out["efer"] = cpu.efer
    pe = bool(out["cr0"] & CR0_PE)
    long_mode = bool(out["efer"] & EFER_LMA)
    _, gdt_base, gdt_limit, _ = cpu.uc.reg_read(X.UC_X86_REG_GDTR)
    _, idt_base, idt_limit, _ = cpu.uc.reg_read(X.UC_X86_REG_IDTR)
    out.update(gdtr_base=gdt_base, gdtr_limit=gdt_limit, idtr_base=idt_base,
               idtr_limit=idt_limit)
    for seg in SEGMENTS:
        sel = _read(cpu, seg) & 0xFFFF
        base, limit, flags = _segment(cpu, sel, pe, seg == "cs", (gdt_base, gdt_limit))
        if long_mode and seg in ("fs", "gs") and cpu.wide:
            base = _read(cpu, seg + "_base")       # MSR_FS_BASE / MSR_GS_BASE
        out[seg], out[seg + "_base"], out[seg + "_limit"], out[seg + "_flags"] = (
            sel, base, limit, flags)
    for name, rid in (("ldtr", X.UC_X86_REG_LDTR), ("tr", X.UC_X86_REG_TR)):
        sel, base, limit, flags = cpu.uc.reg_read(rid)
        out[name], out[name + "_base"], out[name + "_limit"], out[name + "_flags"] = (
            sel, base, limit, flags)
    out["mxcsr"] = _read(cpu, "mxcsr")
    out["fpcw"] = _read(cpu, "fpcw")
    out["fpsw"] = _read(cpu, "fpsw")
    for i in range(16 if cpu.wide else 8):
        out[f"xmm{i}"] = int(cpu.uc.reg_read(getattr(X, f"UC_X86_REG_XMM{i}")))
    out["halted"] = int(cpu.halted)
    return out

