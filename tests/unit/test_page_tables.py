"""info tlb / info mem walks over hand-built page tables (no VM)."""

from __future__ import annotations

import struct

from pyvm.page_tables import mem_text, tlb_text

CR0_PG = 1 << 31


def _mem(size: int = 1 << 20) -> tuple[bytearray, object]:
    ram = bytearray(size)

    def read(addr: int, n: int) -> bytes:
        if addr + n > len(ram):
            raise ValueError("not RAM")
        return bytes(ram[addr:addr + n])
    return ram, read


def test_32bit_two_level_and_4m_page() -> None:
    ram, read = _mem()
    pd, pt = 0x10000, 0x11000
    struct.pack_into("<I", ram, pd + 0 * 4, pt | 0x7)                # user, rw, present
    struct.pack_into("<I", ram, pt + 1 * 4, 0x5000 | 0x1 | 0x20)     # ro, accessed
    struct.pack_into("<I", ram, pt + 2 * 4, 0x6000 | 0x3)            # rw, supervisor
    struct.pack_into("<I", ram, pd + 2 * 4, 0x00800000 | 0x83)       # 4 MiB page
    text = tlb_text(read, CR0_PG | 1, pd, 1 << 4, 0)
    assert text.splitlines() == [
        "0000000000001000: 0000000000005000 ----A----",
        "0000000000002000: 0000000000006000 --------W",
        "0000000000800000: 0000000000800000 --P-----W",
    ]
    assert mem_text(read, CR0_PG | 1, pd, 1 << 4, 0).splitlines() == [
        "0000000000001000-0000000000002000 0000000000001000 -r-",
        "0000000000002000-0000000000003000 0000000000001000 -rw",
        "0000000000800000-0000000000c00000 0000000000400000 -rw",
    ]


def test_paging_off_and_missing_tables() -> None:
    _, read = _mem()
    assert tlb_text(read, 1, 0, 0, 0) == "PG disabled\n"
    # CR3 beyond RAM: nothing present, nothing printed
    assert tlb_text(read, CR0_PG | 1, 0x7FFFF000, 0, 0) == ""
