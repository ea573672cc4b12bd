"""The Linux/x86 boot protocol (Documentation/arch/x86/boot.rst in the Linux tree).

Sans-IO: these functions read a bzImage's setup header, unpack its compressed payload and
build the "zero page" (``struct boot_params``) from bytes and numbers; :mod:`pyvm.loader`
puts the results in guest RAM.

Layout of a bzImage: ``(setup_sects + 1) * 512`` bytes of real-mode setup code, whose
setup header starts at 0x1f1, followed by the protected-mode kernel.  That part holds the
kernel's own decompressor and, at ``payload_offset``/``payload_length``, the compressed
``vmlinux`` ELF.  pyvm unpacks the payload on the host when Python reads its format
(gzip, xz, lzma; zstd with the ``zstandard`` package) and enters the ``vmlinux`` ELF at
its 64-bit entry; other formats (bzip2, lzo, lz4) run the kernel's own decompressor
from the 64-bit entry of the protected-mode kernel (``code + 0x200``).
"""

from __future__ import annotations

import lzma
import struct
import zlib
from dataclasses import dataclass

# Setup header offsets within the image / the zero page (boot.rst, "THE REAL-MODE KERNEL HEADER").
HDR_START = 0x1F1
OFF_SETUP_SECTS = 0x1F1
OFF_VID_MODE = 0x1FA
OFF_BOOT_FLAG = 0x1FE
OFF_JUMP = 0x200
OFF_HEADER = 0x202
OFF_VERSION = 0x206
OFF_TYPE_OF_LOADER = 0x210
OFF_LOADFLAGS = 0x211
OFF_RAMDISK_IMAGE = 0x218
OFF_RAMDISK_SIZE = 0x21C
OFF_HEAP_END_PTR = 0x224
OFF_CMD_LINE_PTR = 0x228
OFF_INITRD_ADDR_MAX = 0x22C
OFF_KERNEL_ALIGNMENT = 0x230
OFF_RELOCATABLE = 0x234
OFF_XLOADFLAGS = 0x236
OFF_CMDLINE_SIZE = 0x238
OFF_PAYLOAD_OFFSET = 0x248
OFF_PAYLOAD_LENGTH = 0x24C
OFF_PREF_ADDRESS = 0x258
OFF_INIT_SIZE = 0x260
# struct boot_params (arch/x86/include/uapi/asm/bootparam.h)
BP_EXT_RAMDISK_IMAGE = 0x0C0
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_E820_TABLE = 0x2D0
BP_SIZE = 0x1000
E820_MAX_ENTRIES = 128
E820_RAM = 1
E820_RESERVED = 2

LOADED_HIGH = 0x01
CAN_USE_HEAP = 0x80
XLF_KERNEL_64 = 0x01
MIN_VERSION = 0x020C      # 2.12: xloadflags, 64-bit entry (boot.rst, "64-bit BOOT PROTOCOL")
LOADER_UNDEFINED = 0xFF   # type_of_loader for a boot loader without an assigned id
ENTRY_64_OFFSET = 0x200   # startup_64 relative to the protected-mode kernel's load address

# Low memory pyvm reports (and PC firmware would own): the EBDA and the BIOS area.
EBDA_START = 0x9FC00
BIOS_START = 0xF0000
HIGH_MEMORY = 0x100000


class BootProtocolError(ValueError):
    """The image is not a bzImage pyvm can boot; the message says why."""


@dataclass(frozen=True)
class SetupHeader:
    """The fields of a bzImage's setup header that the loader needs."""

    raw: bytes               # the header bytes, 0x1f1 up to its end, copied into boot_params
    setup_sects: int
    version: int
    loadflags: int
    xloadflags: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable: bool
    cmdline_size: int
    payload_offset: int
    payload_length: int
    pref_address: int
    init_size: int

    @property
    def setup_size(self) -> int:
        return (self.setup_sects + 1) * 512


def is_bzimage(image: bytes) -> bool:
    return len(image) >= 0x264 and image[OFF_HEADER:OFF_HEADER + 4] == b"HdrS"


def parse_setup_header(image: bytes) -> SetupHeader:
    if not is_bzimage(image):
        raise BootProtocolError("not a Linux bzImage (no 'HdrS' setup header)")
    def u8(off: int) -> int:
        return image[off]

    def u16(off: int) -> int:
        return int(struct.unpack_from("<H", image, off)[0])

    def u32(off: int) -> int:
        return int(struct.unpack_from("<I", image, off)[0])

    version = u16(OFF_VERSION)
    if version < MIN_VERSION:
        raise BootProtocolError(f"boot protocol {version >> 8}.{version & 0xFF} is too old "
                                f"(pyvm needs 2.12 or later, for the 64-bit entry)")
    if u16(OFF_BOOT_FLAG) != 0xAA55:
        raise BootProtocolError("bad boot_flag in the setup header")
    # "The end of setup header can be calculated as: 0x0202 + byte value at offset 0x0201"
    end = OFF_HEADER + u8(OFF_JUMP + 1)
    setup_sects = u8(OFF_SETUP_SECTS) or 4
    hdr = SetupHeader(
        raw=bytes(image[HDR_START:end]), setup_sects=setup_sects, version=version,
        loadflags=u8(OFF_LOADFLAGS), xloadflags=u16(OFF_XLOADFLAGS),
        initrd_addr_max=u32(OFF_INITRD_ADDR_MAX), kernel_alignment=u32(OFF_KERNEL_ALIGNMENT),
        relocatable=bool(u8(OFF_RELOCATABLE)), cmdline_size=u32(OFF_CMDLINE_SIZE),
        payload_offset=u32(OFF_PAYLOAD_OFFSET), payload_length=u32(OFF_PAYLOAD_LENGTH),
        pref_address=struct.unpack_from("<Q", image, OFF_PREF_ADDRESS)[0],
        init_size=u32(OFF_INIT_SIZE))
    if not hdr.loadflags & LOADED_HIGH:
        raise BootProtocolError("a zImage (loaded low) is not supported; use a bzImage")
    if not hdr.xloadflags & XLF_KERNEL_64:
        raise BootProtocolError("the kernel has no 64-bit entry point (XLF_KERNEL_64)")
    if hdr.setup_size + hdr.payload_offset + hdr.payload_length > len(image):
        raise BootProtocolError("the payload runs past the end of the image")
    return hdr


def payload(image: bytes, hdr: SetupHeader) -> bytes:
    start = hdr.setup_size + hdr.payload_offset
    return bytes(image[start:start + hdr.payload_length])


def payload_format(data: bytes) -> str:
    """The compression of a payload, by magic (arch/x86/boot/compressed/Makefile)."""
    magics = ((b"\x1f\x8b", "gzip"), (b"\xfd7zXZ\x00", "xz"), (b"\x5d\x00\x00", "lzma"),
              (b"\x28\xb5\x2f\xfd", "zstd"), (b"BZh", "bzip2"), (b"\x89LZO", "lzo"),
              (b"\x02\x21\x4c\x18", "lz4"))
    for magic, name in magics:
        if data.startswith(magic):
            return name
    return "unknown"


def _zstd_decompress(data: bytes) -> bytes | None:
    try:
        import zstandard    # deferred: only a zstd-compressed kernel needs it
    except ImportError:
        return None
    dobj = zstandard.ZstdDecompressor().decompressobj()
    return bytes(dobj.decompress(data))


def decompress_payload(data: bytes) -> bytes | None:
    """The uncompressed ``vmlinux`` ELF, or None when Python cannot read the format.

    The kernel's build appends the uncompressed length as a little-endian 32-bit word
    (gzip's own trailer ends with it too); the result is checked against it.
    """
    fmt = payload_format(data)
    try:
        if fmt == "gzip":
            out = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)
        elif fmt in ("xz", "lzma"):
            out = lzma.LZMADecompressor(lzma.FORMAT_XZ if fmt == "xz" else lzma.FORMAT_ALONE) \
                .decompress(data)
        elif fmt == "zstd":
            res = _zstd_decompress(data[:-4])
            if res is None:
                return None
            out = res
        else:
            return None
    except (lzma.LZMAError, zlib.error, ValueError) as err:
        raise BootProtocolError(f"the {fmt} payload does not decompress: {err}") from err
    if len(data) >= 4 and struct.unpack_from("<I", data, len(data) - 4)[0] != len(out) & 0xFFFFFFFF:
        raise BootProtocolError(f"the {fmt} payload decompresses to {len(out)} bytes, "
                                "not the length the kernel recorded")
    if not out.startswith(b"\x7fELF"):
        return None
    return out


def e820_map(ram_size: int) -> list[tuple[int, int, int]]:
    """(address, size, type) entries for a PC with ``ram_size`` bytes of RAM from 0."""
    if ram_size <= HIGH_MEMORY:
        raise BootProtocolError("Linux needs more than 1 MiB of RAM")
    return [(0, EBDA_START, E820_RAM),
            (EBDA_START, 0xA0000 - EBDA_START, E820_RESERVED),
            (BIOS_START, HIGH_MEMORY - BIOS_START, E820_RESERVED),
            (HIGH_MEMORY, ram_size - HIGH_MEMORY, E820_RAM)]


def initrd_address(hdr: SetupHeader, ram_size: int, initrd_size: int, kernel_end: int) -> int:
    """Where the initrd goes: as high as possible below ``initrd_addr_max`` and the end of
    RAM, page aligned (boot.rst, "initrd_addr_max"), above the kernel's memory."""
    limit = min(hdr.initrd_addr_max + 1, ram_size)
    addr = (limit - initrd_size) & ~0xFFF
    if addr < kernel_end:
        raise BootProtocolError(f"the initrd ({initrd_size} bytes) does not fit between the "
                                f"kernel's end at {kernel_end:#x} and {limit:#x}: use a larger -m")
    return addr


def build_boot_params(hdr: SetupHeader, ram_size: int, cmdline_addr: int,
                      initrd: tuple[int, int] | None = None) -> bytes:
    """The zero page: the image's setup header plus what a boot loader fills in."""
    bp = bytearray(BP_SIZE)
    bp[HDR_START:HDR_START + len(hdr.raw)] = hdr.raw
    struct.pack_into("<H", bp, OFF_VID_MODE, 0xFFFF)           # "normal" video mode
    bp[OFF_TYPE_OF_LOADER] = LOADER_UNDEFINED
    bp[OFF_LOADFLAGS] = (hdr.loadflags | LOADED_HIGH) & ~CAN_USE_HEAP
    struct.pack_into("<I", bp, OFF_CMD_LINE_PTR, cmdline_addr & 0xFFFFFFFF)
    struct.pack_into("<I", bp, BP_EXT_CMD_LINE_PTR, cmdline_addr >> 32)
    if initrd is not None:
        addr, size = initrd
        struct.pack_into("<I", bp, OFF_RAMDISK_IMAGE, addr & 0xFFFFFFFF)
        struct.pack_into("<I", bp, OFF_RAMDISK_SIZE, size & 0xFFFFFFFF)
        struct.pack_into("<I", bp, BP_EXT_RAMDISK_IMAGE, addr >> 32)
        struct.pack_into("<I", bp, BP_EXT_RAMDISK_SIZE, size >> 32)
    entries = e820_map(ram_size)
    bp[BP_E820_ENTRIES] = len(entries)
    for i, (addr, size, kind) in enumerate(entries):
        struct.pack_into("<QQI", bp, BP_E820_TABLE + 20 * i, addr, size, kind)
    return bytes(bp)


def synthetic_header() -> SetupHeader:
    """A setup header for a bare ``vmlinux`` ELF, which has none: what a 2.15 bzImage of
    a relocatable 64-bit kernel declares (boot.rst field defaults)."""
    raw = bytearray(0x268 - HDR_START)

    def at(off: int) -> int:
        return off - HDR_START

    struct.pack_into("<H", raw, at(OFF_BOOT_FLAG), 0xAA55)
    struct.pack_into("<B", raw, at(OFF_JUMP + 1), 0x268 - OFF_HEADER)
    raw[at(OFF_HEADER):at(OFF_HEADER) + 4] = b"HdrS"
    struct.pack_into("<H", raw, at(OFF_VERSION), 0x020F)
    raw[at(OFF_LOADFLAGS)] = LOADED_HIGH
    struct.pack_into("<I", raw, at(OFF_INITRD_ADDR_MAX), 0x7FFFFFFF)
    struct.pack_into("<I", raw, at(OFF_KERNEL_ALIGNMENT), 0x200000)
    struct.pack_into("<H", raw, at(OFF_XLOADFLAGS), XLF_KERNEL_64)
    struct.pack_into("<I", raw, at(OFF_CMDLINE_SIZE), 2047)
    return SetupHeader(raw=bytes(raw), setup_sects=0, version=0x020F, loadflags=LOADED_HIGH,
                       xloadflags=XLF_KERNEL_64, initrd_addr_max=0x7FFFFFFF,
                       kernel_alignment=0x200000, relocatable=False, cmdline_size=2047,
                       payload_offset=0, payload_length=0, pref_address=0x1000000, init_size=0)
