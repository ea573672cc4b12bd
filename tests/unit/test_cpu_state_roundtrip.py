"""Random CPU states saved and reloaded through the real vmstate codec: every register
Unicorn exposes and every calibrated context field comes back exactly."""

from __future__ import annotations

from typing import Any, Iterator

import pytest
import unicorn as U
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from unicorn import x86_const as X

from pyvm.cpu import VCpu
from pyvm.cpu_state import CPU_VMSD, MSRS, SEGMENTS, CpuState, CpuStateError, save_cpu
from pyvm.migration.stream.reader import StreamReader
from pyvm.migration.stream.writer import StreamWriter
from pyvm.migration.stream.vmstate_codec import apply_loaded, load_vmstate, save_vmstate
from pyvm.ram import RamLayout
from tests.stream_in_memory import run_to_completion, writer_bytes

U64 = st.integers(0, (1 << 64) - 1)
U32 = st.integers(0, (1 << 32) - 1)
U16 = st.integers(0, 0xFFFF)
# Register ids that are not plain reads (they take an argument or name no register).
SKIP_IDS = {"UC_X86_REG_INVALID", "UC_X86_REG_ENDING", "UC_X86_REG_MSR"}


def _vcpu(wide: bool) -> VCpu:
    return VCpu(0, RamLayout(), wide, lambda p, s: 0, lambda p, s, v: None)


@pytest.fixture(scope="module")
def pairs() -> Iterator[dict[bool, tuple[VCpu, VCpu]]]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UC_IGNORE_REG_BREAK", "1")   # silence Unicorn's notes on no-op register ids
        yield {w: (_vcpu(w), _vcpu(w)) for w in (False, True)}


@st.composite
def cpu_states(draw: Any, wide: bool) -> dict[str, Any]:
    word = U64 if wide else U32
    mode = draw(st.sampled_from(["real", "protected", "long"] if wide else ["real", "protected"]))
    cr0 = {"real": 0x10, "protected": 0x11, "long": 0x80000011}[mode]
    cr0 |= draw(st.integers(0, 7)) << 1 | draw(st.sampled_from([0, 1 << 16, 1 << 18, 1 << 5]))
    return {
        "mode": mode, "cr0": cr0,
        "cr2": draw(word), "cr3": draw(U32) & ~0xFFF, "cr8": draw(st.integers(0, 15)),
        # full 64-bit values on a 32-bit engine too (it may run long mode)
        "regs": draw(st.lists(U64, min_size=16, max_size=16)),
        "rip": draw(U64), "rflags": 0x2 | draw(st.sampled_from([0, 0x200, 0x4D5, 0x3200, 0x40200])),
        "segs": draw(st.lists(st.tuples(U16, U64 if wide else U32, U32, U32), min_size=6, max_size=6)),
        "sys": draw(st.lists(st.tuples(U16, U32, U32, U32), min_size=2, max_size=2)),
        "gdt": (draw(U32), draw(U16)), "idt": (draw(U32), draw(U16)),
        "cpl": draw(st.integers(0, 3)), "shadow": draw(st.booleans()),
        "msrs": [draw(U16) if n == "sysenter_cs" else draw(U64) for n, _ in MSRS],
        "fp": draw(st.lists(st.tuples(U64, U16), min_size=8, max_size=8)),
        "fpcw": draw(U16) & 0x1F7F, "fpsw": draw(U16), "fptag": draw(U16),
        "mxcsr": draw(st.integers(0, 0xFFFF)),
        "xmm": draw(st.lists(st.integers(0, (1 << 128) - 1), min_size=16, max_size=16)),
        "dr": draw(st.lists(word, min_size=4, max_size=4)),
        "dr6": 0xFFFF0FF0 | draw(st.integers(0, 15)), "dr7": 0x400 | draw(st.integers(0, 0xFF)),
        "tsc": draw(st.integers(0, 1 << 62)),
        "halted": draw(st.booleans()),
        "pending": draw(st.sampled_from([None, 0, 13, 14, 0x80])),
    }


def _apply(cpu: VCpu, s: dict[str, Any]) -> None:
    """Put a random state into the source through the public API and the context."""
    uc, w = cpu.uc, cpu.wide
    uc.reg_write(X.UC_X86_REG_CR0, 0x10)
    uc.msr_write(0xC0000080, 0)
    if s["mode"] == "long":
        uc.reg_write(X.UC_X86_REG_CR4, 0x20)
        uc.msr_write(0xC0000080, 0x100)
    else:
        uc.reg_write(X.UC_X86_REG_CR4, 0)
    uc.reg_write(X.UC_X86_REG_CR3, s["cr3"])
    uc.reg_write(X.UC_X86_REG_CR0, s["cr0"])
    uc.reg_write(X.UC_X86_REG_CR2, s["cr2"])
    if w:
        uc.reg_write(X.UC_X86_REG_CR8, s["cr8"])
    for name, value in zip(("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9",
                            "r10", "r11", "r12", "r13", "r14", "r15") if w else
                           ("eax", "ebx", "ecx", "edx", "esi", "edi", "ebp", "esp"), s["regs"]):
        cpu.set(name, value)
    if w:
        cpu.set("rip", s["rip"])
    cpu.set("rflags" if w else "eflags", s["rflags"])
    uc.reg_write(X.UC_X86_REG_GDTR, (0, *s["gdt"], 0))
    uc.reg_write(X.UC_X86_REG_IDTR, (0, *s["idt"], 0))
    for name, mmr in zip(("LDTR", "TR"), s["sys"]):
        uc.reg_write(getattr(X, "UC_X86_REG_" + name), mmr)
    for (_, index), value in zip(MSRS, s["msrs"]):
        uc.msr_write(index, value)
    for i, (mant, exp) in enumerate(s["fp"]):
        uc.reg_write(getattr(X, f"UC_X86_REG_FP{i}"), (mant, exp))
    for name in ("fpcw", "fpsw", "fptag", "mxcsr"):
        cpu.set(name, s[name])
    for i in range(16 if w else 8):
        uc.reg_write(getattr(X, f"UC_X86_REG_XMM{i}"), s["xmm"][i])
    for i, value in enumerate(s["dr"]):
        cpu.set(f"dr{i}", value)
    cpu.set("dr6", s["dr6"])
    cpu.set("dr7", s["dr7"])
    hidden = {}
    for name, (sel, base, limit, flags) in zip(SEGMENTS, s["segs"]):
        hidden.update({f"{name}.selector": sel, f"{name}.base": base,
                       f"{name}.limit": limit, f"{name}.flags": flags})
    if not w:          # what a 32-bit engine's API cannot reach
        hidden.update(zip(("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9",
                           "r10", "r11", "r12", "r13", "r14", "r15"), s["regs"]))
        hidden["rip"] = s["rip"]
        hidden.update((f"xmm{i}", s["xmm"][i]) for i in range(8, 16))
    hflags = cpu.internals.read("hflags") & ~0xB
    hidden["hflags"] = hflags | s["cpl"] | (8 if s["shadow"] else 0)
    cpu.internals.write_many(hidden)
    cpu.internals.write_tsc(s["tsc"])
    cpu.halted = s["halted"]
    cpu.pending_exception = s["pending"]


def _public_registers(cpu: VCpu) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in dir(X):
        if not name.startswith("UC_X86_REG_") or name in SKIP_IDS:
            continue
        try:
            out[name] = cpu.uc.reg_read(getattr(X, name))
        except (U.UcError, ValueError, TypeError):
            continue
    for attr, index in MSRS:
        out[attr] = cpu.uc.msr_read(index)
    out["efer"] = cpu.uc.msr_read(0xC0000080)
    return out


def _migrate(src: VCpu, dst: VCpu) -> CpuState:
    st_src = CpuState(src)
    save_cpu(src, st_src)
    w = StreamWriter()
    save_vmstate(w, CPU_VMSD, st_src, {})
    r = StreamReader()
    r.feed(writer_bytes(w))
    values: dict[str, Any] = {}
    run_to_completion(load_vmstate(r, CPU_VMSD, CPU_VMSD.version_id, values), r)
    assert r.available == 0
    apply_loaded(CpuState(dst), values)
    return st_src


@pytest.mark.parametrize("wide", [False, True], ids=["engine32", "engine64"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_cpu_state_survives_save_and_load(pairs: dict[bool, tuple[VCpu, VCpu]], wide: bool,
                                                 data: st.DataObject) -> None:
    src, dst = pairs[wide]
    state = data.draw(cpu_states(wide))
    _apply(src, state)
    before_ids = _public_registers(src)
    before_ctx = src.internals.read_many(src.internals.names)
    saved = _migrate(src, dst)
    assert _public_registers(dst) == before_ids
    after_ctx = dst.internals.read_many(dst.internals.names)
    assert {k: v for k, v in after_ctx.items() if k != "tsc_offset"} == \
        {k: v for k, v in before_ctx.items() if k != "tsc_offset"}
    assert (dst.halted, dst.pending_exception) == (state["halted"], state["pending"])
    # The guest TSC continues from the saved value: never behind it, not far ahead.
    now = dst.internals.read_tsc()
    assert saved.tsc <= now < saved.tsc + (1 << 36)


def test_a_state_for_the_other_width_names_the_field(pairs: dict[bool, tuple[VCpu, VCpu]]) -> None:
    src, _ = pairs[True]
    _, dst = pairs[False]
    with pytest.raises(CpuStateError, match="field 'wide'"):
        _migrate(src, dst)
