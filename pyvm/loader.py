"""Boot: put the guest image in RAM and the vCPUs in their entry state.

Three ways in, documented in docs/machine.md:

- **Boot sector** (``-drive``/``-hda``): the first 512 bytes of the disk at 0x7c00, real mode,
  CS:IP = 0000:7c00, DS=ES=SS=0, SP=0x7c00, DL=0x80, IF=0.  Only vCPU 0 runs.
- **ELF** (``-kernel``, parsed with pyelftools): PT_LOAD segments at their physical
  addresses; every vCPU enters at ``e_entry``.  ELF32: flat 32-bit protected mode.  ELF64:
  long mode with identity-mapped 2 MiB pages for the first 4 GiB (tables at 0x1000-0x6fff).
  EBX = vCPU index, ECX = vCPU count, ESI = address of the ``-append`` string (0x7000) or 0,
  ESP = 0x80000 - index * 0x4000.
- **BIOS image** (``-bios``): a flat image ending at 1 MiB, entered at the reset vector
  F000:FFF0 in real mode.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Callable

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from pyvm.errors import ConfigError
from pyvm.ram import RamLayout

GDT_ADDR = 0x500
PAGE_TABLES = 0x1000
CMDLINE_ADDR = 0x7000
CMDLINE_MAX = 1024
BOOT_SECTOR_ADDR = 0x7C00
STACK_TOP = 0x80000
STACK_PER_CPU = 0x4000

# Flat descriptors (SDM Vol. 3, 3.4.5): base 0, limit 4 GiB, present, ring 0.
CODE32 = 0x00CF9A000000FFFF
DATA32 = 0x00CF92000000FFFF
CODE64 = 0x00AF9A000000FFFF


@dataclass
class EntryState:
    """Registers one vCPU starts with (names as in :meth:`pyvm.cpu.VCpu.set`)."""

    mode: str                         # "real", "protected" or "long"
    regs: dict[str, int] = field(default_factory=dict)
    runnable: bool = True


@dataclass
class BootImage:
    """What the loader decided: engine width and a per-vCPU entry state."""

    wide: bool
    describe: str
    entry: Callable[[int, int], EntryState]     # (cpu index, cpu count) -> state
    gdt: bytes = b""
    segments: dict[str, int] = field(default_factory=dict)


def _write(ram: RamLayout, addr: int, data: bytes, what: str) -> None:
    try:
        ram.write(addr, data)
    except ValueError as err:
        raise ConfigError(f"{what} does not fit in guest RAM at {addr:#x} "
                          f"({len(data)} bytes): use a larger -m") from err


def _write_cmdline(ram: RamLayout, append: str | None) -> int:
    if not append:
        return 0
    data = append.encode() + b"\0"
    if len(data) > CMDLINE_MAX:
        raise ConfigError(f"-append: command line longer than {CMDLINE_MAX - 1} bytes")
    _write(ram, CMDLINE_ADDR, data, "-append")
    return CMDLINE_ADDR


def load_boot_sector(ram: RamLayout, sector: bytes) -> BootImage:
    if len(sector) < 512:
        raise ConfigError("disk image is smaller than one 512-byte sector")
    _write(ram, BOOT_SECTOR_ADDR, sector[:512], "boot sector")

    def entry(index: int, count: int) -> EntryState:
        return EntryState("real", {"eip": BOOT_SECTOR_ADDR, "esp": BOOT_SECTOR_ADDR, "edx": 0x80,
                                   "cs": 0, "ds": 0, "es": 0, "ss": 0, "fs": 0, "gs": 0},
                          runnable=index == 0)
    return BootImage(False, "boot sector at 0x7c00", entry)


def load_bios(ram: RamLayout, path: str) -> BootImage:
    try:
        data = open(path, "rb").read()
    except OSError as err:
        raise ConfigError(f"-bios {path}: {err.strerror}") from err
    if not data or len(data) > 128 * 1024:
        raise ConfigError(f"-bios {path}: image must be 1 byte to 128 KiB long")
    _write(ram, 0x100000 - len(data), data, "BIOS image")

    def entry(index: int, count: int) -> EntryState:
        return EntryState("real", {"eip": 0xFFF0, "esp": 0, "cs": 0xF000, "ds": 0, "es": 0,
                                   "ss": 0, "fs": 0, "gs": 0}, runnable=index == 0)
    return BootImage(False, f"BIOS image {path}", entry)


def load_elf(ram: RamLayout, path: str, append: str | None) -> BootImage:
    try:
        f = open(path, "rb")
    except OSError as err:
        raise ConfigError(f"-kernel {path}: {err.strerror}") from err
    with f:
        try:
            elf = ELFFile(f)
            if elf["e_machine"] not in ("EM_386", "EM_X86_64"):
                raise ConfigError(f"-kernel {path}: not an x86 ELF ({elf['e_machine']})")
            wide = elf.elfclass == 64
            for seg in elf.iter_segments():
                if seg["p_type"] != "PT_LOAD" or seg["p_memsz"] == 0:
                    continue
                data = seg.data().ljust(seg["p_memsz"], b"\0")
                _write(ram, seg["p_paddr"], data, f"ELF segment of {path}")
            entry_point = elf["e_entry"]
        except ELFError as err:
            raise ConfigError(f"-kernel {path}: not a valid ELF file ({err})") from err
    cmdline = _write_cmdline(ram, append)
    gdt = struct.pack("<QQQ", 0, CODE64 if wide else CODE32, DATA32)
    _write(ram, GDT_ADDR, gdt, "GDT")
    if wide:
        _write(ram, PAGE_TABLES, _identity_page_tables(), "page tables")

    def entry(index: int, count: int) -> EntryState:
        regs = {"ebx": index, "ecx": count, "esi": cmdline, "esp": STACK_TOP - index * STACK_PER_CPU,
                "eip": entry_point}
        return EntryState("long" if wide else "protected", regs)
    return BootImage(wide, f"{'ELF64' if wide else 'ELF32'} {path}, entry {entry_point:#x}", entry,
                     gdt=gdt)


def _identity_page_tables() -> bytes:
    """PML4 -> one PDPT -> four page directories of 2 MiB pages: 0..4 GiB identity mapped."""
    present_rw = 0x3
    pml4 = struct.pack("<Q", (PAGE_TABLES + 0x1000) | present_rw).ljust(4096, b"\0")
    pdpt = b"".join(struct.pack("<Q", (PAGE_TABLES + 0x2000 + i * 0x1000) | present_rw)
                    for i in range(4)).ljust(4096, b"\0")
    pds = b"".join(struct.pack("<Q", ((i << 21) | 0x83)) for i in range(4 * 512))  # PS|RW|P
    return pml4 + pdpt + pds
