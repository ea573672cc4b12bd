"""The Linux boot protocol without a VM: setup header parsing, payload unpacking, the
zero page (boot_params) and the loader's placement of kernel, initrd and command line."""

from __future__ import annotations

import gzip
import lzma
import struct
from pathlib import Path

import pytest

from pyvm import linux_boot as lb
from pyvm import loader
from pyvm.errors import ConfigError
from pyvm.ram import MemoryBackend, MemoryBackendConfig, RamBlock, RamLayout

MiB = 1 << 20


def fake_elf(entry: int = 0x1000000, size: int = 0x3000) -> bytes:
    """A minimal ELF64 vmlinux: one PT_LOAD in the kernel text mapping."""
    ehdr = struct.pack("<4sBBBBB7xHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, 2, 62, 1,
                       entry, 64, 0, 0, 64, 56, 1, 64, 0, 0)
    body = bytes(range(256)) * (size // 256)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0x1000, 0xFFFFFFFF81000000, entry, len(body),
                       len(body) + 0x1000, 0x1000)
    return (ehdr + phdr).ljust(0x1000, b"\0") + body


def fake_bzimage(payload: bytes, *, version: int = 0x020F, xloadflags: int = 1,
                 setup_sects: int = 3) -> bytes:
    setup = bytearray((setup_sects + 1) * 512)
    setup[lb.OFF_SETUP_SECTS] = setup_sects
    struct.pack_into("<H", setup, lb.OFF_BOOT_FLAG, 0xAA55)
    setup[lb.OFF_JUMP:lb.OFF_JUMP + 2] = bytes((0xEB, 0x66))    # jmp: header ends at 0x268
    setup[lb.OFF_HEADER:lb.OFF_HEADER + 4] = b"HdrS"
    struct.pack_into("<H", setup, lb.OFF_VERSION, version)
    setup[lb.OFF_LOADFLAGS] = lb.LOADED_HIGH
    struct.pack_into("<I", setup, lb.OFF_INITRD_ADDR_MAX, 0x7FFFFFFF)
    struct.pack_into("<I", setup, lb.OFF_KERNEL_ALIGNMENT, 0x200000)
    setup[lb.OFF_RELOCATABLE] = 1
    struct.pack_into("<H", setup, lb.OFF_XLOADFLAGS, xloadflags)
    struct.pack_into("<I", setup, lb.OFF_CMDLINE_SIZE, 2047)
    struct.pack_into("<II", setup, lb.OFF_PAYLOAD_OFFSET, 0x300, len(payload))
    struct.pack_into("<Q", setup, lb.OFF_PREF_ADDRESS, 0x1000000)
    struct.pack_into("<I", setup, lb.OFF_INIT_SIZE, 0x400000)
    pm = bytearray(0x300) + payload
    return bytes(setup) + bytes(pm)


def with_size(compressed: bytes, raw: bytes) -> bytes:
    return compressed + struct.pack("<I", len(raw))     # what the kernel's build appends


def test_setup_header_fields() -> None:
    img = fake_bzimage(with_size(lzma.compress(fake_elf(), lzma.FORMAT_XZ), fake_elf()))
    hdr = lb.parse_setup_header(img)
    assert hdr.setup_size == 4 * 512
    assert hdr.version == 0x020F
    assert hdr.pref_address == 0x1000000 and hdr.init_size == 0x400000
    assert hdr.initrd_addr_max == 0x7FFFFFFF and hdr.cmdline_size == 2047
    assert len(hdr.raw) == 0x268 - 0x1F1 and hdr.raw[0x202 - 0x1F1:][:4] == b"HdrS"
    assert lb.payload_format(lb.payload(img, hdr)) == "xz"


@pytest.mark.parametrize("bad,msg", [
    (b"MZ" + bytes(0x400), "no 'HdrS'"),
    (fake_bzimage(b"x", version=0x0204), "too old"),
    (fake_bzimage(b"x", xloadflags=0), "no 64-bit entry"),
])
def test_setup_header_refusals(bad: bytes, msg: str) -> None:
    with pytest.raises(lb.BootProtocolError, match=msg):
        lb.parse_setup_header(bad)


def test_payload_past_the_end_is_refused() -> None:
    img = bytearray(fake_bzimage(b"abcd"))
    struct.pack_into("<I", img, lb.OFF_PAYLOAD_LENGTH, 1 << 20)
    with pytest.raises(lb.BootProtocolError, match="past the end"):
        lb.parse_setup_header(bytes(img))


@pytest.mark.parametrize("fmt", ["gzip", "xz", "lzma", "zstd"])
def test_payload_formats_unpack_on_the_host(fmt: str) -> None:
    raw = fake_elf()
    if fmt == "gzip":
        data = gzip.compress(raw)                     # its trailer already ends with the size
    elif fmt == "xz":
        data = with_size(lzma.compress(raw, lzma.FORMAT_XZ), raw)
    elif fmt == "lzma":
        data = with_size(lzma.compress(raw, lzma.FORMAT_ALONE), raw)
    else:
        zstandard = pytest.importorskip("zstandard")
        data = with_size(zstandard.ZstdCompressor().compress(raw), raw)
    assert lb.payload_format(data) == fmt
    assert lb.decompress_payload(data) == raw


def test_unknown_and_corrupt_payloads() -> None:
    assert lb.decompress_payload(b"BZh91AY&SY" + bytes(20)) is None        # bzip2: the kernel's job
    raw = fake_elf()
    bad = with_size(lzma.compress(raw, lzma.FORMAT_XZ), raw)[:-4] + struct.pack("<I", 7)
    with pytest.raises(lb.BootProtocolError, match="not the length"):
        lb.decompress_payload(bad)


def test_e820_map_and_boot_params() -> None:
    img = fake_bzimage(with_size(lzma.compress(fake_elf(), lzma.FORMAT_XZ), fake_elf()))
    hdr = lb.parse_setup_header(img)
    bp = lb.build_boot_params(hdr, 512 * MiB, 0x20000, (0x1F000000, 0x123456))
    assert len(bp) == 4096
    assert bp[0x202:0x206] == b"HdrS"
    assert bp[lb.OFF_TYPE_OF_LOADER] == 0xFF
    assert bp[lb.OFF_LOADFLAGS] & lb.LOADED_HIGH
    assert struct.unpack_from("<I", bp, lb.OFF_CMD_LINE_PTR)[0] == 0x20000
    assert struct.unpack_from("<II", bp, lb.OFF_RAMDISK_IMAGE) == (0x1F000000, 0x123456)
    n = bp[lb.BP_E820_ENTRIES]
    table = [struct.unpack_from("<QQI", bp, lb.BP_E820_TABLE + 20 * i) for i in range(n)]
    assert table == [(0, 0x9FC00, 1), (0x9FC00, 0x400, 2), (0xF0000, 0x10000, 2),
                     (MiB, 511 * MiB, 1)]


def test_initrd_goes_high_below_the_limits() -> None:
    hdr = lb.synthetic_header()
    assert lb.initrd_address(hdr, 512 * MiB, 0x1801, 80 * MiB) == (512 * MiB - 0x1801) & ~0xFFF
    small = lb.SetupHeader(**{**hdr.__dict__, "initrd_addr_max": 0x0FFFFFFF})
    assert lb.initrd_address(small, 512 * MiB, 0x1000, 80 * MiB) == 0x10000000 - 0x1000
    with pytest.raises(lb.BootProtocolError, match="larger -m"):
        lb.initrd_address(hdr, 64 * MiB, 0x100001, 63 * MiB)


def _ram(size: int) -> RamLayout:
    ram = RamLayout()
    ram.add(RamBlock("pc.ram", 0, MemoryBackend(
        MemoryBackendConfig("memory-backend-ram", "pc.ram", size, implicit=True))))
    return ram


def test_loader_unpacks_and_places_everything(tmp_path: Path) -> None:
    elf = fake_elf()
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(fake_bzimage(with_size(lzma.compress(elf, lzma.FORMAT_XZ), elf)))
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"070701" + bytes(4000))
    ram = _ram(128 * MiB)
    boot = loader.load_kernel(ram, str(kernel), "console=ttyS0 quiet", str(initrd), 128 * MiB)
    assert boot.wide and "xz payload unpacked by pyvm" in boot.describe
    st = boot.entry(0, 1)
    assert st.mode == "long" and st.regs["rip"] == 0x1000000
    assert st.regs["rsi"] == loader.LINUX_BOOT_PARAMS
    assert (st.regs["cs"], st.regs["ds"], st.regs["ss"]) == (0x10, 0x18, 0x18)
    assert not boot.entry(1, 2).runnable                     # no APIC: only the BSP runs
    assert ram.read(0x1000000, 0x3000) == elf[0x1000:0x4000]  # PT_LOAD at its p_paddr
    bp = ram.read(loader.LINUX_BOOT_PARAMS, 4096)
    assert ram.read(loader.LINUX_CMDLINE, 20) == b"console=ttyS0 quiet\0"
    addr, size = struct.unpack_from("<II", bp, lb.OFF_RAMDISK_IMAGE)
    assert size == 4006 and addr == (128 * MiB - 4006) & ~0xFFF
    assert ram.read(addr, 6) == b"070701"
    gdt = ram.read(loader.GDT_ADDR, 32)
    assert struct.unpack("<4Q", gdt)[2:] == (loader.CODE64, loader.DATA32)


def test_loader_runs_the_kernels_decompressor_for_other_formats(tmp_path: Path) -> None:
    kernel = tmp_path / "bzImage"
    img = fake_bzimage(b"BZh91AY&SY" + bytes(64))
    kernel.write_bytes(img)
    ram = _ram(64 * MiB)
    boot = loader.load_kernel(ram, str(kernel), None, None, 64 * MiB)
    assert "bzip2 payload unpacked by the kernel" in boot.describe
    assert boot.entry(0, 1).regs["rip"] == 0x1000000 + 0x200
    assert ram.read(0x1000000, len(img) - 2048) == img[2048:]


def test_loader_user_errors(tmp_path: Path) -> None:
    kernel = tmp_path / "k"
    kernel.write_bytes(b"not a kernel at all")
    with pytest.raises(ConfigError, match="neither an ELF file nor a Linux bzImage"):
        loader.load_kernel(_ram(16 * MiB), str(kernel), None, None, 16 * MiB)
    with pytest.raises(ConfigError, match="-initrd .*missing"):
        good = tmp_path / "bz"
        elf = fake_elf()
        good.write_bytes(fake_bzimage(with_size(lzma.compress(elf, lzma.FORMAT_XZ), elf)))
        loader.load_kernel(_ram(64 * MiB), str(good), None, str(tmp_path / "missing"), 64 * MiB)


def test_cli_refuses_initrd_and_append_without_kernel(capsys: pytest.CaptureFixture[str],
                                                      tmp_path: Path) -> None:
    from pyvm.cli import main

    assert main(["-initrd", str(tmp_path / "x"), "-display", "none"]) == 1
    assert capsys.readouterr().err == "pyvm: -initrd only allowed with -kernel option\n"
    assert main(["-append", "console=ttyS0", "-display", "none"]) == 1
    assert capsys.readouterr().err == "pyvm: -append only allowed with -kernel option\n"
