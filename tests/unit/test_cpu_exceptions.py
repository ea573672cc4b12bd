"""The vCPU takes exceptions as x86 does: real error codes, back to back, from ring 3
through the TSS (RSP0 and IST) in long mode and protected mode, SYSCALL, #UD, filtered
CPUID.  Small guests assembled with GNU as run on a VCpu driven like the machine's loop."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from pyvm.cpu import VCpu
from pyvm.errors import GuestFault
from pyvm.ram import MemoryBackend, MemoryBackendConfig, RamBlock, RamLayout

pytestmark = pytest.mark.skipif(shutil.which("as") is None, reason="GNU as (binutils) missing")

RAM = 4 << 20
CODE = 0x10000
GDT = 0x500
IDT = 0x2000
TSS = 0x3000
PML4 = 0x4000                       # + PDPT at 0x5000, PD at 0x6000
DATA = 0x8000                       # results the guests store
KSTACK, ISTSTACK, USTACK = 0x90000, 0xA0000, 0xB0000
UNMAPPED = 0x40000000               # no page-table entry covers it

# Descriptors (SDM Vol. 3, 3.4.5): kernel code64 0x10, kernel data 0x18, user data 0x2b,
# user code64 0x33, kernel code32 0x38 (protected mode), TSS at 0x40.
K_CODE64, K_DATA, U_DATA, U_CODE64, K_CODE32 = (0x00AF9A000000FFFF, 0x00CF92000000FFFF,
                                                0x00CFF2000000FFFF, 0x00AFFA000000FFFF,
                                                0x00CF9A000000FFFF)
U_CODE32 = 0x00CFFA000000FFFF


def _tss_descriptor(base: int, limit: int, wide: bool) -> bytes:
    lo = ((limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (0x89 << 40)
          | (((limit >> 16) & 0xF) << 48) | (((base >> 24) & 0xFF) << 56))
    return struct.pack("<Q", lo) + (struct.pack("<Q", base >> 32) if wide else b"")


def assemble(src: str, bits: int, tmp: Path) -> bytes:
    (tmp / "g.s").write_text(f".code{bits}\n.text\n.globl _start\n_start:\n" + src + "\n")
    subprocess.run(["as", "--64", "-o", str(tmp / "g.o"), str(tmp / "g.s")], check=True)
    subprocess.run(["ld", "-m", "elf_x86_64", "-Ttext", hex(CODE), "--oformat", "binary",
                    "-o", str(tmp / "g.bin"), str(tmp / "g.o")], check=True)
    return (tmp / "g.bin").read_bytes()


def make_cpu(wide: bool) -> VCpu:
    ram = RamLayout()
    ram.add(RamBlock("pc.ram", 0, MemoryBackend(
        MemoryBackendConfig("memory-backend-ram", "pc.ram", RAM, implicit=True))))
    return VCpu(0, ram, wide, lambda port, size: 0xFF, lambda port, size, value: None)


def run(cpu: VCpu, limit: int = 50) -> list[tuple[int, int | None]]:
    """Run to HLT as the machine's loop does; the (vector, error code)s delivered."""
    taken = []
    for _ in range(limit):
        cpu.stopper.set_deadline(1 << 62)
        cpu.clear_stop()
        cpu.emu_start()
        if cpu.fault is not None:
            raise cpu.fault
        if cpu.pending_exception is not None:
            vector, code = cpu.pending_exception, cpu.pending_error_code
            cpu.pending_exception = cpu.pending_error_code = None
            taken.append((vector, code))
            cpu.deliver(vector, code)
            continue
        if cpu.syscalled:
            continue
        if cpu.stopped_at_hlt():
            return taken
        raise GuestFault("stopped without HLT (triple fault)")
    raise AssertionError(f"no HLT after {limit} slices: {taken}")


def q(cpu: VCpu, addr: int) -> int:
    return int(struct.unpack("<Q", cpu.ram.read(addr, 8))[0])


def long_mode(cpu: VCpu, code: bytes, idt: dict[int, tuple[int, int]], user_pages: bool = True) -> None:
    """Long mode at CODE, ring 0, identity 2 MiB page (user-accessible), GDT/IDT/TSS."""
    w = cpu.ram.write
    u = 0x4 if user_pages else 0
    w(PML4, struct.pack("<Q", (PML4 + 0x1000) | 0x3 | u))
    w(PML4 + 0x1000, struct.pack("<Q", (PML4 + 0x2000) | 0x3 | u))
    w(PML4 + 0x2000, struct.pack("<Q", 0x83 | u) + struct.pack("<Q", (1 << 21) | 0x83 | u))
    gdt = struct.pack("<8Q", 0, 0, K_CODE64, K_DATA, 0, U_DATA, U_CODE64, K_CODE32)
    w(GDT, gdt + _tss_descriptor(TSS, 0x67, True))
    tss = bytearray(0x68)
    struct.pack_into("<Q", tss, 4, KSTACK)          # RSP0
    struct.pack_into("<Q", tss, 36, ISTSTACK)       # IST1
    w(TSS, bytes(tss))
    for vector, (handler, ist) in idt.items():
        gate = struct.pack("<HHBBHII", handler & 0xFFFF, 0x10, ist, 0x8E | 0x60,
                           (handler >> 16) & 0xFFFF, handler >> 32, 0)
        w(IDT + 16 * vector, gate)
    w(CODE, code)
    uc, X = cpu.uc, __import__("unicorn").x86_const
    uc.reg_write(X.UC_X86_REG_GDTR, (0, GDT, len(gdt) + 15, 0))
    uc.reg_write(X.UC_X86_REG_IDTR, (0, IDT, 16 * 256 - 1, 0))
    cpu.set("cr3", PML4)
    cpu.set("cr4", 0x20)
    uc.msr_write(0xC0000080, (1 << 8) | 1)          # LME, SCE
    cpu.set("cr0", 0x80000011)
    cpu.set("cs", 0x10)
    for s in ("ds", "es", "ss"):
        cpu.set(s, 0x18)
    cpu.set("rsp", KSTACK - 0x1000)
    cpu.set("rip", CODE)
    cpu.set("rflags", 2)


def labels(code_src: str, tmp: Path, names: list[str]) -> dict[str, int]:
    """Addresses of labels (assembled once more with them as data)."""
    probe = code_src + "\n" + "\n".join(f".quad {n}" for n in names)
    blob = assemble(probe, 64, tmp)
    tail = blob[-8 * len(names):]
    return {n: struct.unpack_from("<Q", tail, 8 * i)[0] for i, n in enumerate(names)}


# A #PF handler that records the error code and CR2, then skips the 8-byte faulting load.
PF_HANDLER = f"""
pf:     pop %rax                        /* error code */
        mov %rax, {DATA:#x}(,%rbx,8)
        mov %cr2, %rax
        mov %rax, {DATA + 0x100:#x}(,%rbx,8)
        inc %rbx
        addq $8, (%rsp)                 /* past the 8-byte mov */
        iretq
"""


def test_page_fault_error_codes_back_to_back(tmp_path: Path) -> None:
    src = f"""
        xor %ebx, %ebx
        movq {UNMAPPED:#x}, %rax        /* read, not present: error code 0 */
        movq %rax, {UNMAPPED + 8:#x}    /* write, not present: 2 */
        movq {UNMAPPED + 16:#x}, %rax   /* and once more: no double fault */
        hlt
{PF_HANDLER}"""
    lab = labels(src, tmp_path, ["pf"])
    cpu = make_cpu(True)
    long_mode(cpu, assemble(src, 64, tmp_path), {14: (lab["pf"], 0)})
    taken = run(cpu)
    assert taken == [(14, 0), (14, 2), (14, 0)]
    assert [q(cpu, DATA + 8 * i) for i in range(3)] == [0, 2, 0]
    assert [q(cpu, DATA + 0x100 + 8 * i) for i in range(3)] == [UNMAPPED, UNMAPPED + 8, UNMAPPED + 16]


def test_ring3_fault_switches_to_rsp0_and_ist(tmp_path: Path) -> None:
    src = f"""
        mov $0x40, %ax
        ltr %ax
        pushq $0x2b                     /* SS */
        pushq ${USTACK:#x}              /* RSP */
        pushq $0x202                    /* RFLAGS */
        pushq $0x33                     /* CS */
        pushq $user
        iretq
user:   movq {UNMAPPED:#x}, %rax        /* #PF from ring 3: gate without IST -> RSP0 */
        ud2                             /* #UD from ring 3: gate with IST1 */
pf:     mov %rsp, {DATA:#x}
        mov %cs, %rax
        mov %rax, {DATA + 8:#x}
        mov 16(%rsp), %rax              /* frame: err, RIP, CS, RFLAGS, RSP, SS */
        mov %rax, {DATA + 16:#x}
        mov 24(%rsp), %rax
        mov %rax, {DATA + 24:#x}
        mov 32(%rsp), %rax
        mov %rax, {DATA + 32:#x}
        mov 40(%rsp), %rax
        mov %rax, {DATA + 40:#x}
        add $8, %rsp
        addq $8, (%rsp)
        iretq                           /* back to ring 3 (native IRETQ) */
ud:     mov %rsp, {DATA + 48:#x}
        mov (%rsp), %rax
        mov %rax, {DATA + 56:#x}
        mov 8(%rsp), %rax
        mov %rax, {DATA + 64:#x}
        hlt
"""
    lab = labels(src, tmp_path, ["pf", "ud", "user"])
    cpu = make_cpu(True)
    long_mode(cpu, assemble(src, 64, tmp_path), {14: (lab["pf"], 0), 6: (lab["ud"], 1)})
    taken = run(cpu)
    assert taken == [(14, 0x4), (6, None)]                  # U/S set: a user-mode access
    assert q(cpu, DATA) == KSTACK - 48                       # on RSP0, six words pushed
    assert q(cpu, DATA + 8) == 0x10                          # handler runs in ring 0
    assert q(cpu, DATA + 16) == 0x33                         # interrupted CS (ring 3)
    assert q(cpu, DATA + 24) & 0x200                         # interrupted RFLAGS
    assert q(cpu, DATA + 32) == USTACK                       # interrupted RSP
    assert q(cpu, DATA + 40) == 0x2b                         # interrupted SS
    assert q(cpu, DATA + 48) == ISTSTACK - 40                # #UD on IST1, five words
    assert q(cpu, DATA + 56) == lab["user"] + 8              # RIP of the ud2 itself
    assert q(cpu, DATA + 64) == 0x33


def test_syscall_from_ring3(tmp_path: Path) -> None:
    src = f"""
        mov $0x40, %ax
        ltr %ax
        pushq $0x2b
        pushq ${USTACK:#x}
        pushq $0x202                    /* IF, which SFMASK masks on entry */
        pushq $0x33
        pushq $user
        iretq
user:   mov $0x1234, %r11
        syscall
after:  hlt
entry:  mov %rcx, {DATA:#x}
        mov %r11, {DATA + 8:#x}
        pushfq
        popq {DATA + 16:#x}
        mov %cs, %rax
        mov %rax, {DATA + 24:#x}
        mov %ss, %rax
        mov %rax, {DATA + 32:#x}
        hlt
"""
    lab = labels(src, tmp_path, ["entry", "after"])
    cpu = make_cpu(True)
    long_mode(cpu, assemble(src, 64, tmp_path), {})
    cpu.uc.msr_write(0xC0000081, (0x23 << 48) | (0x10 << 32))   # STAR
    cpu.uc.msr_write(0xC0000082, lab["entry"])                  # LSTAR
    cpu.uc.msr_write(0xC0000084, 0x200)                         # SFMASK: IF
    cpu.set("rflags", 2)
    assert run(cpu) == []
    assert q(cpu, DATA) == lab["after"]                          # RCX = next RIP
    assert q(cpu, DATA + 8) & 0x200                              # R11 = user RFLAGS (IF)
    assert not q(cpu, DATA + 16) & 0x200                         # IF masked by SFMASK
    assert (q(cpu, DATA + 24), q(cpu, DATA + 32)) == (0x10, 0x18)


def test_cpuid_hides_the_local_apic(tmp_path: Path) -> None:
    src = f"""
        mov $1, %eax
        cpuid
        mov %edx, {DATA:#x}
        mov %ecx, {DATA + 8:#x}
        xor %eax, %eax
        cpuid
        mov %ebx, {DATA + 16:#x}
        hlt
"""
    cpu = make_cpu(True)
    long_mode(cpu, assemble(src, 64, tmp_path), {})
    run(cpu)
    assert not q(cpu, DATA) & (1 << 9)                           # APIC
    assert q(cpu, DATA) & 1                                      # FPU still there
    assert not q(cpu, DATA + 8) & (1 << 21)                      # x2APIC
    assert q(cpu, DATA + 16) != 0                                # other leaves: Unicorn's


def test_protected_mode_ring3_interrupt_uses_ss0_esp0(tmp_path: Path) -> None:
    """32-bit protected mode: a fault in ring 3 switches to SS0:ESP0 of the 32-bit TSS."""
    src = f"""
        mov $0x40, %ax
        ltr %ax
        push $0x2b                      /* SS (user data, DPL 3) */
        push ${USTACK:#x}
        push $0x202
        push $0x4b                      /* CS: user code32, GDT index 9, RPL 3 */
        push $user
        iret
user:   ud2
ud:     mov %esp, {DATA:#x}
        mov %cs, %eax
        mov %eax, {DATA + 8:#x}
        mov 4(%esp), %eax
        mov %eax, {DATA + 16:#x}
        mov 16(%esp), %eax
        mov %eax, {DATA + 24:#x}
        hlt
"""
    (tmp_path / "g.s").write_text(".code32\n.text\n.globl _start\n_start:\n" + src + "\n.long ud\n")
    subprocess.run(["as", "--32", "-o", str(tmp_path / "g.o"), str(tmp_path / "g.s")], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext", hex(CODE), "--oformat", "binary",
                    "-o", str(tmp_path / "g.bin"), str(tmp_path / "g.o")], check=True)
    blob = (tmp_path / "g.bin").read_bytes()
    ud = struct.unpack("<I", blob[-4:])[0]
    cpu = make_cpu(False)
    w = cpu.ram.write
    gdt = struct.pack("<8Q", 0, 0, K_CODE64, K_DATA, 0, U_DATA, U_CODE64, K_CODE32)
    w(GDT, gdt + _tss_descriptor(TSS, 0x67, False) + struct.pack("<Q", U_CODE32))
    tss = bytearray(0x68)
    struct.pack_into("<II", tss, 4, KSTACK, 0x18)    # ESP0, SS0
    w(TSS, bytes(tss))
    w(IDT + 8 * 6, struct.pack("<HHBBH", ud & 0xFFFF, 0x38, 0, 0x8E, ud >> 16))
    w(CODE, blob)
    import unicorn.x86_const as X
    cpu.uc.reg_write(X.UC_X86_REG_GDTR, (0, GDT, len(gdt) + 15, 0))
    cpu.uc.reg_write(X.UC_X86_REG_IDTR, (0, IDT, 8 * 256 - 1, 0))
    cpu.set("cr0", 0x11)
    cpu.set("cs", 0x38)
    for s in ("ds", "es", "ss"):
        cpu.set(s, 0x18)
    cpu.set("esp", KSTACK - 0x1000)
    cpu.set("eip", CODE)
    assert run(cpu) == [(6, None)]
    d = lambda off: struct.unpack("<I", cpu.ram.read(DATA + off, 4))[0]   # noqa: E731
    assert d(0) == KSTACK - 20                   # EIP, CS, EFLAGS, ESP, SS on ESP0
    assert d(8) == 0x38                          # ring 0
    assert d(16) == 0x4b                         # interrupted CS
    assert d(24) == 0x2b                         # interrupted SS
