"""Dirty tracking in the vCPU's TLB fill (pyvm/_tlbtrack.pyx, pyvm/tlb_tracking.py).

Every test compares the tracker's report with what really changed: a before/after diff of
all of RAM around each guest run, page tables included (the page walk writes their
accessed and dirty bits).  A page that changed and was not reported is a failure; so is
a reported page that is neither a store's target nor a paging-structure page.

- stores under 32-bit, PAE and 4-level paging, with 4 KiB and large pages;
- a page first read (its TLB entry made read-only) and then written in the same round;
- the same pages written from ring 3 and ring 0 (two TLBs of the engine);
- stores with the TLB already warm from the previous round (the sync must re-arm it);
- a machine's dirty logging picks the method, and the Linux-free guest's writes are seen.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from unicorn import x86_const as X

from pyvm.ram import MemoryBackend, MemoryBackendConfig
from tests.paging_guest import (CODE, DATA_PHYS, PAGE, RAM, TABLES, VBASE, collect_until, engine,
                                map_pages, store)

tlb_tracking = pytest.importorskip("pyvm.tlb_tracking")
_fastpath = pytest.importorskip("pyvm._fastpath")
if tlb_tracking._native is None:                         # pragma: no cover
    pytest.skip("the TLB tracker extension is not built", allow_module_level=True)


@dataclass
class _Block:
    """What the tracker needs of a RAM block."""

    gpa: int
    size: int
    host_address: int
    dirty: Any


def _setup(mode: str, seed: str, npick: int = 400) -> tuple[Any, Any, Any, list[int], list[int], Any]:
    b = MemoryBackend(MemoryBackendConfig("memory-backend-ram", "pc.ram", RAM))
    rng = random.Random(seed)
    ppages = rng.sample(range(DATA_PHYS // PAGE, RAM // PAGE), npick)
    vpages = [VBASE // PAGE + i * 3 + rng.randrange(3) for i in range(npick)]
    cr3 = map_pages(mode, b.view, [v * PAGE for v in vpages], [p * PAGE for p in ppages])
    uc = engine(mode, b.view, b.host_address, cr3)
    block = _Block(0, RAM, b.host_address, _fastpath.DirtyBitmap(RAM // PAGE))
    return b, uc, block, vpages, ppages, rng


def _run(uc: Any, ram: np.ndarray, block: _Block, code: bytes) -> tuple[set[int], set[int]]:
    """Run ``code`` (ending in HLT); (pages that changed, pages reported)."""
    ram[CODE:CODE + len(code)] = np.frombuffer(code, dtype=np.uint8)
    block.dirty.fetch_and_clear()                     # the code write is not the guest's
    before = ram.copy()
    uc.emu_start(CODE, CODE + len(code) - 1)
    diff = {int(p) for p in np.flatnonzero((ram != before).reshape(-1, PAGE).any(axis=1))}
    got = {int(p) for p in _fastpath.bitmap_to_indices(block.dirty.fetch_and_clear(), RAM // PAGE)}
    return diff, got


def _load(addr: int, wide: bool) -> bytes:
    if wide:    # mov eax, [abs32]
        return b"\x8b\x04\x25" + struct.pack("<i", addr - (1 << 32) if addr >= 1 << 31 else addr)
    return b"\xa1" + struct.pack("<I", addr)


TABLE_PAGES = set(range(TABLES // PAGE, 0x40))


@pytest.mark.parametrize("mode", ["32bit", "pae", "long"])
def test_every_page_the_guest_writes_is_reported(mode: str) -> None:
    b, uc, block, vpages, ppages, rng = _setup(mode, f"tlb-{mode}")
    tracking = tlb_tracking.TlbTracking([uc], [block])
    tracking.attach()
    wide = mode == "long"
    try:
        for round_ in range(8):
            picks = rng.sample(range(len(vpages)), rng.randint(1, 150))
            parts = []
            for i in picks:
                addr = vpages[i] * PAGE + rng.randrange(0, PAGE - 3, 4)
                # half the pages are read first: their entry is made without write access
                if rng.random() < 0.5:
                    parts.append(_load(addr, wide))
                parts.append(store(addr, 1000 * round_ + i + 1, wide))
            reads = [vpages[i] * PAGE for i in rng.sample(range(len(vpages)), 40)]
            code = b"".join(parts) + b"".join(_load(a, wide) for a in reads) + b"\xf4"
            diff, got = _run(uc, b.view, block, code)
            stored = {ppages[i] for i in picks}
            assert stored <= diff, "the guest did not store where the test meant"
            assert diff <= got, f"missed pages {sorted(diff - got)}"
            assert got - stored <= TABLE_PAGES, f"reported pages nobody wrote {sorted(got - stored - TABLE_PAGES)}"
        stats = tracking.stats
        assert stats["misses"] == 0
        assert stats["read_only"] > 0 and stats["store_fills"] > 0
    finally:
        tracking.detach()
        uc.mem_unmap(0, RAM)
        b.close()


@pytest.mark.parametrize("mode", ["32bit", "long"])
def test_a_warm_tlb_is_rearmed_at_each_sync(mode: str) -> None:
    """The same pages, stored to in every round: without the flush at the sync the TLB
    would still hold writable entries and round 2 on would report nothing."""
    b, uc, block, vpages, ppages, rng = _setup(mode, f"warm-{mode}", npick=64)
    tracking = tlb_tracking.TlbTracking([uc], [block])
    tracking.attach()
    wide = mode == "long"
    try:
        for round_ in range(5):
            code = b"".join(store(v * PAGE + 8 * round_, round_ + 1, wide) for v in vpages) + b"\xf4"
            diff, got = _run(uc, b.view, block, code)
            assert set(ppages) <= diff <= got
        with pytest.raises(RuntimeError, match="off the vCPU loop"):
            import threading
            err: list[BaseException] = []

            def off_loop() -> None:
                try:
                    block.dirty.fetch_and_clear()
                except BaseException as e:  # noqa: BLE001 - re-raised below
                    err.append(e)
            t = threading.Thread(target=off_loop)
            t.start()
            t.join()
            raise err[0]
    finally:
        tracking.detach()
        uc.mem_unmap(0, RAM)
        b.close()


def _large_page_tables(ram: np.ndarray, mode: str) -> int:
    """Identity-map [0, 64 MiB) with 4 MiB (32-bit, PSE) or 2 MiB (long mode) pages."""
    root = TABLES
    ram[root:root + 3 * PAGE] = 0
    if mode == "32bit":
        for i in range(16):
            ram[root + 4 * i:root + 4 * i + 4] = np.frombuffer(
                struct.pack("<I", (i << 22) | 0x83), dtype=np.uint8)      # P RW PS
        return root
    pdpt, pd = root + PAGE, root + 2 * PAGE
    ram[root:root + 8] = np.frombuffer(struct.pack("<Q", pdpt | 3), dtype=np.uint8)
    ram[pdpt:pdpt + 8] = np.frombuffer(struct.pack("<Q", pd | 3), dtype=np.uint8)
    for i in range(32):
        ram[pd + 8 * i:pd + 8 * i + 8] = np.frombuffer(
            struct.pack("<Q", (i << 21) | 0x83), dtype=np.uint8)
    return root


@pytest.mark.parametrize("mode", ["32bit", "long"])
def test_large_pages(mode: str) -> None:
    b = MemoryBackend(MemoryBackendConfig("memory-backend-ram", "pc.ram", RAM))
    cr3 = _large_page_tables(b.view, mode)
    uc = engine(mode, b.view, b.host_address, cr3)
    if mode == "32bit":
        uc.reg_write(X.UC_X86_REG_CR4, 1 << 4)                          # PSE
    block = _Block(0, RAM, b.host_address, _fastpath.DirtyBitmap(RAM // PAGE))
    tracking = tlb_tracking.TlbTracking([uc], [block])
    tracking.attach()
    rng = random.Random(mode)
    wide = mode == "long"
    try:
        for round_ in range(4):
            pages = rng.sample(range(DATA_PHYS // PAGE, RAM // PAGE), 100)
            code = b"".join(store(p * PAGE + 4 * round_, round_ + 7, wide) for p in pages) + b"\xf4"
            diff, got = _run(uc, b.view, block, code)
            assert set(pages) <= diff <= got
            assert got - set(pages) <= TABLE_PAGES
        assert tracking.stats["misses"] == 0
    finally:
        tracking.detach()
        uc.mem_unmap(0, RAM)
        b.close()


def test_user_and_kernel_stores_to_the_same_pages() -> None:
    """Ring 3 and ring 0 have TLBs of their own: each must be re-armed and each reports."""
    from pyvm.unicorn_internals import HF_CPL_MASK, ContextAccess

    b, uc, block, vpages, ppages, rng = _setup("long", "rings", npick=32)
    ram = b.view
    for off in range(TABLES, TABLES + 64 * PAGE, 8):         # U/S on every paging entry
        e = int.from_bytes(ram[off:off + 8].tobytes(), "little")
        if e & 1:
            ram[off:off + 8] = np.frombuffer(struct.pack("<Q", e | 4), dtype=np.uint8)
    ctx = ContextAccess(uc)
    tracking = tlb_tracking.TlbTracking([uc], [block])
    tracking.attach()
    try:
        for round_ in range(6):
            cpl = 3 if round_ % 2 else 0
            ctx.write("hflags", (ctx.read("hflags") & ~HF_CPL_MASK) | cpl)
            code = b"".join(store(v * PAGE + 4 * round_, round_ + 1, True) for v in vpages) + b"\xf4"
            diff, got = _run(uc, ram, block, code)           # stops before the HLT
            assert set(ppages) <= diff <= got, f"round {round_} (CPL {cpl})"
        assert tracking.stats["misses"] == 0
    finally:
        tracking.detach()
        ctx.close()
        uc.mem_unmap(0, RAM)
        b.close()


def test_machine_dirty_log_uses_the_tlb() -> None:
    from pyvm.config import MachineConfig
    from pyvm.guests import guest_path
    from pyvm.machine import Machine

    m = Machine(MachineConfig(ram_size=8 << 20, kernel=guest_path("store-loop.elf"),
                              append="start=2 size=4", serial=["null"], start_paused=True))
    try:
        m.start()
        block = next(iter(m.ram))
        m.start_dirty_log([block])
        assert m.dirty_tracking_method == "tlb"
        first = _fastpath.bitmap_to_indices(m.run_on_loop(block.dirty.fetch_and_clear), block.npages)
        assert len(first) == block.npages          # round 1: everything
        m.cont()
        want = set(range((2 << 20) // PAGE, (6 << 20) // PAGE))    # the guest's 4 MiB range
        for _ in range(3):                         # every pass of the guest, round after round
            assert want <= collect_until(m, block, want)
        m.stop()
        m.stop_dirty_log()
        assert m.dirty_tracking_method is None and block.dirty.host_tracker is None
    finally:
        m.request_exit(0)
        m.close()
        m.ram.close()
