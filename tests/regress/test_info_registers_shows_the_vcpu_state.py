"""Regression: ``info registers`` printed EAX..EDI, EIP and EFLAGS as zero for every
32-bit guest, GDT/IDT as their reset values and HLT=0 for a halted vCPU: the machine
handed the monitor its vCPU's own register names (``eax``, ``eip``, ``gdt_base``) while
the monitor reads the names its VmApi contract lists (``rax``, ``rip``, ``gdtr_base``,
``halted``).  The monitor's tests used a fake VM that followed the contract."""

from __future__ import annotations

import re

from tests.conftest import guest
from tests.waiting import wait_until

HLT_OPCODE = 0xF4


def test_halted_32bit_guest_registers(vms) -> None:
    vm = vms("vm", "-m", "32M", "-kernel", guest("memcheck.elf"), "-append", "start=1 size=1 gens=1",
             "-display", "none")
    # The situation: the guest ran (its own stack and descriptor tables set up, output
    # written) and ended in `cli; hlt` (firmware/pc32.s halt_forever): the vCPU has
    # nothing left to run and its state stays put.
    vm.wait_serial("memcheck done\r\n")
    def halted_dump() -> str | None:
        text = vm.hmp("info registers")
        return text if "HLT=1" in text else None
    dump = wait_until(halted_dump, 20, "info registers reporting HLT=1")
    eip = int(re.search(r"EIP=([0-9a-f]{8})", dump).group(1), 16)
    esp = int(re.search(r"ESP=([0-9a-f]{8})", dump).group(1), 16)
    gdt_base = int(re.search(r"GDT=\s+([0-9a-f]+)", dump).group(1), 16)
    efl = int(re.search(r"EFL=([0-9a-f]{8})", dump).group(1), 16)
    assert vm.pmem(eip)[eip - 1] == HLT_OPCODE, dump          # EIP is right after the hlt
    assert esp != 0 and gdt_base != 0, dump
    assert efl & 0x200 == 0, dump                             # after cli: IF clear
    assert dump == vm.hmp("info registers")                   # and it stays put
