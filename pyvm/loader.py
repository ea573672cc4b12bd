"""Boot: put the guest image in RAM and the vCPUs in their entry state.

Four ways in, documented in docs/machine.md (and docs/linux.md):

- **Boot sector** (``-drive``/``-hda``): the first 512 bytes of the disk at 0x7c00, real mode,
  CS:IP = 0000:7c00, DS=ES=SS=0, SP=0x7c00, DL=0x80, IF=0.  Only vCPU 0 runs.
- **ELF** (``-kernel``, parsed with pyelftools): PT_LOAD segments at their physical
  addresses; every vCPU enters at ``e_entry``.  ELF32: flat 32-bit protected mode.  ELF64:
  long mode with identity-mapped 2 MiB pages for the first 4 GiB (tables at 0x1000-0x6fff).
  EBX = vCPU index, ECX = vCPU count, ESI = address of the ``-append`` string (0x7000) or 0,
  ESP = 0x80000 - index * 0x4000.
- **Linux** (``-kernel`` with a bzImage, or a ``vmlinux`` ELF; ``-initrd``, ``-append``): the
  64-bit boot protocol of Documentation/arch/x86/boot.rst, see :func:`load_linux`.
- **BIOS image** (``-bios``): a flat image ending at 1 MiB, entered at the reset vector
  F000:FFF0 in real mode.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field
from typing import Callable

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from pyvm import linux_boot
from pyvm.errors import ConfigError
from pyvm.ram import RamLayout

from pyvm.linux_boot import SetupHeader

GDT_ADDR = 0x500
PAGE_TABLES = 0x1000
CMDLINE_ADDR = 0x7000
CMDLINE_MAX = 1024
BOOT_SECTOR_ADDR = 0x7C00
STACK_TOP = 0x80000
STACK_PER_CPU = 0x4000
HIGH_LOAD = 0x100000      # a non-relocatable bzImage's protected-mode kernel (boot.rst)

# Flat descriptors (SDM Vol. 3, 3.4.5): base 0, limit 4 GiB, present, ring 0.
CODE32 = 0x00CF9A000000FFFF
DATA32 = 0x00CF92000000FFFF
CODE64 = 0x00AF9A000000FFFF

# Linux boot: the zero page and command line where QEMU puts them for a protocol >= 2.02
# kernel (hw/i386/x86.c: real_addr 0x10000, cmdline_addr 0x20000).
LINUX_BOOT_PARAMS = 0x10000
LINUX_CMDLINE = 0x20000
# The 64-bit boot protocol's segments: __BOOT_CS = 0x10, __BOOT_DS = 0x18 (boot.rst).
LINUX_BOOT_CS = 0x10
LINUX_BOOT_DS = 0x18
# The kernel text mapping (arch/x86/include/asm/page_64_types.h, __START_KERNEL_map).
KERNEL_TEXT_MAP = 0xFFFFFFFF80000000


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


@dataclass
class _Elf:
    wide: bool
    entry: int
    end: int              # highest physical address loaded (exclusive)
    linux: bool           # a Linux vmlinux (segments in the kernel text mapping)


def _load_elf_segments(ram: RamLayout, path: str, data: bytes) -> _Elf:
    try:
        elf = ELFFile(io.BytesIO(data))
        if elf["e_machine"] not in ("EM_386", "EM_X86_64"):
            raise ConfigError(f"-kernel {path}: not an x86 ELF ({elf['e_machine']})")
        end, linux = 0, False
        for seg in elf.iter_segments():
            if seg["p_type"] != "PT_LOAD" or seg["p_memsz"] == 0:
                continue
            linux |= seg["p_vaddr"] >= KERNEL_TEXT_MAP
            seg_data = seg.data().ljust(seg["p_memsz"], b"\0")
            _write(ram, seg["p_paddr"], seg_data, f"ELF segment of {path}")
            end = max(end, seg["p_paddr"] + seg["p_memsz"])
        return _Elf(elf.elfclass == 64, elf["e_entry"], end, linux and elf.elfclass == 64)
    except ELFError as err:
        raise ConfigError(f"-kernel {path}: not a valid ELF file ({err})") from err


def _read_file(option: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise ConfigError(f"{option} {path}: {err.strerror}") from err


def load_kernel(ram: RamLayout, path: str, append: str | None, initrd: str | None = None,
                ram_size: int = 0) -> BootImage:
    """``-kernel``: a Linux bzImage or vmlinux (Linux boot protocol), else any x86 ELF."""
    data = _read_file("-kernel", path)
    if linux_boot.is_bzimage(data):
        return load_linux(ram, path, data, append, initrd, ram_size)
    if not data.startswith(b"\x7fELF"):
        raise ConfigError(f"-kernel {path}: neither an ELF file nor a Linux bzImage")
    elf = _load_elf_segments(ram, path, data)
    if elf.linux:
        return _linux_entry(ram, path, linux_boot.synthetic_header(), elf.entry, elf.end,
                            append, initrd, ram_size, "vmlinux ELF")
    if initrd is not None:
        raise ConfigError(f"-initrd: {path} is not a Linux kernel")
    return _elf_boot(ram, path, elf, append)


def load_elf(ram: RamLayout, path: str, append: str | None) -> BootImage:
    """An x86 ELF guest entered with pyvm's own ELF convention (module docstring)."""
    return _elf_boot(ram, path, _load_elf_segments(ram, path, _read_file("-kernel", path)), append)


def _elf_boot(ram: RamLayout, path: str, elf: _Elf, append: str | None) -> BootImage:
    wide, entry_point = elf.wide, elf.entry
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


def load_linux(ram: RamLayout, path: str, image: bytes, append: str | None,
               initrd: str | None, ram_size: int) -> BootImage:
    """A bzImage: unpack the payload on the host when Python reads its format and enter
    the ``vmlinux`` inside; otherwise load the protected-mode kernel at its preferred
    address and let its own decompressor run (64-bit entry at ``+0x200``)."""
    try:
        hdr = linux_boot.parse_setup_header(image)
        payload = linux_boot.payload(image, hdr)
        vmlinux = linux_boot.decompress_payload(payload)
    except linux_boot.BootProtocolError as err:
        raise ConfigError(f"-kernel {path}: {err}") from err
    if vmlinux is not None:
        elf = _load_elf_segments(ram, path, vmlinux)
        if elf.linux:
            how = f"bzImage, {linux_boot.payload_format(payload)} payload unpacked by pyvm"
            return _linux_entry(ram, path, hdr, elf.entry, max(elf.end, elf.entry + hdr.init_size),
                                append, initrd, ram_size, how)
    load_addr = hdr.pref_address if hdr.relocatable else HIGH_LOAD
    _write(ram, load_addr, image[hdr.setup_size:], f"kernel {path}")
    how = f"bzImage, {linux_boot.payload_format(payload)} payload unpacked by the kernel"
    return _linux_entry(ram, path, hdr, load_addr + linux_boot.ENTRY_64_OFFSET,
                        load_addr + hdr.init_size, append, initrd, ram_size, how)


def _linux_entry(ram: RamLayout, path: str, hdr: "SetupHeader", entry_point: int, kernel_end: int,
                 append: str | None, initrd: str | None, ram_size: int, how: str) -> BootImage:
    """Zero page, command line, initrd, GDT and page tables for the 64-bit boot protocol."""
    cmdline = (append or "").encode() + b"\0"
    if len(cmdline) > hdr.cmdline_size + 1:
        raise ConfigError(f"-append: command line longer than {hdr.cmdline_size} bytes")
    _write(ram, LINUX_CMDLINE, cmdline, "-append")
    initrd_at: tuple[int, int] | None = None
    if initrd is not None:
        data = _read_file("-initrd", initrd)
        try:
            addr = linux_boot.initrd_address(hdr, ram_size, len(data), kernel_end)
        except linux_boot.BootProtocolError as err:
            raise ConfigError(f"-initrd {initrd}: {err}") from err
        _write(ram, addr, data, f"initrd {initrd}")
        initrd_at = (addr, len(data))
    try:
        params = linux_boot.build_boot_params(hdr, ram_size, LINUX_CMDLINE, initrd_at)
    except linux_boot.BootProtocolError as err:
        raise ConfigError(f"-kernel {path}: {err}") from err
    _write(ram, LINUX_BOOT_PARAMS, params, "boot_params")
    gdt = struct.pack("<QQQQ", 0, 0, CODE64, DATA32)     # __BOOT_CS = 0x10, __BOOT_DS = 0x18
    _write(ram, GDT_ADDR, gdt, "GDT")
    _write(ram, PAGE_TABLES, _identity_page_tables(), "page tables")

    def entry(index: int, count: int) -> EntryState:
        regs = {"rsi": LINUX_BOOT_PARAMS, "rsp": STACK_TOP, "rip": entry_point,
                "cs": LINUX_BOOT_CS, "ds": LINUX_BOOT_DS, "es": LINUX_BOOT_DS,
                "ss": LINUX_BOOT_DS, "fs": LINUX_BOOT_DS, "gs": LINUX_BOOT_DS}
        # Only the bootstrap processor runs: pyvm has no APIC to send it a startup IPI.
        return EntryState("long", regs, runnable=index == 0)
    return BootImage(True, f"Linux {path} ({how}), entry {entry_point:#x}", entry, gdt=gdt)


def _identity_page_tables() -> bytes:
    """PML4 -> one PDPT -> four page directories of 2 MiB pages: 0..4 GiB identity mapped."""
    present_rw = 0x3
    pml4 = struct.pack("<Q", (PAGE_TABLES + 0x1000) | present_rw).ljust(4096, b"\0")
    pdpt = b"".join(struct.pack("<Q", (PAGE_TABLES + 0x2000 + i * 0x1000) | present_rw)
                    for i in range(4)).ljust(4096, b"\0")
    pds = b"".join(struct.pack("<Q", ((i << 21) | 0x83)) for i in range(4 * 512))  # PS|RW|P
    return pml4 + pdpt + pds
