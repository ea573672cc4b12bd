"""Native interrupt and exception delivery (pyvm/_delivery.pyx) against its Python twin
(``VCpu.deliver_python``): generated cases (mode and paging x vector x CPL x error code x
gate x IST x TSS x stack), each set up identically on two real Unicorn engines, one
delivered natively and one in Python; afterwards every byte of the saved CPU context,
every byte of RAM, the dirty bitmap and the outcome (a triple fault's message, a Unicorn
error) must be equal."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import unicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from unicorn import x86_const as X

from pyvm import native_delivery
from pyvm.cpu import VCpu
from pyvm.errors import GuestFault
from pyvm.ram import MemoryBackend, MemoryBackendConfig, RamBlock, RamLayout

pytestmark = pytest.mark.skipif(native_delivery.IMPLEMENTATION != "cython",
                                reason="native delivery not built (or PYVM_PURE_PYTHON)")

RAM = 4 << 20
GDT, IDT, TSS, TABLES = 0x500, 0x2000, 0x3000, 0x4000
# Descriptors (SDM Vol. 3, 3.4.5): 0x08 code32, 0x10 data, 0x18 code64, 0x20 user data,
# 0x28 user code32, 0x30 user code64, 0x38 data based at 0x10000, 0x40 the TSS.
DESCRIPTORS = (0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF, 0x00AF9A000000FFFF,
               0x00CFF2000000FFFF, 0x00CFFA000000FFFF, 0x00AFFA000000FFFF, 0x00CF92010000FFFF)
ERROR_VECTORS = (8, 10, 11, 12, 13, 14, 17, 21)

# mode, paging, wide engine
MODES = (("real", "none", False), ("protected", "none", False), ("protected", "pse", False),
         ("protected", "pae", False), ("long", "4level", True), ("long", "4level", False))


def _tss_descriptor(limit: int, wide: bool) -> bytes:
    lo = ((limit & 0xFFFF) | ((TSS & 0xFFFFFF) << 16) | (0x89 << 40)
          | (((limit >> 16) & 0xF) << 48) | (((TSS >> 24) & 0xFF) << 56))
    return struct.pack("<Q", lo) + (struct.pack("<Q", 0) if wide else b"")


def _make_cpu(wide: bool) -> VCpu:
    ram = RamLayout()
    ram.add(RamBlock("pc.ram", 0, MemoryBackend(
        MemoryBackendConfig("memory-backend-ram", "pc.ram", RAM, implicit=True))))
    return VCpu(0, ram, wide, lambda port, size: 0xFF, lambda port, size, value: None)


_PAIRS: dict[tuple[str, str, bool], tuple[VCpu, VCpu]] = {}


def _pair(mode: tuple[str, str, bool]) -> tuple[VCpu, VCpu]:
    if mode not in _PAIRS:
        _PAIRS[mode] = (_make_cpu(mode[2]), _make_cpu(mode[2]))
    return _PAIRS[mode]


@dataclass
class Case:
    mode: tuple[str, str, bool]
    vector: int
    error_code: int | None
    cpl: int
    gate: dict[str, int]            # the gate of ``vector``
    df_gate: dict[str, int] | None  # the #DF gate (None: not present)
    idt_limit: int
    tr_limit: int
    stacks: list[int]               # TSS words: RSP0/ESP0, IST1..7
    ss0: int
    sp: int
    ip: int
    flags: int
    compat: bool                    # long mode: interrupted code in a 32-bit segment
    real_cs: int
    real_ss: int
    ivt: bytes


# Stack pointers: mostly inside RAM (aligned or not), sometimes beyond what is mapped.
SP = st.one_of(st.integers(0x80000, 0x3F0000), st.integers(0x80000, 0x3F0000), st.sampled_from([0x0, 0x6, 0x100000, 0x3FFFFC,
                                                                 0x500000, 0x7FFFFFF0,
                                                                 0xFFFFFFF8]))
FLAGS = st.integers(0, 0xFFFFFFFF).map(lambda f: (f & 0x54FD5) | 0x2)   # no VM, IOPL, VIF, ID
GATE = st.fixed_dictionaries({
    "offset": st.integers(0, 0xFFFFFFFF),
    "offset_hi": st.sampled_from([0, 0xFFFFFFFF, 0x1234]),
    "selector": st.sampled_from([0x08, 0x08, 0x18, 0x18, 0x2B, 0x33, 0x0B]),
    "type": st.sampled_from([0xE] * 4 + [0xF] * 4 + [0x5, 0x6]),
    "present": st.sampled_from([1] * 9 + [0]),
    "ist": st.sampled_from([0, 0, 1, 2, 7]),
    "dpl": st.integers(0, 3),
})


@st.composite
def cases(draw: Any, mode: tuple[str, str, bool]) -> Case:
    long = mode[0] == "long"
    vector = draw(st.one_of(st.sampled_from(ERROR_VECTORS + (0, 3, 6, 0x20, 0x80)),
                            st.integers(0, 255)))
    return Case(
        mode=mode, vector=vector,
        error_code=draw(st.one_of(st.none(), st.integers(0, 0xFFFF),
                                  st.integers(0, (1 << 64) - 1))),
        cpl=0 if mode[0] == "real" else draw(st.sampled_from([0, 3])),
        gate=draw(GATE), df_gate=draw(st.one_of(st.none(), GATE, GATE, GATE)),
        idt_limit=draw(st.sampled_from([16 * 256 - 1 if long else 8 * 256 - 1] * 9
                                       + [0x3F, 0x10F, 0x7F])),
        tr_limit=draw(st.sampled_from([0x67, 0x67, 0x67, 0x20])),
        stacks=[draw(SP) for _ in range(8)], ss0=draw(st.sampled_from([0x10, 0x38])),
        sp=draw(SP), ip=draw(st.integers(0, 0xFFFFFFFF)), flags=draw(FLAGS),
        compat=draw(st.booleans()) if long else False,
        real_cs=draw(st.integers(0, 0xFFFF)), real_ss=draw(st.integers(0, 0xFFFF)),
        ivt=draw(st.binary(min_size=1024, max_size=1024)),
    )


def _gate_bytes(g: dict[str, int], long: bool) -> bytes:
    attrs = g["type"] | (g["dpl"] << 5) | (g["present"] << 7)
    off = g["offset"]
    if long:
        return struct.pack("<HHBBHII", off & 0xFFFF, g["selector"], g["ist"], attrs,
                           off >> 16, g["offset_hi"], 0)
    return struct.pack("<HHBBH", off & 0xFFFF, g["selector"], 0, attrs, off >> 16)


def _setup(cpu: VCpu, c: Case) -> None:
    """Put ``cpu`` (an engine of ``c.mode``) in the case's state; RAM and bitmap fresh."""
    mode, paging, wide = c.mode
    block = cpu.ram.blocks[0]
    block.mem[:] = 0
    block.mem[0x20000] = 0xF4           # a HLT for ip = 0x20001 to have just run
    uc = cpu.uc
    # Leave any previous privilege and mode: ring 0, paging off, real mode.
    cpu.exceptions.set_cpl(0)
    if cpu.cr0 & (1 << 31):
        cpu.set("cr0", cpu.cr0 & ~(1 << 31))
    uc.msr_write(0xC0000080, 0)
    cpu.set("cr4", 0)
    cpu.set("cr0", 0x10)
    for s in ("ds", "es", "fs", "gs"):
        cpu.set(s, 0)
    if mode == "real":
        block.mem[0x1000:0x1400] = np.frombuffer(c.ivt, dtype=np.uint8)
        uc.reg_write(X.UC_X86_REG_IDTR, (0, 0x1000, min(c.idt_limit, 0x3FF), 0))
        cpu.set("cs", c.real_cs)
        cpu.set("ss", c.real_ss)
        cpu.set("esp", c.sp)
        cpu.set("eip", c.ip & 0xFFFF)
        cpu.set("eflags", c.flags)
        block.dirty.fetch_and_clear()
        return
    long = mode == "long"
    gdt = b"".join(struct.pack("<Q", d) for d in DESCRIPTORS) + _tss_descriptor(c.tr_limit, long)
    block.mem[GDT:GDT + len(gdt)] = np.frombuffer(gdt, dtype=np.uint8)
    uc.reg_write(X.UC_X86_REG_GDTR, (0, GDT, len(gdt) - 1, 0))
    idt = bytearray(c.idt_limit + 1)
    size = 16 if long else 8
    for vec, g in ((c.vector, c.gate), (8, c.df_gate)):
        if g is not None and vec * size + size <= len(idt):
            idt[vec * size:vec * size + size] = _gate_bytes(g, long)
    block.mem[IDT:IDT + len(idt)] = np.frombuffer(bytes(idt), dtype=np.uint8)
    uc.reg_write(X.UC_X86_REG_IDTR, (0, IDT, c.idt_limit, 0))
    tss = bytearray(0x68)
    if long:
        struct.pack_into("<Q", tss, 4, c.stacks[0])
        for i in range(1, 8):
            struct.pack_into("<Q", tss, 36 + 8 * (i - 1), c.stacks[i])
    else:
        struct.pack_into("<II", tss, 4, c.stacks[0] & 0xFFFFFFFF, c.ss0)
    block.mem[TSS:TSS + len(tss)] = np.frombuffer(bytes(tss), dtype=np.uint8)
    if paging == "pse":         # one 4 MiB page (CR4.PSE), user-accessible
        block.mem[TABLES:TABLES + 4] = np.frombuffer(struct.pack("<I", 0x87), dtype=np.uint8)
        cr3, cr4 = TABLES, 1 << 4
    elif paging in ("pae", "4level"):   # two 2 MiB pages
        pd = struct.pack("<QQ", 0x87, (1 << 21) | 0x87)
        if paging == "pae":
            top = struct.pack("<Q", (TABLES + 0x1000) | 0x1)
        else:
            top = struct.pack("<Q", (TABLES + 0x2000) | 0x7)
            block.mem[TABLES + 0x2000:TABLES + 0x2008] = np.frombuffer(
                struct.pack("<Q", (TABLES + 0x1000) | 0x7), dtype=np.uint8)
        block.mem[TABLES:TABLES + 8] = np.frombuffer(top, dtype=np.uint8)
        block.mem[TABLES + 0x1000:TABLES + 0x1010] = np.frombuffer(pd, dtype=np.uint8)
        cr3, cr4 = TABLES, 1 << 5
    else:
        cr3 = cr4 = 0
    cpu.set("cr3", cr3)
    cpu.set("cr4", cr4)
    if long:
        uc.msr_write(0xC0000080, 1 << 8)               # LME
    cpu.set("cr0", 0x11 | ((1 << 31) if cr3 else 0))
    uc.reg_write(X.UC_X86_REG_TR, (0x40, TSS, c.tr_limit, 0x8B00))
    code = 0x18 if long and not c.compat else 0x08
    cpu.set("cs", code)
    cpu.set("ss", 0x10)
    if c.cpl:
        cpu.exceptions.set_cpl(3)
        cpu.set("ss", 0x23)
        cpu.set("cs", 0x33 if long and not c.compat else 0x2B)
    w = wide
    cpu.set("rsp" if w else "esp", c.sp | ((0x7FFF << 48) if w and c.sp & 1 else 0))
    cpu.set("rip" if w else "eip", c.ip)
    cpu.set("rflags" if w else "eflags", c.flags)
    block.dirty.fetch_and_clear()


def _deliver(cpu: VCpu, c: Case, native: bool) -> tuple[str, Any]:
    try:
        if native:
            cpu.deliver(c.vector, c.error_code)
        else:
            cpu.deliver_python(c.vector, c.error_code)
    except GuestFault as err:
        return "fault", str(err)
    except unicorn.UcError as err:
        return "ucerror", err.errno
    return "ok", None


def _context(cpu: VCpu) -> bytes:
    """The CPU state in the engine's saved context: from its first calibrated field (the
    bytes before it are Unicorn's uc_context header, which differs between engines)."""
    start = min(f.offset for f in cpu.internals.layout.fields.values())
    return bytes(cpu.internals._ctx.save()[start:])


def _check(mode: tuple[str, str, bool], c: Case) -> None:
    py_cpu, c_cpu = _pair(mode)
    assert c_cpu.native_delivery is not None
    _setup(py_cpu, c)
    _setup(c_cpu, c)
    assert _context(py_cpu) == _context(c_cpu), "the two engines start from different states"
    # The HLT check the run loop makes after a run, and EFLAGS.IF, before and after.
    assert c_cpu.stopped_at_hlt() == py_cpu.stopped_at_hlt_python()
    assert c_cpu.interrupts_enabled() == bool(py_cpu.get("eflags") & 0x200)
    got_py = _deliver(py_cpu, c, native=False)
    got_c = _deliver(c_cpu, c, native=True)
    assert got_c == got_py
    ctx_py, ctx_c = _context(py_cpu), _context(c_cpu)
    if ctx_py != ctx_c:
        diff = [i for i in range(len(ctx_py)) if ctx_py[i] != ctx_c[i]]
        fields = {f.name: f.offset for f in py_cpu.internals.layout.fields.values()}
        pytest.fail(f"CPU contexts differ at offsets {diff[:16]} (fields {fields})")
    assert py_cpu.registers() == c_cpu.registers()
    assert c_cpu.stopped_at_hlt() == py_cpu.stopped_at_hlt_python()
    assert c_cpu.interrupts_enabled() == bool(py_cpu.get("eflags") & 0x200)
    assert py_cpu.exceptions.cpl() == c_cpu.exceptions.cpl()
    a, b = py_cpu.ram.blocks[0], c_cpu.ram.blocks[0]
    if not np.array_equal(a.mem, b.mem):
        where = np.flatnonzero(a.mem != b.mem)
        pytest.fail(f"RAM differs at {[hex(int(x)) for x in where[:8]]}")
    assert np.array_equal(a.dirty.words, b.dirty.words)


@pytest.mark.parametrize("mode", MODES, ids=["-".join(str(x) for x in m) for m in MODES])
def test_native_delivery_matches_python(mode: tuple[str, str, bool]) -> None:
    @settings(max_examples=150, deadline=None, derandomize=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(cases(mode))
    def run(c: Case) -> None:
        _check(mode, c)
    run()


def test_cases_reach_every_outcome() -> None:
    """The generator is not vacuous: delivered frames, stack switches and triple faults."""
    seen: set[str] = set()
    mode = ("long", "4level", True)
    py_cpu = _make_cpu(True)            # not the pair's: their states must stay in step
    base = dict(mode=mode, error_code=0x10, gate={"offset": 0x1000, "offset_hi": 0,
                "selector": 0x18, "type": 0xE, "present": 1, "ist": 0, "dpl": 0},
                idt_limit=0xFFF, tr_limit=0x67, stacks=[0x90000] * 8, ss0=0x10, sp=0x80000,
                ip=0x5000, flags=0x202, compat=False, real_cs=0, real_ss=0, ivt=b"\0" * 1024)
    ok = Case(vector=14, cpl=3, df_gate=None, **base)  # type: ignore[arg-type]
    _setup(py_cpu, ok)
    assert _deliver(py_cpu, ok, native=True) == ("ok", None)
    assert py_cpu.get("rsp") == 0x90000 - 48 and py_cpu.exceptions.cpl() == 0
    seen.add("ring switch")
    bad = Case(vector=0x40, cpl=0, df_gate=None, **{**base, "idt_limit": 0x3F})  # type: ignore[arg-type]
    _setup(py_cpu, bad)
    status, msg = _deliver(py_cpu, bad, native=True)
    assert status == "fault" and "triple fault while delivering vector 0x8" in msg
    seen.add("triple fault")
    assert seen == {"ring switch", "triple fault"}
