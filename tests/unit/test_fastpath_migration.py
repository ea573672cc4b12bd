"""The migration kernels (zero scan by index, page gather, page-record loader): both twins agree."""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest

from pyvm import fastpath_py

try:
    from pyvm import _fastpath
except ImportError:  # pragma: no cover - test_fastpath.py reports a missing build
    _fastpath = None

IMPLS = [pytest.param(fastpath_py, id="python"),
         pytest.param(_fastpath, id="cython",
                      marks=pytest.mark.skipif(_fastpath is None, reason="extension not built"))]
needs_native = pytest.mark.skipif(_fastpath is None, reason="extension not built")

PAGE = 4096
ZERO, PAGE_FLAG, CONTINUE, EOS = 0x02, 0x08, 0x20, 0x10


def _ram(npages: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ram = np.zeros(npages * PAGE, dtype=np.uint8)
    for p in range(npages):
        if rng.random() < 0.6:
            at = int(rng.integers(PAGE))
            ram[p * PAGE + at] = 1 + int(rng.integers(255))
    return ram


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_scan_by_index_matches_the_run_scan(impl) -> None:
    ram = _ram(96, 3)
    full = np.zeros(96, dtype=np.uint8)
    impl.find_zero_pages(ram, 0, 96, full)
    idx = np.array([5, 0, 95, 40, 41, 42, 7, 7], dtype=np.int64)
    out = np.zeros(idx.size, dtype=np.uint8)
    assert impl.find_zero_pages_at(ram, idx, out) == int(full[idx].sum())
    assert list(out) == list(full[idx])
    with pytest.raises(ValueError):
        impl.find_zero_pages_at(ram, np.array([96], dtype=np.int64), out)
    with pytest.raises(ValueError):
        impl.find_zero_pages_at(ram, np.array([-1], dtype=np.int64), out)
    with pytest.raises(ValueError):
        impl.find_zero_pages_at(ram, idx, np.zeros(2, dtype=np.uint8))


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_scan_sees_a_last_byte(impl) -> None:
    ram = np.zeros(3 * PAGE, dtype=np.uint8)
    ram[2 * PAGE - 1] = 1
    out = np.zeros(3, dtype=np.uint8)
    assert impl.find_zero_pages_at(ram, np.arange(3, dtype=np.int64), out) == 2
    assert list(out) == [1, 0, 1]


@pytest.mark.parametrize("impl", IMPLS)
def test_copy_pages_gathers_and_checks_bounds(impl) -> None:
    ram = _ram(16, 4)
    ram[:] = np.random.default_rng(4).integers(0, 256, ram.size, dtype=np.uint8)
    out = np.zeros(3 * PAGE + 20, dtype=np.uint8)
    impl.copy_pages(ram, np.array([9, 2, 15], dtype=np.int64), out,
                    np.array([3, 3 + PAGE, 20 + 2 * PAGE], dtype=np.int64))
    assert (out[3:3 + PAGE] == ram[9 * PAGE:10 * PAGE]).all()
    assert (out[3 + PAGE:3 + 2 * PAGE] == ram[2 * PAGE:3 * PAGE]).all()
    assert (out[20 + 2 * PAGE:] == ram[15 * PAGE:]).all()
    assert (out[:3] == 0).all()
    with pytest.raises(ValueError):
        impl.copy_pages(ram, np.array([16], dtype=np.int64), out, np.array([0], dtype=np.int64))
    with pytest.raises(ValueError):
        impl.copy_pages(ram, np.array([0], dtype=np.int64), out, np.array([21 + 2 * PAGE], dtype=np.int64))
    with pytest.raises(ValueError):
        impl.copy_pages(ram, np.array([0, 1], dtype=np.int64), out, np.array([0], dtype=np.int64))


def _records(rng: random.Random, npages: int, count: int) -> bytes:
    """CONTINUE PAGE/ZERO records, now and then something the run must stop at."""
    out = bytearray()
    for _ in range(count):
        roll = rng.random()
        page = rng.randrange(npages)
        if roll < 0.45:
            out += struct.pack(">Q", page * PAGE | PAGE_FLAG | CONTINUE) + rng.randbytes(64) * 64
        elif roll < 0.85:
            out += struct.pack(">Q", page * PAGE | ZERO | CONTINUE) + b"\0"
        elif roll < 0.88:
            out += struct.pack(">Q", page * PAGE | ZERO | CONTINUE) + b"\x5a"    # non-zero fill
        elif roll < 0.91:
            out += struct.pack(">Q", (npages + rng.randrange(4)) * PAGE | PAGE_FLAG | CONTINUE)
        elif roll < 0.94:
            out += struct.pack(">Q", page * PAGE | PAGE_FLAG) + b"\x06pc.ram"    # names a block
        elif roll < 0.97:
            out += struct.pack(">Q", EOS)
        else:
            out += struct.pack(">Q", 0xFFFF_FFFF_FFFF_F000 | PAGE_FLAG | CONTINUE)
    return bytes(out)


def _run_all(impl, data: bytes, npages: int, limit: int, cut: int):
    dest = np.frombuffer(bytearray(b"\xee" * (npages * PAGE + 3)), dtype=np.uint8).copy()
    guard = dest[npages * PAGE:].copy()
    src = bytearray(data[:cut])
    results = []
    pos = 0
    while True:
        got = impl.load_page_run(src, pos, dest[:npages * PAGE], limit)
        results.append(got)
        if got[0] == pos:
            break
        pos = got[0]
    assert (dest[npages * PAGE:] == guard).all()     # never beyond the block
    return results, dest


def test_load_page_run_twins_agree_on_random_streams() -> None:
    if _fastpath is None:
        pytest.skip("extension not built")
    rng = random.Random(11)
    for trial in range(60):
        npages = rng.randint(1, 12)
        data = _records(rng, npages, rng.randint(0, 30))
        cut = rng.randint(0, len(data))
        limit = rng.choice([npages * PAGE - PAGE + 1, rng.randint(-PAGE, npages * PAGE), npages * PAGE * 4])
        a = _run_all(fastpath_py, data, npages, limit, cut)
        b = _run_all(_fastpath, data, npages, limit, cut)
        assert a[0] == b[0], trial
        assert (a[1] == b[1]).all(), trial


@pytest.mark.parametrize("impl", IMPLS)
def test_load_page_run_applies_and_stops(impl) -> None:
    page = bytes(range(256)) * 16
    data = (struct.pack(">Q", PAGE | PAGE_FLAG | CONTINUE) + page
            + struct.pack(">Q", 0 | ZERO | CONTINUE) + b"\0"
            + struct.pack(">Q", 2 * PAGE | PAGE_FLAG | CONTINUE) + page     # beyond limit
            )
    dest = bytearray(b"\xee" * (3 * PAGE))
    pos, normal, zero = impl.load_page_run(data, 0, dest, 2 * PAGE - PAGE + 1)
    assert (pos, normal, zero) == (8 + PAGE + 9, 1, 1)
    assert dest[:PAGE] == bytes(PAGE) and dest[PAGE:2 * PAGE] == page
    assert dest[2 * PAGE:] == b"\xee" * PAGE
    # incomplete payload: nothing applied, the record stays for the caller
    assert impl.load_page_run(data[:8 + PAGE - 1], 0, dest, PAGE + 1) == (0, 0, 0)
    with pytest.raises(ValueError):
        impl.load_page_run(data, len(data) + 1, dest, PAGE)
