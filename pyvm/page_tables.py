"""The guest's page tables, walked from CR3: ``info tlb`` and ``info mem``.

A pure function of the control registers and a physical-memory reader, laid out as
QEMU's target/i386/monitor.c prints them (``tlb_info_32``, ``tlb_info_pae32``,
``tlb_info_la48``, ``mem_info_*``): one line per present leaf entry for ``info tlb``,
one line per run of pages with the same user/write rights for ``info mem``.  Paging
structures are those of the Intel SDM Vol. 3, 4.3 (32-bit), 4.4 (PAE) and 4.5 (4-level).
"""

from __future__ import annotations

from typing import Callable, Iterator, NamedTuple

ReadPhys = Callable[[int, int], bytes]

PG_PRESENT = 1 << 0
PG_RW = 1 << 1
PG_USER = 1 << 2
PG_PWT = 1 << 3
PG_PCD = 1 << 4
PG_ACCESSED = 1 << 5
PG_DIRTY = 1 << 6
PG_PSE = 1 << 7
PG_GLOBAL = 1 << 8
PG_NX = 1 << 63
PROT_MASK = PG_USER | PG_RW | PG_PRESENT
CR0_PG = 1 << 31
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12
EFER_LMA = 1 << 10
ADDR_MASK = 0x3FFFFFFFFF000


class Leaf(NamedTuple):
    """One present translation: ``size`` bytes at ``linear``, its entry and rights."""

    linear: int
    size: int
    pte: int
    mask: int       # the bits of ``pte`` QEMU prints as the physical address
    prot: int       # user/rw/present, ANDed over the levels


def _entry(read: ReadPhys, addr: int, width: int) -> int:
    try:
        return int.from_bytes(read(addr, width), "little")
    except ValueError:
        return 0                        # outside RAM reads as not present


def _walk_32(read: ReadPhys, cr3: int, cr4: int) -> Iterator[Leaf]:
    pgd = cr3 & ~0xFFF & 0xFFFFFFFF
    for l1 in range(1024):
        pde = _entry(read, pgd + l1 * 4, 4)
        if not pde & PG_PRESENT:
            continue
        if pde & PG_PSE and cr4 & CR4_PSE:
            yield Leaf(l1 << 22, 1 << 22, pde, ~((1 << 21) - 1), pde & PROT_MASK)
            continue
        for l2 in range(1024):
            pte = _entry(read, (pde & ~0xFFF) + l2 * 4, 4)
            if pte & PG_PRESENT:
                yield Leaf((l1 << 22) + (l2 << 12), 1 << 12, pte & ~PG_PSE, ~0xFFF,
                           pte & pde & PROT_MASK)


def _walk_pae32(read: ReadPhys, cr3: int) -> Iterator[Leaf]:
    pdp = cr3 & ~0x1F
    for l1 in range(4):
        pdpe = _entry(read, pdp + l1 * 8, 8)
        if not pdpe & PG_PRESENT:
            continue
        pd = pdpe & ADDR_MASK
        for l2 in range(512):
            pde = _entry(read, pd + l2 * 8, 8)
            if not pde & PG_PRESENT:
                continue
            base = (l1 << 30) + (l2 << 21)
            if pde & PG_PSE:
                yield Leaf(base, 1 << 21, pde, ~((1 << 20) - 1), pde & PROT_MASK)
                continue
            pt = pde & ADDR_MASK
            for l3 in range(512):
                pte = _entry(read, pt + l3 * 8, 8)
                if pte & PG_PRESENT:
                    yield Leaf(base + (l3 << 12), 1 << 12, pte & ~PG_PSE, ~0xFFF,
                               pte & pde & PROT_MASK)


def _walk_la48(read: ReadPhys, cr3: int) -> Iterator[Leaf]:
    pml4 = cr3 & ADDR_MASK
    for l1 in range(512):
        pml4e = _entry(read, pml4 + l1 * 8, 8)
        if not pml4e & PG_PRESENT:
            continue
        pdp = pml4e & ADDR_MASK
        for l2 in range(512):
            pdpe = _entry(read, pdp + l2 * 8, 8)
            if not pdpe & PG_PRESENT:
                continue
            a2 = (l1 << 39) + (l2 << 30)
            if pdpe & PG_PSE:
                yield Leaf(a2, 1 << 30, pdpe, 0x3FFFFC0000000, pdpe & pml4e & PROT_MASK)
                continue
            pd = pdpe & ADDR_MASK
            for l3 in range(512):
                pde = _entry(read, pd + l3 * 8, 8)
                if not pde & PG_PRESENT:
                    continue
                a3 = a2 + (l3 << 21)
                if pde & PG_PSE:
                    yield Leaf(a3, 1 << 21, pde, 0x3FFFFFFE00000,
                               pde & pdpe & pml4e & PROT_MASK)
                    continue
                pt = pde & ADDR_MASK
                for l4 in range(512):
                    pte = _entry(read, pt + l4 * 8, 8)
                    if pte & PG_PRESENT:
                        yield Leaf(a3 + (l4 << 12), 1 << 12, pte & ~PG_PSE, ADDR_MASK,
                                   pte & pde & pdpe & pml4e & PROT_MASK)


def leaves(read: ReadPhys, cr0: int, cr3: int, cr4: int, efer: int) -> Iterator[Leaf]:
    """Every present translation in linear-address order (paging must be on)."""
    if cr4 & CR4_PAE:
        if efer & EFER_LMA:
            if cr4 & CR4_LA57:
                raise ValueError("5-level paging is not supported by pyvm's CPU")
            return _walk_la48(read, cr3)
        return _walk_pae32(read, cr3)
    return _walk_32(read, cr3, cr4)


def _canonical(addr: int, lma: bool) -> int:
    """monitor.c addr_canonical: sign-extend bit 47 in long mode."""
    if lma and addr & (1 << 47):
        addr |= ~((1 << 48) - 1)
    return addr & ((1 << 64) - 1)


def tlb_text(read: ReadPhys, cr0: int, cr3: int, cr4: int, efer: int) -> str:
    """``info tlb``."""
    if not cr0 & CR0_PG:
        return "PG disabled\n"
    lma = bool(efer & EFER_LMA)
    out = []
    for leaf in leaves(read, cr0, cr3, cr4, efer):
        p = leaf.pte
        flags = "".join(ch if p & bit else "-" for ch, bit in (
            ("X", PG_NX), ("G", PG_GLOBAL), ("P", PG_PSE), ("D", PG_DIRTY),
            ("A", PG_ACCESSED), ("C", PG_PCD), ("T", PG_PWT), ("U", PG_USER), ("W", PG_RW)))
        out.append("%016x: %016x %s\n" % (_canonical(leaf.linear, lma),
                                          p & leaf.mask & ((1 << 64) - 1), flags))
    return "".join(out)


def mem_text(read: ReadPhys, cr0: int, cr3: int, cr4: int, efer: int) -> str:
    """``info mem``: runs of contiguous pages with equal rights."""
    if not cr0 & CR0_PG:
        return "PG disabled\n"
    lma = bool(efer & EFER_LMA)
    out = []
    start = end = -1
    prot = 0

    def flush() -> None:
        if start >= 0:
            out.append("%016x-%016x %016x %s%s%s\n" % (
                _canonical(start, lma), _canonical(end, lma), end - start,
                "u" if prot & PG_USER else "-", "r", "w" if prot & PG_RW else "-"))

    for leaf in leaves(read, cr0, cr3, cr4, efer):
        if leaf.linear == end and leaf.prot == prot:
            end += leaf.size
            continue
        flush()
        start, end, prot = leaf.linear, leaf.linear + leaf.size, leaf.prot
    flush()
    return "".join(out)
