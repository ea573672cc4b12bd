"""The native kernels and their pure-Python twin give identical answers.

The dirty bitmap is checked against a full before/after diff of guest RAM after random
store patterns executed by a real Unicorn vCPU, for both implementations.
"""

from __future__ import annotations

import ctypes
import mmap
import random
import struct
import threading

import numpy as np
import pytest
import unicorn as U

from pyvm import fastpath_py
from pyvm.fastpath import track_writes

try:
    from pyvm import _fastpath
except ImportError:  # pragma: no cover - the build must provide it; this test says so
    _fastpath = None

IMPLS = [pytest.param(fastpath_py, id="python"),
         pytest.param(_fastpath, id="cython",
                      marks=pytest.mark.skipif(_fastpath is None, reason="extension not built"))]

PAGE = 4096


def test_extension_is_built() -> None:
    # The README's set-up compiles it; a missing extension is a build failure, not a skip.
    assert _fastpath is not None, "pyvm._fastpath is not built"
    import importlib
    assert importlib.import_module("pyvm._pagestream").IMPLEMENTATION == "cython"


@pytest.mark.parametrize("impl", IMPLS)
def test_mark_and_fetch(impl) -> None:
    bm = impl.DirtyBitmap(200)
    bm.mark_range(0, 1)
    bm.mark_range(PAGE * 63, PAGE + 1)      # pages 63 and 64, across a word
    bm.mark_range(PAGE * 199 + 100, 10)
    got = impl.bitmap_to_indices(bm.fetch_and_clear(), 200)
    assert list(got) == [0, 63, 64, 199]
    assert bm.count() == 0
    with pytest.raises(ValueError):
        bm.mark_range(PAGE * 200, 1)


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_pages_and_compare(impl) -> None:
    rng = np.random.default_rng(1)
    buf = np.zeros(64 * PAGE, dtype=np.uint8)
    dirty = sorted(rng.choice(64, 20, replace=False))
    for p in dirty:
        buf[p * PAGE + int(rng.integers(PAGE))] = 1 + int(rng.integers(255))
    out = np.zeros(64, dtype=np.uint8)
    zeros = impl.find_zero_pages(buf, 0, 64, out)
    assert zeros == 44
    assert [i for i in range(64) if not out[i]] == dirty
    out2 = np.zeros(10, dtype=np.uint8)
    impl.find_zero_pages(buf, 30, 10, out2)
    assert list(out2) == list(out[30:40])
    assert impl.pages_equal(buf[:PAGE], buf[:PAGE].copy())
    other = buf[:PAGE].copy()
    other[PAGE - 1] ^= 0xFF
    assert not impl.pages_equal(buf[:PAGE], other)


def test_twins_agree_on_random_bitmaps() -> None:
    if _fastpath is None:
        pytest.skip("extension not built")
    rng = random.Random(7)
    for _ in range(50):
        n = rng.randint(1, 3000)
        a, b = fastpath_py.DirtyBitmap(n), _fastpath.DirtyBitmap(n)
        for _ in range(rng.randint(0, 40)):
            off = rng.randrange(n * PAGE)
            ln = rng.randint(1, min(3 * PAGE, n * PAGE - off))
            a.mark_range(off, ln)
            b.mark_range(off, ln)
        wa, wb = a.fetch_and_clear(), b.fetch_and_clear()
        assert (wa == wb).all()
        assert list(fastpath_py.bitmap_to_indices(wa, n)) == list(_fastpath.bitmap_to_indices(wb, n))


def _guest_with_stores(addresses: list[tuple[int, int, int]], code_at: int) -> bytes:
    """32-bit code: one ``mov [addr], imm`` per (addr, size, value), then ``hlt``."""
    code = b""
    for addr, size, value in addresses:
        if size == 4:
            code += b"\xc7\x05" + struct.pack("<II", addr, value)
        elif size == 2:
            code += b"\x66\xc7\x05" + struct.pack("<IH", addr, value)
        else:
            code += b"\xc6\x05" + struct.pack("<IB", addr, value)
    return code + b"\xf4"


@pytest.mark.parametrize("impl", IMPLS)
def test_bitmap_equals_ram_diff(impl) -> None:
    size = 4 << 20
    code_at = 0x1000
    rng = random.Random(42 if impl is fastpath_py else 43)
    mm = mmap.mmap(-1, size)
    anchor = ctypes.c_char.from_buffer(mm)
    ram = np.frombuffer(mm, dtype=np.uint8)
    try:
        uc = U.Uc(U.UC_ARCH_X86, U.UC_MODE_32)
        uc.mem_map_ptr(0, size, U.UC_PROT_ALL, ctypes.addressof(anchor))
        for round_ in range(5):
            stores = []
            used = set()
            for i in range(rng.randint(1, 300)):
                sz = rng.choice((1, 2, 4))
                addr = rng.randrange(0x10000, size - 4)
                if addr // PAGE in used and rng.random() < 0.5:
                    continue
                used.add(addr // PAGE)
                stores.append((addr, sz, (round_ * 1000 + i) % ((1 << (8 * sz)) - 1) + 1))
            # straddle a page boundary now and then
            stores.append((0x20000 - 2, 4, 0xA5A5A5A5))
            code = _guest_with_stores(stores, code_at)
            ram[code_at:code_at + len(code)] = np.frombuffer(code, dtype=np.uint8)
            ram[0x10000:] = 0
            before = ram.copy()
            bm = impl.DirtyBitmap(size // PAGE)
            tracker = track_writes(uc, bm, 0, size, implementation=impl)
            uc.emu_start(code_at, code_at + len(code) - 1)   # stop at the hlt
            tracker.detach()
            diff = np.flatnonzero((ram != before).reshape(-1, PAGE).any(axis=1))
            got = impl.bitmap_to_indices(bm.fetch_and_clear(), size // PAGE)
            assert list(got) == list(diff)
    finally:
        del ram, anchor
        mm.close()


def test_fetch_and_clear_loses_nothing_under_concurrency() -> None:
    """A writer thread marks pages while another syncs: every mark is seen exactly once or more."""
    if _fastpath is None:
        pytest.skip("extension not built")
    n = 4096
    bm = _fastpath.DirtyBitmap(n)
    seen = np.zeros(n, dtype=bool)
    stop = threading.Event()

    def syncer() -> None:
        while not stop.is_set():
            seen[_fastpath.bitmap_to_indices(bm.fetch_and_clear(), n)] = True

    t = threading.Thread(target=syncer)
    t.start()
    for p in range(n):
        bm.mark_range(p * PAGE, 1)
    stop.set()
    t.join()
    seen[_fastpath.bitmap_to_indices(bm.fetch_and_clear(), n)] = True
    assert seen.all()
