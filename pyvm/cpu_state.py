"""The migratable state of one vCPU: the ``cpu`` section, and how it is read and applied.

Everything a guest can observe is carried (QEMU carries the same in ``vmstate_x86_cpu``,
target/i386/machine.c; the layout here is pyvm's own, described by the vmdesc):

- general registers, RIP, RFLAGS;
- the full segment caches of ES, CS, SS, DS, FS, GS, LDTR and TR (selector, base, limit,
  flags: QEMU's ``SegmentCache``, ``vmstate_segment``) and GDTR/IDTR;
- CR0, CR2, CR3, CR4, CR8, EFER, and QEMU's ``hflags`` (the CPL in bits 0-1, the
  interrupt shadow, the CS/SS default sizes);
- STAR, LSTAR, CSTAR, SFMASK, KERNEL_GS_BASE, SYSENTER_CS/ESP/EIP, PAT, TSC_AUX;
- the guest's TSC at save time (the destination offsets its TSC to continue from it);
- the x87 registers (physical order), control/status (with TOP)/tag words, MXCSR, XMM;
- DR0-DR7; the halted flag and an exception taken but not yet delivered.

Read and written through Unicorn's register API, in one batch call that keeps the
interpreter lock (:mod:`pyvm.cpu_regs_batch`: a migration saves the vCPUs in its
downtime), except the hidden part of the six
segment registers, ``hflags``, the TSC offset, EFER.LMA (WRMSR cannot clear it) and, on a
32-bit engine, the upper halves of the GPRs and RIP, R8-R15 and XMM8-15, which only
:mod:`pyvm.unicorn_internals` reaches.  Loading applies the public registers first and the
context fields last, so that Unicorn's own segment reload (which refuses a null SS in
protected mode) never runs; it then reads every field back and names the first one that
did not take.  The A20 gate lives in the ``port92`` section.
"""

from __future__ import annotations

import weakref
from typing import Any, Protocol

import unicorn as uc_mod
from unicorn import x86_const as X

from pyvm.cpu_regs_batch import FP80, MMR, MSR, XMM, Reg, RegisterBatch
from pyvm.unicorn_internals import ContextAccess, host_ticks
from pyvm.vmstate import Field, VMStateDescription


class VCpu(Protocol):
    """What saving and loading need of a vCPU (:class:`pyvm.cpu.VCpu`; named here so that
    this module does not import the CPU module that imports it)."""

    index: int
    wide: bool
    halted: bool
    pending_exception: int | None
    uc: Any
    internals: ContextAccess

    def get(self, name: str) -> int: ...

    def set(self, name: str, value: int) -> None: ...

MSR_EFER = 0xC0000080
EFER_LMA = 1 << 10
CR0_PG = 1 << 31

GPR64 = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
GPR32 = ("eax", "ebx", "ecx", "edx", "esi", "edi", "ebp", "esp")
# Segment order in the section: QEMU's R_ES..R_GS, then LDTR and TR.
SEGMENTS = ("es", "cs", "ss", "ds", "fs", "gs")
SYSTEM_SEGMENTS = ("ldtr", "tr")
# (attribute, MSR index): Intel SDM Vol. 4, table 2-2; AMD APM Vol. 2 (CSTAR).
MSRS = (
    ("star", 0xC0000081), ("lstar", 0xC0000082), ("cstar", 0xC0000083),
    ("fmask", 0xC0000084), ("kernel_gs_base", 0xC0000102),
    ("sysenter_cs", 0x174), ("sysenter_esp", 0x175), ("sysenter_eip", 0x176),
    ("pat", 0x277), ("tsc_aux", 0xC0000103),
)
NO_EXCEPTION = -1

CPU_VMSD = VMStateDescription(
    name="cpu", version_id=2, minimum_version_id=2,
    fields=(
        Field("regs", "uint64", count=16),
        Field("rip", "uint64"),
        Field("rflags", "uint64"),
        Field("seg_selector", "uint32", count=8),   # es cs ss ds fs gs ldtr tr
        Field("seg_base", "uint64", count=8),
        Field("seg_limit", "uint32", count=8),
        Field("seg_flags", "uint32", count=8),
        Field("gdt_base", "uint64"), Field("gdt_limit", "uint32"),
        Field("idt_base", "uint64"), Field("idt_limit", "uint32"),
        Field("cr", "uint64", count=5),             # cr0, cr2, cr3, cr4, cr8
        Field("efer", "uint64"),
        Field("hflags", "uint32"),
        Field("cpl", "uint8"),                      # hflags & 3, for readers of the stream
        *(Field(name, "uint64") for name, _ in MSRS),
        Field("tsc", "uint64"),
        Field("fpregs", "buffer", size=8 * 10),     # FP0-7: 64-bit mantissa, 16-bit sign+exp
        Field("fpcw", "uint16"), Field("fpsw", "uint16"), Field("fptag", "uint16"),
        Field("mxcsr", "uint32"),
        Field("xmm", "buffer", size=16 * 16),
        Field("dr", "uint64", count=8),
        Field("halted", "uint32"),
        Field("pending_exception", "int32"),        # -1: none
        Field("wide", "bool"),                      # 64-bit engine (ELF64 boot)
    ),
)


class CpuStateError(ValueError):
    """A saved CPU state that this vCPU cannot take; ``str()`` names the field."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"field '{field}': {reason}")
        self.field = field


class CpuState:
    """The migratable view of a vCPU: the ``cpu`` vmsd's attributes (one per vCPU)."""

    idstr = "cpu"
    vmsd = CPU_VMSD

    def __init__(self, cpu: VCpu) -> None:
        self.cpu = cpu
        self.instance_id = cpu.index
        self.regs = [0] * 16
        self.rip = self.rflags = 0
        self.seg_selector = [0] * 8
        self.seg_base = [0] * 8
        self.seg_limit = [0] * 8
        self.seg_flags = [0] * 8
        self.gdt_base = self.gdt_limit = self.idt_base = self.idt_limit = 0
        self.cr = [0] * 5
        self.efer = self.hflags = self.cpl = 0
        for name, _ in MSRS:
            setattr(self, name, 0)
        self.tsc = 0
        self.fpregs = bytes(80)
        self.fpcw = self.fpsw = self.fptag = 0
        self.mxcsr = 0
        self.xmm = bytes(256)
        self.dr = [0] * 8
        self.halted = 0
        self.pending_exception = NO_EXCEPTION
        self.wide = False

    def pre_save(self) -> None:
        save_cpu(self.cpu, self)

    def post_load(self) -> None:
        load_cpu(self.cpu, self)

    def values(self) -> dict[str, Any]:
        """Every field by name (for comparisons and reports)."""
        return {f.name: getattr(self, f.name) for f in CPU_VMSD.fields}


# -- reading --------------------------------------------------------------------------------------
# What a 32-bit engine's register API cannot reach (pyvm/unicorn_internals.py).
_NARROW_HIDDEN = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
                  "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip",
                  *(f"xmm{i}" for i in range(8, 16))]


_HIDDEN_SEGMENTS = [f"{s}.{p}" for s in SEGMENTS for p in ("selector", "base", "limit", "flags")]


def _public_registers(wide: bool) -> list[Reg]:
    """What :func:`save_cpu` reads through Unicorn's register API, in one batch."""
    regs = ([Reg(n) for n in GPR64] + [Reg("rip"), Reg("rflags")]) if wide else [Reg("eflags")]
    regs += [Reg(n, MMR) for n in ("ldtr", "tr", "gdtr", "idtr")]
    regs += [Reg(n) for n in ("cr0", "cr2", "cr3", "cr4")] + ([Reg("cr8")] if wide else [])
    regs += [Reg("efer", MSR, MSR_EFER)] + [Reg(n, MSR, index) for n, index in MSRS]
    regs += [Reg(f"fp{i}", FP80) for i in range(8)]
    regs += [Reg(n) for n in ("fpcw", "fpsw", "fptag", "mxcsr")]
    regs += [Reg(f"xmm{i}", XMM) for i in range(16 if wide else 8)]   # XMM8-15: 64-bit only
    regs += [Reg(f"dr{i}") for i in range(8)]
    return regs


_BATCHES: "weakref.WeakKeyDictionary[Any, RegisterBatch]" = weakref.WeakKeyDictionary()


def _batch(cpu: VCpu) -> RegisterBatch:
    """The vCPU's read batch, built once per engine."""
    batch = _BATCHES.get(cpu.uc)
    if batch is None:
        batch = _BATCHES[cpu.uc] = RegisterBatch(cpu.uc, _public_registers(cpu.wide))
    return batch


def save_cpu(cpu: VCpu, st: CpuState, with_tsc: bool = True) -> None:
    """Copy the live vCPU into ``st``: one batch of register reads and one context save,
    both native calls that keep the interpreter lock (:mod:`pyvm.cpu_regs_batch`), so a
    save beside a busy Python thread takes as long as alone.  On the vCPU thread only."""
    hidden = cpu.internals.read_many(
        _HIDDEN_SEGMENTS + ["hflags", "tsc_offset"] + ([] if cpu.wide else _NARROW_HIDDEN))
    reg = _batch(cpu).read()
    if cpu.wide:
        st.regs = [reg[n] for n in GPR64]
        st.rip, st.rflags = reg["rip"], reg["rflags"]
    else:
        # A 32-bit engine may run long mode: its API shows only EAX..ESP and EIP.
        st.regs = [hidden[n] for n in GPR64]
        st.rip, st.rflags = hidden["rip"], reg["eflags"]
    sel = [hidden[f"{s}.selector"] for s in SEGMENTS]
    base = [hidden[f"{s}.base"] for s in SEGMENTS]
    limit = [hidden[f"{s}.limit"] for s in SEGMENTS]
    flags = [hidden[f"{s}.flags"] for s in SEGMENTS]
    for name in SYSTEM_SEGMENTS:                     # public: uc_x86_mmr carries all four
        s, b, lim, fl = reg[name]
        sel.append(s)
        base.append(b)
        limit.append(lim)
        flags.append(fl)
    st.seg_selector, st.seg_base, st.seg_limit, st.seg_flags = sel, base, limit, flags
    _, st.gdt_base, st.gdt_limit, _ = reg["gdtr"]
    _, st.idt_base, st.idt_limit, _ = reg["idtr"]
    st.cr = [reg["cr0"], reg["cr2"], reg["cr3"], reg["cr4"],
             reg["cr8"] if cpu.wide else 0]            # a 32-bit engine has no CR8 id
    st.efer = reg["efer"]
    st.hflags = hidden["hflags"]
    st.cpl = st.hflags & 3
    for name, _ in MSRS:
        setattr(st, name, reg[name])
    st.tsc = (host_ticks() + hidden["tsc_offset"]) & 0xFFFFFFFFFFFFFFFF if with_tsc else 0
    st.fpregs = b"".join(reg[f"fp{i}"] for i in range(8))
    st.fpcw, st.fpsw, st.fptag = reg["fpcw"], reg["fpsw"], reg["fptag"]
    st.mxcsr = reg["mxcsr"]
    st.xmm = b"".join(reg[f"xmm{i}"] if i < 8 or cpu.wide
                      else hidden[f"xmm{i}"].to_bytes(16, "little") for i in range(16))
    st.dr = [reg[f"dr{i}"] for i in range(8)]
    st.halted = int(cpu.halted)
    st.pending_exception = NO_EXCEPTION if cpu.pending_exception is None else cpu.pending_exception
    st.wide = cpu.wide


def save_cpu_per_register(cpu: VCpu, st: CpuState, with_tsc: bool = True) -> None:
    """:func:`save_cpu` one register at a time through Unicorn's binding (each call lets
    go of the interpreter lock): the reference the batch is tested and timed against."""
    uc = cpu.uc
    hidden = cpu.internals.read_many(_HIDDEN_SEGMENTS + ["hflags"]
                                     + ([] if cpu.wide else _NARROW_HIDDEN))
    if cpu.wide:
        st.regs = [cpu.get(n) for n in GPR64]
        st.rip, st.rflags = cpu.get("rip"), cpu.get("rflags")
    else:
        st.regs = [hidden[n] for n in GPR64]
        st.rip, st.rflags = hidden["rip"], cpu.get("eflags")
    sel = [hidden[f"{s}.selector"] for s in SEGMENTS]
    base = [hidden[f"{s}.base"] for s in SEGMENTS]
    limit = [hidden[f"{s}.limit"] for s in SEGMENTS]
    flags = [hidden[f"{s}.flags"] for s in SEGMENTS]
    for name in SYSTEM_SEGMENTS:
        s, b, lim, fl = uc.reg_read(getattr(X, "UC_X86_REG_" + name.upper()))
        sel.append(s)
        base.append(b)
        limit.append(lim)
        flags.append(fl)
    st.seg_selector, st.seg_base, st.seg_limit, st.seg_flags = sel, base, limit, flags
    _, st.gdt_base, st.gdt_limit, _ = uc.reg_read(X.UC_X86_REG_GDTR)
    _, st.idt_base, st.idt_limit, _ = uc.reg_read(X.UC_X86_REG_IDTR)
    st.cr = [cpu.get("cr0"), cpu.get("cr2"), cpu.get("cr3"), cpu.get("cr4"),
             cpu.get("cr8") if cpu.wide else 0]
    st.efer = uc.msr_read(MSR_EFER)
    st.hflags = hidden["hflags"]
    st.cpl = st.hflags & 3
    for name, index in MSRS:
        setattr(st, name, uc.msr_read(index))
    st.tsc = cpu.internals.read_tsc() if with_tsc else 0
    st.fpregs = b"".join(
        _fp80(uc.reg_read(getattr(X, f"UC_X86_REG_FP{i}"))) for i in range(8))
    st.fpcw, st.fpsw, st.fptag = cpu.get("fpcw"), cpu.get("fpsw"), cpu.get("fptag")
    st.mxcsr = cpu.get("mxcsr")
    st.xmm = b"".join(int(uc.reg_read(getattr(X, f"UC_X86_REG_XMM{i}")) if i < 8 or cpu.wide
                          else hidden[f"xmm{i}"]).to_bytes(16, "little") for i in range(16))
    st.dr = [cpu.get(f"dr{i}") for i in range(8)]
    st.halted = int(cpu.halted)
    st.pending_exception = NO_EXCEPTION if cpu.pending_exception is None else cpu.pending_exception
    st.wide = cpu.wide


def _fp80(value: Any) -> bytes:
    mantissa, exponent = value
    return int(mantissa).to_bytes(8, "little") + int(exponent).to_bytes(2, "little")


# -- applying -------------------------------------------------------------------------------------
def _put(field: str, write: Any, *args: Any) -> None:
    try:
        write(*args)
    except uc_mod.UcError as err:
        raise CpuStateError(field, f"Unicorn refused it ({err})") from err


def _check_ranges(cpu: VCpu, st: CpuState) -> None:
    if bool(st.wide) != cpu.wide:
        raise CpuStateError("wide", "vCPU register width differs: start both VMs with the "
                            "same boot options")
    if not NO_EXCEPTION <= st.pending_exception <= 255:
        raise CpuStateError("pending_exception", f"{st.pending_exception} is not a vector")
    if st.cpl != st.hflags & 3:
        raise CpuStateError("cpl", f"{st.cpl} disagrees with the CPL in hflags ({st.hflags & 3})")
    names = SEGMENTS + SYSTEM_SEGMENTS
    for i, name in enumerate(names):
        if st.seg_selector[i] > 0xFFFF:
            raise CpuStateError(f"seg_selector[{i}]", f"{name} selector {st.seg_selector[i]:#x} "
                                "is wider than 16 bits")
    if not cpu.wide and st.rflags >> 32:
        raise CpuStateError("rflags", f"{st.rflags:#x} does not fit a 32-bit vCPU")


def _load_registers(wide: bool) -> list[Reg]:
    """What :func:`load_cpu` writes through Unicorn's register API, in this order: EFER and
    CR4 while paging is off, then CR3, CR0 (LMA follows CR0.PG again), the rest."""
    regs = [Reg("efer", MSR, MSR_EFER), Reg("cr4"), Reg("cr3"), Reg("cr0"), Reg("cr2")]
    regs += [Reg("cr8")] if wide else []
    regs += [Reg(n, MSR, index) for n, index in MSRS]
    regs += [Reg(n, MMR) for n in ("gdtr", "idtr", "ldtr", "tr")]
    regs += ([Reg(n) for n in GPR64] + [Reg("rip")]) if wide else []
    regs += [Reg("rflags" if wide else "eflags")]
    regs += [Reg(f"fp{i}", FP80) for i in range(8)]
    regs += [Reg(n) for n in ("fpcw", "fpsw", "fptag", "mxcsr")]
    regs += [Reg(f"xmm{i}", XMM) for i in range(16 if wide else 8)]
    regs += [Reg(f"dr{i}") for i in range(8)]
    return regs


_LOAD_BATCHES: "weakref.WeakKeyDictionary[Any, tuple[RegisterBatch, RegisterBatch]]" = \
    weakref.WeakKeyDictionary()


def _load_batches(cpu: VCpu) -> tuple[RegisterBatch, RegisterBatch]:
    """(CR0 alone, everything :func:`load_cpu` writes), built once per engine."""
    got = _LOAD_BATCHES.get(cpu.uc)
    if got is None:
        got = _LOAD_BATCHES[cpu.uc] = (RegisterBatch(cpu.uc, [Reg("cr0")]),
                                       RegisterBatch(cpu.uc, _load_registers(cpu.wide)))
    return got


def load_cpu(cpu: VCpu, st: CpuState) -> None:
    """Apply ``st`` to the vCPU (after RAM is loaded); CpuStateError names what failed.

    The public registers go in one batch that keeps the interpreter lock
    (:mod:`pyvm.cpu_regs_batch`); when Unicorn refuses one, they are written again one
    at a time to name it."""
    _check_ranges(cpu, st)
    cr0, cr2, cr3, cr4, cr8 = st.cr
    if not cpu.wide and cr8:
        raise CpuStateError("cr[4]", "CR8 is not 0 but a 32-bit vCPU has none")
    cr0_batch, batch = _load_batches(cpu)
    values: dict[str, Any] = {
        "efer": st.efer & ~EFER_LMA, "cr4": cr4, "cr3": cr3, "cr0": cr0, "cr2": cr2, "cr8": cr8,
        "gdtr": (0, st.gdt_base, st.gdt_limit, 0), "idtr": (0, st.idt_base, st.idt_limit, 0),
        "rip": st.rip, "rflags": st.rflags, "eflags": st.rflags,
        "fpcw": st.fpcw, "fpsw": st.fpsw, "fptag": st.fptag, "mxcsr": st.mxcsr,
    }
    values.update((name, getattr(st, name)) for name, _ in MSRS)
    for i, name in enumerate(SYSTEM_SEGMENTS, start=len(SEGMENTS)):
        values[name] = (st.seg_selector[i], st.seg_base[i], st.seg_limit[i], st.seg_flags[i])
    values.update(zip(GPR64, st.regs))
    values.update((f"fp{i}", st.fpregs[10 * i:10 * i + 10]) for i in range(8))
    values.update((f"xmm{i}", st.xmm[16 * i:16 * i + 16]) for i in range(16))
    values.update((f"dr{i}", st.dr[i]) for i in range(8))
    try:
        # Leave paging first so that EFER and CR4 may change.
        now = cr0_batch.read()["cr0"]
        if now & CR0_PG:
            cr0_batch.write({"cr0": now & ~CR0_PG})
        batch.write(values)
    except uc_mod.UcError:
        _load_registers_one_by_one(cpu, st)         # raises CpuStateError naming the field
    _load_context(cpu, st)


def _load_registers_one_by_one(cpu: VCpu, st: CpuState) -> None:
    """The public registers one call at a time: finds the one Unicorn refuses."""
    uc = cpu.uc
    cr0, cr2, cr3, cr4, cr8 = st.cr
    # Leave paging first so that EFER and CR4 may change; LMA follows CR0.PG again.
    if cpu.get("cr0") & CR0_PG:
        _put("cr[0]", cpu.set, "cr0", cpu.get("cr0") & ~CR0_PG)
    _put("efer", uc.msr_write, MSR_EFER, st.efer & ~EFER_LMA)
    _put("cr[3]", cpu.set, "cr4", cr4)
    _put("cr[2]", cpu.set, "cr3", cr3)
    _put("cr[0]", cpu.set, "cr0", cr0)
    _put("cr[1]", cpu.set, "cr2", cr2)
    if cpu.wide:
        _put("cr[4]", cpu.set, "cr8", cr8)
    elif cr8:
        raise CpuStateError("cr[4]", "CR8 is not 0 but a 32-bit vCPU has none")
    for name, index in MSRS:
        _put(name, uc.msr_write, index, getattr(st, name))
    _put("gdt_base", uc.reg_write, X.UC_X86_REG_GDTR, (0, st.gdt_base, st.gdt_limit, 0))
    _put("idt_base", uc.reg_write, X.UC_X86_REG_IDTR, (0, st.idt_base, st.idt_limit, 0))
    for i, name in enumerate(SYSTEM_SEGMENTS, start=len(SEGMENTS)):
        _put(f"seg_selector[{i}]", uc.reg_write, getattr(X, "UC_X86_REG_" + name.upper()),
             (st.seg_selector[i], st.seg_base[i], st.seg_limit[i], st.seg_flags[i]))
    if cpu.wide:
        for i, name in enumerate(GPR64):
            _put(f"regs[{i}]", cpu.set, name, st.regs[i])
        _put("rip", cpu.set, "rip", st.rip)
    _put("rflags", cpu.set, "rflags" if cpu.wide else "eflags", st.rflags)
    for i in range(8):
        raw = st.fpregs[10 * i:10 * i + 10]
        _put("fpregs", uc.reg_write, getattr(X, f"UC_X86_REG_FP{i}"),
             (int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")))
    _put("fpcw", cpu.set, "fpcw", st.fpcw)
    _put("fpsw", cpu.set, "fpsw", st.fpsw)
    _put("fptag", cpu.set, "fptag", st.fptag)
    _put("mxcsr", cpu.set, "mxcsr", st.mxcsr)
    for i in range(16 if cpu.wide else 8):
        _put("xmm", uc.reg_write, getattr(X, f"UC_X86_REG_XMM{i}"),
             int.from_bytes(st.xmm[16 * i:16 * i + 16], "little"))
    for i in range(8):
        _put(f"dr[{i}]", cpu.set, f"dr{i}", st.dr[i])


def _load_context(cpu: VCpu, st: CpuState) -> None:
    """Last: the hidden segment state and hflags, exactly as saved (no descriptor reload),
    the TSC, then everything read back."""
    hidden: dict[str, int] = {"hflags": st.hflags, "efer": st.efer}
    if not cpu.wide:
        hidden.update(zip(GPR64, st.regs))
        hidden["rip"] = st.rip
        hidden.update((f"xmm{i}", int.from_bytes(st.xmm[16 * i:16 * i + 16], "little"))
                      for i in range(8, 16))
    for i, s in enumerate(SEGMENTS):
        hidden[f"{s}.selector"] = st.seg_selector[i]
        hidden[f"{s}.base"] = st.seg_base[i]
        hidden[f"{s}.limit"] = st.seg_limit[i]
        hidden[f"{s}.flags"] = st.seg_flags[i]
    cpu.internals.write_many(hidden)
    cpu.internals.write_tsc(st.tsc)
    cpu.halted = bool(st.halted)
    cpu.pending_exception = None if st.pending_exception == NO_EXCEPTION else st.pending_exception
    _verify(cpu, st)


def _verify(cpu: VCpu, st: CpuState) -> None:
    """Read everything back: a field Unicorn did not take exactly is an error that names it."""
    now = CpuState(cpu)
    save_cpu(cpu, now, with_tsc=False)
    want, got = st.values(), now.values()
    for f in CPU_VMSD.fields:
        if f.name == "tsc":
            continue
        a, b = want[f.name], got[f.name]
        if a == b:
            continue
        if isinstance(a, list):
            i = next(k for k, (x, y) in enumerate(zip(a, b)) if x != y)
            raise CpuStateError(f"{f.name}[{i}]", f"saved {a[i]:#x}, the vCPU holds {b[i]:#x} "
                                "after loading it")
        if isinstance(a, bytes):
            i = next(k for k, (x, y) in enumerate(zip(a, b)) if x != y)
            raise CpuStateError(f.name, f"differs from byte {i} on after loading it")
        raise CpuStateError(f.name, f"saved {int(a):#x}, the vCPU holds {int(b):#x} after "
                            "loading it")
