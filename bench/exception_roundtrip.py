"""Exception round trip: guest fault -> pyvm delivers it -> handler -> IRET -> next fault.

    .venv/bin/python bench/exception_roundtrip.py [--count 3000] [--rounds 5]

Two tiny long-mode guests run on a vCPU driven as the machine's loop drives it
(``emu_start``; the hook records the exception; ``deliver``; again):

  int3  ``int3; jmp back`` with a handler that is just ``iretq``
  #PF   an 8-byte load from an unmapped address; the handler drops the error code,
        steps over the load and returns (a Linux guest's page fault, minus Linux)

Each is timed on a vCPU with the native exception hook and delivery (pyvm/_delivery.pyx)
and on one with their Python twins (``PYVM_DELIVERY=python``: the Python ``UC_HOOK_INTR``
callback, ``VCpu.deliver_python``, the in-flight marker cleared through ctypes),
interleaved (python, native, python, native ...) ``--rounds`` times.  It prints the median and spread (min-max) of the time per round trip and the
ratio python / native of the medians.  The guests are hand-assembled (no toolchain).
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import time

from unicorn import x86_const as X

from pyvm.cpu import VCpu
from pyvm.native_delivery import IMPLEMENTATION
from pyvm.ram import MemoryBackend, MemoryBackendConfig, RamBlock, RamLayout

RAM = 4 << 20
CODE, HANDLER = 0x10000, 0x11000
GDT, IDT, TSS, PML4 = 0x500, 0x2000, 0x3000, 0x4000
STACK = 0x90000
UNMAPPED = 0x40000000

GUESTS = {
    # int3 (CC); jmp -3 (EB FD)                    handler: iretq (48 CF)
    "int3": (3, b"\xcc\xeb\xfd", b"\x48\xcf"),
    # mov rax, [UNMAPPED] (48 8B 04 25 disp32); jmp -10 (EB F6)
    # handler: add rsp, 8 (48 83 C4 08); add qword [rsp], 8 (48 83 04 24 08); iretq
    "#PF": (14, b"\x48\x8b\x04\x25" + struct.pack("<I", UNMAPPED) + b"\xeb\xf6",
            b"\x48\x83\xc4\x08\x48\x83\x04\x24\x08\x48\xcf"),
}


def make_cpu(name: str, native: bool) -> VCpu:
    vector, code, handler = GUESTS[name]
    os.environ["PYVM_DELIVERY"] = "" if native else "python"    # read per vCPU
    ram = RamLayout()
    ram.add(RamBlock("pc.ram", 0, MemoryBackend(
        MemoryBackendConfig("memory-backend-ram", "pc.ram", RAM, implicit=True))))
    cpu = VCpu(0, ram, True, lambda port, size: 0xFF, lambda port, size, value: None)
    if (cpu.native_delivery is not None) != native:
        raise SystemExit("could not select the delivery variant")
    w = ram.write
    w(PML4, struct.pack("<Q", (PML4 + 0x1000) | 0x3))            # identity, two 2 MiB pages
    w(PML4 + 0x1000, struct.pack("<Q", (PML4 + 0x2000) | 0x3))
    w(PML4 + 0x2000, struct.pack("<QQ", 0x83, (1 << 21) | 0x83))
    w(GDT, struct.pack("<3Q", 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF))
    w(IDT + 16 * vector, struct.pack("<HHBBHII", HANDLER & 0xFFFF, 0x08, 0, 0x8E,
                                     HANDLER >> 16, 0, 0))
    w(CODE, code)
    w(HANDLER, handler)
    uc = cpu.uc
    uc.reg_write(X.UC_X86_REG_GDTR, (0, GDT, 23, 0))
    uc.reg_write(X.UC_X86_REG_IDTR, (0, IDT, 16 * 256 - 1, 0))
    cpu.set("cr3", PML4)
    cpu.set("cr4", 0x20)
    uc.msr_write(0xC0000080, 1 << 8)
    cpu.set("cr0", 0x80000011)
    cpu.set("cs", 0x08)
    for s in ("ds", "es", "ss"):
        cpu.set(s, 0x10)
    cpu.set("rsp", STACK)
    cpu.set("rip", CODE)
    cpu.set("rflags", 2)
    return cpu


def round_trips(cpu: VCpu, count: int) -> float:
    """Seconds per round trip over ``count`` exceptions (the machine loop's steps)."""
    cpu.stopper.set_deadline(1 << 62)
    t0 = time.perf_counter()
    for _ in range(count):
        cpu.emu_start()
        vector, code = cpu.pending_exception, cpu.pending_error_code
        if vector is None:
            raise SystemExit(f"no exception taken (fault: {cpu.fault})")
        cpu.pending_exception = cpu.pending_error_code = None
        cpu.deliver(vector, code)
    return (time.perf_counter() - t0) / count


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--count", type=int, default=3000, help="round trips per measurement")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    if IMPLEMENTATION != "cython":
        raise SystemExit("the native delivery is not built (make setup), or PYVM_PURE_PYTHON is set")
    for name in GUESTS:
        cpus = {"python": make_cpu(name, False), "native": make_cpu(name, True)}
        for cpu in cpus.values():
            round_trips(cpu, 200)                       # warm up: translate the code
        got: dict[str, list[float]] = {"python": [], "native": []}
        for _ in range(a.rounds):
            for variant, cpu in cpus.items():
                got[variant].append(round_trips(cpu, a.count))
        med = {k: statistics.median(v) for k, v in got.items()}
        for variant, values in got.items():
            print(f"{name:5} {variant:7} {med[variant] * 1e6:7.1f} us per round trip "
                  f"(spread {min(values) * 1e6:.1f}-{max(values) * 1e6:.1f}, "
                  f"{len(values)} x {a.count}), {1 / med[variant]:9.0f} per second")
        print(f"{name:5} ratio python/native = {med['python'] / med['native']:.2f}")
        for cpu in cpus.values():
            cpu.close()


if __name__ == "__main__":
    main()
