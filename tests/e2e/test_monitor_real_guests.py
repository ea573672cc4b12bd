"""The human monitor against real guests in real, protected and long mode.

Every guest here is a bundled image named on the command line (``-hda timer-real``,
``-kernel timer-pm``), run from a scratch directory, and halts once its timer test is
done, so the registers stay put while the monitor reads them.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.vmproc import VmProcess


def _vm(tmp_path: Path, *args: str) -> VmProcess:
    return VmProcess(tmp_path, "vm", *args)


def _reg(text: str, name: str) -> int:
    m = re.search(rf"\b{name}=([0-9a-f]+)", text)
    assert m, f"{name} missing from:\n{text}"
    return int(m.group(1), 16)


def _settled(vm: VmProcess) -> str:
    """``info registers`` once the guest sits in its final ``hlt``."""
    text = vm.hmp("info registers")
    assert "HLT=1" in text, text
    return text


@pytest.fixture
def real_mode(tmp_path: Path):
    vm = _vm(tmp_path, "-hda", "timer-real")
    vm.wait_serial("timer real ok")
    yield vm
    vm.close()


def test_real_mode_registers_segments_and_pc(real_mode: VmProcess) -> None:
    regs = _settled(real_mode)
    eip = _reg(regs, "EIP")
    assert 0x7C00 <= eip < 0x7E00, regs            # inside the boot sector, not 0
    assert _reg(regs, "ESP") == 0x7C00                  # the sector sets SP = 0x7c00
    # the vCPU's own segment cache: CS starts as x86's reset leaves it (0x9b), but every
    # real-mode reload (the timer's interrupts and their IRET) gives data flags (0x93),
    # as QEMU's real-mode segment loads do
    assert "CS =0000 00000000 0000ffff 00009300" in regs
    assert "DS =0000 00000000 0000ffff 00009300" in regs
    assert "CR0=00000010" in regs and "EFER=0000000000000000" in regs
    assert real_mode.hmp("print $pc").strip() == hex(eip)
    dis = real_mode.hmp("x /1i $pc")
    assert dis.startswith("0x%08x:" % eip), dis
    # 16-bit code: the final loop is "hlt; jmp back" (eb fd) or the hlt itself
    assert "jmp" in dis or "hlt" in dis, dis
    assert real_mode.hmp("info tlb") == "PG disabled\r\n"
    assert real_mode.hmp("info mem") == "PG disabled\r\n"


def test_real_mode_pic_and_irq_statistics(real_mode: VmProcess) -> None:
    pic = real_mode.hmp("info pic").splitlines()
    assert re.match(r"pic0: irr=[0-9a-f]{2} imr=[0-9a-f]{2} isr=00 hprio=\d irq_base=20 "
                    r"rr_sel=\d elcr=00 fnm=0$", pic[0]), pic
    assert pic[1].startswith("pic1: ") and "irq_base=28" in pic[1], pic
    irq = real_mode.hmp("info irq").splitlines()
    assert irq[0] == "IRQ statistics for isa-i8259:"
    counts = dict(line.split(":") for line in irq[1:])
    assert int(counts[" 0"]) >= 50, irq                  # 50 timer ticks were handled


def test_protected_mode_registers_from_the_gdt(tmp_path: Path) -> None:
    vm = _vm(tmp_path, "-kernel", "timer-pm")
    try:
        vm.wait_serial("timer pm ok")
        regs = _settled(vm)
        eip = _reg(regs, "EIP")
        assert eip >= 0x100000, regs                     # the image runs at 1 MiB
        assert re.search(r"CS =0008 00000000 ffffffff 00cf9b00 DPL=0 CS32 \[-R.\]", regs), regs
        assert re.search(r"DS =0010 00000000 ffffffff 00cf9300 DPL=0 DS   \[-W.\]", regs), regs
        gdt = re.search(r"GDT=     ([0-9a-f]{8}) ([0-9a-f]{8})", regs)
        assert gdt and int(gdt.group(1), 16) != 0, regs
        assert _reg(regs, "CR0") & 1 == 1
        assert vm.hmp("print $pc").strip() == hex(eip)
        assert vm.hmp("x /1i $pc").startswith("0x%08x:" % eip)
        # $eax reads the live register, not zero
        assert int(vm.hmp("print $eax").strip(), 16) == _reg(regs, "EAX")
        assert vm.hmp("info tlb") == "PG disabled\r\n"
    finally:
        vm.close()


def test_long_mode_registers_and_page_tables(tmp_path: Path) -> None:
    vm = _vm(tmp_path, "-kernel", "timer-lm")
    try:
        vm.wait_serial("timer lm ok")
        regs = _settled(vm)
        rip = _reg(regs, "RIP")
        assert rip >= 0x100000, regs
        assert "CS64" in regs and "CR0=80000011" in regs, regs
        assert _reg(regs, "EFER") & 0x500 == 0x500              # LME | LMA
        cr3 = _reg(regs, "CR3")
        assert vm.hmp("x /1i $pc").startswith("0x%08x:" % rip)
        tlb = vm.hmp("info tlb").splitlines()
        # pyvm's boot page tables identity-map the first 4 GiB with 2 MiB pages
        assert tlb[0].startswith("0000000000000000: 0000000000000000 --P"), tlb[:3]
        assert tlb[1] == "0000000000200000: 0000000000200000 --P-----W", tlb[:3]
        assert len(tlb) == 2048
        mem = vm.hmp("info mem").splitlines()
        assert mem == ["0000000000000000-0000000100000000 0000000100000000 -rw"], mem
        # the walk reads the guest's own tables: the PML4 entry matches xp at CR3
        pml4e = int(vm.hmp(f"xp /1gx {cr3:#x}").split()[1], 16)
        assert pml4e & 1 and pml4e & ~0xFFF & ((1 << 52) - 1) != 0
    finally:
        vm.close()


def test_bundled_guest_catalogue_lists_every_image(tmp_path: Path) -> None:
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "pyvm", "-kernel", "help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    from pyvm.guests import CATALOGUE, guest_path
    for g in CATALOGUE:
        assert re.search(rf"^{re.escape(g.name)}\s+{re.escape(g.boot)} {re.escape(g.name)}\s",
                         out.stdout, re.M), out.stdout
        guest_path(g.file)                   # the image is really there
    bad = subprocess.run([sys.executable, "-m", "pyvm", "-kernel", "no-such-guest"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1 and "no-such-guest" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_bundled_guest_by_name_from_another_directory(tmp_path: Path) -> None:
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "pyvm", "-kernel", "timer-pm", "-display", "none",
                          "-serial", "file:serial.txt",
                          "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0x21, out.stderr
    assert "timer pm ok" in (tmp_path / "serial.txt").read_text()
