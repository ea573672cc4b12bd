"""Small paged guests for dirty-tracking tests: page tables for 32-bit, PAE and 4-level
paging built in a RAM array, an engine set up to run them, and store instructions."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import unicorn as U
from unicorn import x86_const as X

PAGE = 4096
RAM = 8 << 20
CODE = 0x1000
TABLES = 0x10000          # page tables are built from here up
DATA_PHYS = 0x100000      # the pages the guest writes live in [1 MiB, 8 MiB)
VBASE = 0x40000000        # ... mapped at random virtual pages from here


def map_pages(mode: str, ram: np.ndarray, vpages: list[int], ppages: list[int]) -> int:
    """Page tables mapping code/tables identity plus vpages -> ppages; returns CR3."""
    nxt = [TABLES]

    def alloc() -> int:
        a = nxt[0]
        nxt[0] += PAGE
        ram[a:a + PAGE] = 0
        return a

    def put(addr: int, value: int, wide: bool) -> None:
        ram[addr:addr + (8 if wide else 4)] = np.frombuffer(
            struct.pack("<Q" if wide else "<I", value), dtype=np.uint8)

    def get(addr: int, wide: bool) -> int:
        return int.from_bytes(ram[addr:addr + (8 if wide else 4)].tobytes(), "little")

    levels = {"32bit": [(22, 10)], "pae": [(30, 2), (21, 9)], "long": [(39, 9), (30, 9), (21, 9)]}[mode]
    wide = mode != "32bit"
    root = alloc()

    def map_one(v: int, p: int) -> None:
        table = root
        for shift, bits in levels:
            idx = (v >> shift) & ((1 << bits) - 1)
            e = get(table + idx * (8 if wide else 4), wide)
            if not e & 1:
                new = alloc()
                # PAE's PDPTEs take only P (SDM 4.4.1); the others P|RW
                put(table + idx * (8 if wide else 4), new | (1 if mode == "pae" and shift == 30 else 3), wide)
                e = new
            table = e & ~0xFFF & ((1 << 52) - 1)
        put(table + ((v >> 12) & (511 if wide else 1023)) * (8 if wide else 4), p | 3, wide)

    for a in range(0, 0x40000, PAGE):               # code, stack and tables, identity
        map_one(a, a)
    for v, p in zip(vpages, ppages):
        map_one(v, p)
    return root


def store(addr: int, value: int, wide: bool) -> bytes:
    if wide:    # mov dword [abs32], imm32 (ModRM 04, SIB 25: no base, no index)
        return b"\xc7\x04\x25" + struct.pack("<iI", addr - (1 << 32) if addr >= 1 << 31 else addr, value)
    return b"\xc7\x05" + struct.pack("<II", addr, value)


def engine(mode: str, ram: np.ndarray, host_address: int, cr3: int) -> U.Uc:
    uc = U.Uc(U.UC_ARCH_X86, U.UC_MODE_64 if mode == "long" else U.UC_MODE_32)
    uc.mem_map_ptr(0, RAM, U.UC_PROT_ALL, host_address)
    uc.reg_write(X.UC_X86_REG_CR3, cr3)
    if mode == "pae":
        uc.reg_write(X.UC_X86_REG_CR4, 1 << 5)
    if mode == "long":
        uc.reg_write(X.UC_X86_REG_CR4, 1 << 5)
        uc.msr_write(0xC0000080, (1 << 8) | (1 << 10))
    uc.reg_write(X.UC_X86_REG_CR0, (1 << 31) | 0x11)
    uc.reg_write(X.UC_X86_REG_RSP if mode == "long" else X.UC_X86_REG_ESP, 0x3F000)
    return uc


def collect_until(machine: Any, block: Any, want: set[int], timeout: float = 30) -> set[int]:
    """Sync ``block``'s bitmap on the machine's loop until the reports cover ``want``
    (or ``timeout`` passes); returns every page reported."""
    import time

    from pyvm.fastpath_py import bitmap_to_indices

    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    while not want <= seen and time.monotonic() < deadline:
        words = machine.run_on_loop(block.dirty.fetch_and_clear)
        seen.update(int(p) for p in bitmap_to_indices(words, block.npages))
    return seen
