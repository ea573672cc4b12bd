"""Host write tracking (userfaultfd write-protect + PAGEMAP_SCAN): every written page is
reported, by the native tracker and its pure-Python twin alike.

- host writes into every RAM backend kind (ram, ram share=on, memfd, file share=on);
- vCPU stores under 32-bit paging, PAE paging and long mode (4-level) paging, the report
  of each sync compared with a before/after diff of all RAM (page tables included, since
  the CPU writes their accessed/dirty bits);
- syncs from another thread while the vCPU stores: no page is lost;
- a machine's dirty logging (what precopy uses) picks it and reports what it must.
"""

from __future__ import annotations

import random
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import unicorn as U
from unicorn import x86_const as X

from pyvm import fastpath_py
from pyvm.fastpath import track_host_writes
from pyvm.ram import MemoryBackend, MemoryBackendConfig
from tests.paging_guest import (CODE, DATA_PHYS, PAGE, RAM, TABLES, VBASE, collect_until, engine,
                                map_pages, store)

try:
    from pyvm import _fastpath
except ImportError:  # pragma: no cover - test_fastpath.py reports a missing build
    _fastpath = None

IMPLS = [pytest.param(fastpath_py, id="python"),
         pytest.param(_fastpath, id="cython",
                      marks=pytest.mark.skipif(_fastpath is None, reason="extension not built"))]

def _available() -> bool:
    b = MemoryBackend(MemoryBackendConfig("memory-backend-ram", "probe", 16 * PAGE))
    try:
        t = track_host_writes(fastpath_py.DirtyBitmap(16), b.host_address, b.cfg.size,
                              implementation=fastpath_py)
        if t is None:
            return False
        t.detach()
        return True
    finally:
        b.close()


pytestmark = pytest.mark.skipif(not _available(),
                                reason="userfaultfd asynchronous write-protect not available")


def _backend(kind: str, tmp_path: Path, size: int) -> MemoryBackend:
    if kind == "ram":
        cfg = MemoryBackendConfig("memory-backend-ram", "m", size)
    elif kind == "ram-shared":
        cfg = MemoryBackendConfig("memory-backend-ram", "m", size, share=True)
    elif kind == "memfd":
        cfg = MemoryBackendConfig("memory-backend-memfd", "m", size, share=True)
    elif kind == "file-shm":
        cfg = MemoryBackendConfig("memory-backend-file", "m", size, share=True,
                                  mem_path=f"/dev/shm/pyvm-test-{tmp_path.name}")
    else:
        cfg = MemoryBackendConfig("memory-backend-file", "m", size, share=True,
                                  mem_path=str(tmp_path / "ram.img"))
    return MemoryBackend(cfg)


def _indices(impl, words, n) -> list[int]:
    return [int(i) for i in impl.bitmap_to_indices(words, n)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["ram", "ram-shared", "memfd", "file-shm", "file-disk"])
@pytest.mark.parametrize("prealloc", [False, True], ids=["fresh", "populated"])
def test_host_writes_are_reported_exactly(impl, kind: str, prealloc: bool, tmp_path: Path) -> None:
    npages = 300
    b = _backend(kind, tmp_path, npages * PAGE)
    try:
        if prealloc:
            b.view[::PAGE] = 1
        bm = impl.DirtyBitmap(npages)
        tracker = impl.HostWriteTracker(bm, b.host_address, b.cfg.size)
        try:
            assert _indices(impl, bm.fetch_and_clear(), npages) == []
            rng = random.Random(hash((kind, prealloc)) & 0xFFFF)
            for round_ in range(4):
                written: set[int] = set()
                for _ in range(rng.randint(1, 60)):
                    off = rng.randrange(npages * PAGE - 9000)
                    length = rng.choice((1, 8, 4096, 9000))
                    b.view[off:off + length] = (round_ + 2) & 0xFF
                    written.update(range(off // PAGE, (off + length - 1) // PAGE + 1))
                bm.mark_range(0, 1)                 # a writer that marks by itself adds to it
                assert _indices(impl, bm.fetch_and_clear(), npages) == sorted(written | {0})
                assert _indices(impl, bm.fetch_and_clear(), npages) == []
            b.view[5 * PAGE] = 9
        finally:
            tracker.detach()
        # written after the last sync: detach leaves it in the bitmap
        assert _indices(impl, bm.fetch_and_clear(), npages) == [5]
        assert bm.host_tracker is None
        b.view[7 * PAGE] = 9                        # no longer tracked, and no fault either
        assert _indices(impl, bm.fetch_and_clear(), npages) == []
    finally:
        b.close()
        if kind == "file-shm":
            Path(f"/dev/shm/pyvm-test-{tmp_path.name}").unlink(missing_ok=True)


def test_twins_report_the_same_pages() -> None:
    if _fastpath is None:
        pytest.skip("extension not built")
    npages = 1000
    got = []
    for impl in (fastpath_py, _fastpath):
        b = MemoryBackend(MemoryBackendConfig("memory-backend-ram", "m", npages * PAGE))
        bm = impl.DirtyBitmap(npages)
        t = impl.HostWriteTracker(bm, b.host_address, b.cfg.size)
        rng = np.random.default_rng(5)
        rounds = []
        for _ in range(3):
            for p in rng.choice(npages, 200):
                b.view[int(p) * PAGE + int(rng.integers(PAGE))] = 1
            rounds.append(bm.fetch_and_clear().copy())
        t.detach()
        b.close()
        got.append(rounds)
    for a, c in zip(*got):
        assert (a == c).all()


# -- vCPU stores under paging ------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["32bit", "pae", "long"])
def test_every_page_the_guest_writes_between_syncs_is_reported(impl, mode: str) -> None:
    b = MemoryBackend(MemoryBackendConfig("memory-backend-ram", "pc.ram", RAM))
    ram = b.view
    npages = RAM // PAGE
    rng = random.Random(f"{mode}")
    ppages = rng.sample(range(DATA_PHYS // PAGE, npages), 600)
    vpages = [VBASE // PAGE + i * 3 + rng.randrange(3) for i in range(len(ppages))]
    cr3 = map_pages(mode, ram, [v * PAGE for v in vpages], [p * PAGE for p in ppages])
    uc = engine(mode, ram, b.host_address, cr3)
    bm = impl.DirtyBitmap(npages)
    tracker = impl.HostWriteTracker(bm, b.host_address, b.cfg.size)
    try:
        bm.fetch_and_clear()
        for round_ in range(6):
            picks = rng.sample(range(len(vpages)), rng.randint(1, 120))
            code = b"".join(store(vpages[i] * PAGE + rng.randrange(0, PAGE - 3, 4), 1000 * round_ + i + 1,
                                   mode == "long") for i in picks) + b"\xf4"
            ram[CODE:CODE + len(code)] = np.frombuffer(code, dtype=np.uint8)
            bm.fetch_and_clear()                    # the code write is not the guest's
            before = ram.copy()
            uc.emu_start(CODE, CODE + len(code) - 1)
            diff = np.flatnonzero((ram != before).reshape(-1, PAGE).any(axis=1))
            got = _indices(impl, bm.fetch_and_clear(), npages)
            assert set(diff) <= set(got), f"missed pages {sorted(set(diff) - set(got))}"
            assert {ppages[i] for i in picks} <= set(got)
            # nothing else: the stores, plus page-table pages whose A/D bits the CPU set
            assert set(got) - {ppages[i] for i in picks} <= set(range(TABLES // PAGE, 0x40))
    finally:
        tracker.detach()
        uc.mem_unmap(0, RAM)
        b.close()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["32bit", "long"])
def test_syncs_while_the_guest_writes_lose_nothing(impl, mode: str) -> None:
    """Another thread syncs as fast as it can while the vCPU stores into 600 pages over and
    over (each pass a new value): the union of every report covers every page that changed."""
    b = MemoryBackend(MemoryBackendConfig("memory-backend-ram", "pc.ram", RAM))
    ram = b.view
    npages = RAM // PAGE
    rng = random.Random(9)
    ppages = rng.sample(range(DATA_PHYS // PAGE, npages), 600)
    vpages = [VBASE // PAGE + i for i in range(len(ppages))]
    cr3 = map_pages(mode, ram, [v * PAGE for v in vpages], [p * PAGE for p in ppages])
    # ecx/rcx passes: for each page, store the pass number at a per-page offset
    wide = mode == "long"
    body = b""
    for i, v in enumerate(vpages):
        addr = v * PAGE + (i * 8) % PAGE
        body += (b"\x89\x0c\x25" + struct.pack("<i", addr)) if wide else (b"\x89\x0d" + struct.pack("<I", addr))
    # loop: mov [a], ecx ... ; dec ecx ; jnz loop ; hlt
    dec = b"\xff\xc9"
    jnz_back = -(len(body) + len(dec) + 6)
    code = body + dec + b"\x0f\x85" + struct.pack("<i", jnz_back) + b"\xf4"
    ram[CODE:CODE + len(code)] = np.frombuffer(code, dtype=np.uint8)
    uc = engine(mode, ram, b.host_address, cr3)
    uc.reg_write(X.UC_X86_REG_RCX if wide else X.UC_X86_REG_ECX, 400)
    bm = impl.DirtyBitmap(npages)
    tracker = impl.HostWriteTracker(bm, b.host_address, b.cfg.size)
    seen = np.zeros(npages, dtype=bool)
    stop = threading.Event()
    syncs = [0]

    def syncer() -> None:
        while not stop.is_set():
            seen[impl.bitmap_to_indices(bm.fetch_and_clear(), npages)] = True
            syncs[0] += 1

    try:
        bm.fetch_and_clear()
        before = ram.copy()
        t = threading.Thread(target=syncer)
        t.start()
        try:
            uc.emu_start(CODE, CODE + len(code) - 1)
        finally:
            stop.set()
            t.join()
        seen[impl.bitmap_to_indices(bm.fetch_and_clear(), npages)] = True
        changed = np.flatnonzero((ram != before).reshape(-1, PAGE).any(axis=1))
        assert len(changed) >= 600
        assert seen[changed].all(), f"missed {[int(p) for p in changed if not seen[p]][:10]}"
        assert syncs[0] >= 2
    finally:
        tracker.detach()
        uc.mem_unmap(0, RAM)
        b.close()


# -- the machine's dirty logging (what precopy's sync uses) ----------------------------------------
@pytest.mark.parametrize("kind", ["ram", "memfd", "file-shm"])
def test_machine_dirty_log_uses_host_write_protect(kind: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:

    from pyvm.config import MachineConfig
    from pyvm.guests import guest_path
    from pyvm.machine import Machine

    monkeypatch.setenv("PYVM_DIRTY_TRACKING", "host-wp")     # the TLB method is preferred
    size = 8 << 20
    shm = f"/dev/shm/pyvm-test-{tmp_path.name}"
    qom = {"ram": "memory-backend-ram", "memfd": "memory-backend-memfd",
           "file-shm": "memory-backend-file"}[kind]
    bcfg = MemoryBackendConfig(qom, "mem0", size, share=kind != "ram",
                               mem_path=shm if kind == "file-shm" else None)
    cfg = MachineConfig(ram_size=size, kernel=guest_path("store-loop.elf"),
                        append="start=2 size=4", serial=["null"], start_paused=True,
                        backends={"mem0": bcfg}, memory_backend="mem0")
    m = Machine(cfg)
    try:
        m.start()
        block = next(iter(m.ram))
        m.start_dirty_log([block])
        assert m.dirty_tracking_method == "host-wp"
        first = fastpath_py.bitmap_to_indices(block.dirty.fetch_and_clear(), block.npages)
        assert len(first) == block.npages          # round 1: everything
        m.cont()
        want = set(range((2 << 20) // PAGE, (6 << 20) // PAGE))    # the guest's 4 MiB range
        assert want <= collect_until(m, block, want)
        m.stop()
        m.stop_dirty_log()
        assert m.dirty_tracking_method is None and block.dirty.host_tracker is None
    finally:
        m.request_exit(0)
        m.close()
        m.ram.close()
        Path(shm).unlink(missing_ok=True)


def test_machine_falls_back_to_the_write_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    from pyvm.config import MachineConfig
    from pyvm.guests import guest_path
    from pyvm.machine import Machine

    monkeypatch.setenv("PYVM_DIRTY_TRACKING", "hook")
    m = Machine(MachineConfig(ram_size=8 << 20, kernel=guest_path("hello.elf"), serial=["null"],
                              start_paused=True))
    try:
        m.start()
        m.start_dirty_log(list(m.ram))
        assert m.dirty_tracking_method == "write-hook"
        m.stop_dirty_log()
    finally:
        m.request_exit(0)
        m.close()
        m.ram.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_protected_pages_never_populated_still_read_as_unpopulated(impl) -> None:
    """Write-protect puts markers into empty page table entries; the migration's zero-page
    shortcut (pagemap) must still see those pages as never populated."""
    from pyvm.ram import RamBlock

    block = RamBlock("pc.ram", 0, MemoryBackend(MemoryBackendConfig("memory-backend-ram", "r", 64 * PAGE)))
    try:
        block.mem[3 * PAGE] = 1
        if block.unpopulated() is None:
            pytest.skip("pagemap is not readable here")
        bm = impl.DirtyBitmap(64)
        t = impl.HostWriteTracker(bm, block.host_address, block.size)
        try:
            mask = block.unpopulated()
            assert mask is not None
            assert [i for i in range(64) if not mask[i]] == [3]
            block.mem[10 * PAGE] = 1
            bm.fetch_and_clear()
            mask = block.unpopulated()
            assert mask is not None
            assert [i for i in range(64) if not mask[i]] == [3, 10]
        finally:
            t.detach()
    finally:
        block.backend.close()
