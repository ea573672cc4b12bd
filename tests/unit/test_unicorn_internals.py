"""The calibration probe of pyvm.unicorn_internals: it finds every field, and a field
written through it is what Unicorn's public API (or the guest) then sees."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import unicorn as U
from unicorn import x86_const as X

from pyvm import unicorn_internals as ui

ROOT = Path(__file__).resolve().parents[2]
MODES = [pytest.param(U.UC_MODE_32, id="mode32"), pytest.param(U.UC_MODE_64, id="mode64")]


def engine(mode: int) -> U.Uc:
    uc = U.Uc(U.UC_ARCH_X86, mode)
    uc.ctl_set_cpu_model(X.UC_CPU_X86_QEMU64)
    uc.mem_map(0, 0x10000)
    return uc


def test_calibration_finds_every_field() -> None:
    layout = ui.calibrate()
    want = {f"{s}.{p}" for s in ui.SEGMENT_NAMES for p in ui.SEGMENT_PARTS}
    want |= {"hflags", "efer", "dr7", "tsc_offset", "rip", *ui.WIDE_GPRS}
    want |= {f"xmm{i}" for i in range(8, 16)}
    assert want <= set(layout.fields)
    spans = sorted((f.offset, f.offset + f.size, f.name) for f in layout.fields.values())
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        assert end <= start, f"{a} overlaps {b}"
    assert all(0 <= f.offset and f.offset + f.size <= layout.context_size
               for f in layout.fields.values())
    # The six caches are one C struct repeated: same shape, fixed stride.
    rel = [[layout[f"{s}.{p}"].offset - layout[f"{s}.selector"].offset for p in ui.SEGMENT_PARTS]
           for s in ui.SEGMENT_NAMES]
    assert all(r == rel[0] for r in rel)
    sel = [layout[f"{s}.selector"].offset for s in ui.SEGMENT_NAMES]
    assert len({b - a for a, b in zip(sel, sel[1:])}) == 1


def test_unicorn_pinned_to_the_calibrated_version() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [d for d in deps if re.match(r"unicorn\b", d)]
    assert pins == [f"unicorn=={ui.CALIBRATED_UNICORN}"]
    assert ui.installed_unicorn_version() == ui.CALIBRATED_UNICORN


@pytest.mark.parametrize("mode", MODES)
def test_written_fields_show_through_the_public_api(mode: int) -> None:
    uc = engine(mode)
    acc = ui.ContextAccess(uc)
    acc.write_many({"cs.selector": 0x1B, "ss.selector": 0x23, "ds.selector": 0x2B,
                    "es.selector": 0x33, "fs.selector": 0x3B, "gs.selector": 0x43,
                    "fs.base": 0x12345678, "dr7": 0x0F0F0401})
    assert [uc.reg_read(getattr(X, f"UC_X86_REG_{s.upper()}")) for s in ui.SEGMENT_NAMES] == \
        [0x33, 0x1B, 0x23, 0x2B, 0x3B, 0x43]
    assert uc.reg_read(X.UC_X86_REG_FS_BASE) == 0x12345678
    assert uc.reg_read(X.UC_X86_REG_DR7) == 0x0F0F0401
    if mode == U.UC_MODE_64:
        acc.write("gs.base", 0xFFFF8000DEADB000)
        assert uc.reg_read(X.UC_X86_REG_GS_BASE) == 0xFFFF8000DEADB000
        acc.write_many({"r8": 0x0123456789ABCDEF, "rip": 0xFFFFFFFF81000000,
                        "xmm12": (0xAAAA << 112) | 0x5555})
        assert uc.reg_read(X.UC_X86_REG_R8) == 0x0123456789ABCDEF
        assert uc.reg_read(X.UC_X86_REG_RIP) == 0xFFFFFFFF81000000
        assert uc.reg_read(X.UC_X86_REG_XMM12) == (0xAAAA << 112) | 0x5555
    else:
        acc.write("rax", 0xFEDC_BA98_7654_3210)              # the API shows the low half
        assert uc.reg_read(X.UC_X86_REG_EAX) == 0x7654_3210


@pytest.mark.parametrize("mode", MODES)
def test_public_writes_show_through_the_fields(mode: int) -> None:
    uc = engine(mode)
    acc = ui.ContextAccess(uc)
    uc.reg_write(X.UC_X86_REG_DR7, 0x5A0405)
    uc.reg_write(X.UC_X86_REG_CR0, 0x10 | 0x8)          # TS: hflags bit 11
    got = acc.read_many(["dr7", "hflags"])
    assert got["dr7"] == 0x5A0405
    assert got["hflags"] & (1 << 11)
    uc.reg_write(X.UC_X86_REG_CR0, 0x10)
    assert not acc.read("hflags") & (1 << 11)


def test_segment_base_moves_guest_data_access() -> None:
    """A hidden base written through the context is the one the guest's loads use."""
    uc = engine(U.UC_MODE_32)
    uc.reg_write(X.UC_X86_REG_CR0, 0x10)
    for seg in ("CS", "DS", "SS"):
        uc.reg_write(getattr(X, "UC_X86_REG_" + seg), 0)
    uc.mem_write(0x100, bytes.fromhex("a0 00 00"))       # mov al, [0]  (16-bit code)
    uc.mem_write(0x3000, b"\x5a")
    acc = ui.ContextAccess(uc)
    acc.write("ds.base", 0x3000)                         # selector stays 0
    uc.emu_start(0x100, 0x103)
    assert uc.reg_read(X.UC_X86_REG_AL) == 0x5A
    assert uc.reg_read(X.UC_X86_REG_DS) == 0


def test_tsc_offset_moves_rdtsc() -> None:
    uc = engine(U.UC_MODE_32)
    uc.reg_write(X.UC_X86_REG_CR0, 0x10)
    uc.reg_write(X.UC_X86_REG_CS, 0)
    uc.mem_write(0, b"\x0f\x31")

    def rdtsc() -> int:
        uc.emu_start(0, 2)
        return (uc.reg_read(X.UC_X86_REG_EDX) << 32) | uc.reg_read(X.UC_X86_REG_EAX)
    plain = rdtsc()
    ui.ContextAccess(uc).write("tsc_offset", 1 << 50)
    shifted = rdtsc()
    assert (1 << 50) <= shifted - plain < (1 << 50) + (1 << 40)


def test_a_failing_probe_names_the_field_and_the_version(monkeypatch: pytest.MonkeyPatch) -> None:
    def lost(lab: ui.ProbeLab) -> list[ui.ContextField]:
        return [lab.locate("no_such_field", 8, lambda v: None, (0x1111222233334444,))]
    monkeypatch.setattr(ui, "_PROBES", list(ui._PROBES))
    monkeypatch.setattr(ui, "_LAYOUT", None)
    ui.register_probe("lost", lost)
    with pytest.raises(ui.CalibrationError) as info:
        ui.calibrate()
    msg = str(info.value)
    assert "no_such_field" in msg
    assert f"unicorn=={ui.CALIBRATED_UNICORN}" in msg and ui.installed_unicorn_version() in msg


def test_context_size_mismatch_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    layout = ui.calibrate()
    monkeypatch.setattr(ui, "_LAYOUT", ui.Layout(layout.context_size + 8, layout.fields))
    with pytest.raises(ui.CalibrationError, match="size"):
        ui.ContextAccess(engine(U.UC_MODE_64))


def test_no_other_module_touches_the_context() -> None:
    """Only pyvm/unicorn_internals.py may use Unicorn's context entry points (and the C
    side of the native delivery, pyvm/_delivery.pyx, which calls the ones it hands out),
    and pyvm/unicorn_tlb.py with pyvm/_tlbtrack.pyx for the TLB fill and CPU state."""
    offenders = []
    for path in (ROOT / "pyvm").rglob("*.py*"):
        if path.name in ("unicorn_internals.py", "_delivery.pyx", "unicorn_tlb.py", "_tlbtrack.pyx"):
            continue
        text = path.read_text(errors="replace")
        if re.search(r"uc_context_|context_save|context_restore|CPUX86State", text):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
