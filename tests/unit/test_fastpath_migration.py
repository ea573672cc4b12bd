"""The migration kernels (zero scan by index, page-record packer and loader): both twins agree."""

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


# -- the packer -------------------------------------------------------------------------------

def _expected_records(ram: np.ndarray, idx: list[int], zero: list[bool], name: bytes) -> bytes:
    out = bytearray()
    for k, (i, z) in enumerate(zip(idx, zero)):
        flags = (ZERO if z else PAGE_FLAG) | (0 if name and k == 0 else CONTINUE)
        out += struct.pack(">Q", i * PAGE | flags)
        if name and k == 0:
            out += bytes([len(name)]) + name
        out += b"\0" if z else ram[i * PAGE:(i + 1) * PAGE].tobytes()
    return bytes(out)


@pytest.mark.parametrize("impl", IMPLS)
def test_pack_page_records_scans_and_names_the_block(impl) -> None:
    ram = _ram(24, 5)
    idx = np.array([3, 0, 17, 5, 23, 9], dtype=np.int64)
    scanned = [not ram[i * PAGE:(i + 1) * PAGE].any() for i in idx.tolist()]
    out = np.full(64 * PAGE, 0xEE, dtype=np.uint8)
    end, nbytes, zeros = impl.pack_page_records(ram, 24, idx, 0, np.zeros(0, np.uint8), True, b"pc.ram", out)
    assert (end, zeros) == (idx.size, sum(scanned))
    assert out[:nbytes].tobytes() == _expected_records(ram, idx.tolist(), scanned, b"pc.ram")
    assert (out[nbytes:] == 0xEE).all()
    # known-zero pages are ZERO without reading them; without scan the rest go as PAGE
    known = np.array([1, 0, 0, 1, 0, 0], dtype=np.uint8)
    end, nbytes, zeros = impl.pack_page_records(ram, 24, idx, 1, known, False, b"", out)
    assert (end, zeros) == (idx.size, 1)
    assert out[:nbytes].tobytes() == _expected_records(ram, idx.tolist()[1:], [False, False, True, False, False], b"")


@pytest.mark.parametrize("impl", IMPLS)
def test_pack_page_records_stops_where_the_output_is_full(impl) -> None:
    ram = _ram(8, 6)
    ram[:PAGE] = 0
    idx = np.arange(8, dtype=np.int64)
    out = np.zeros(8 + 1 + 3 + 1 + 2 * (8 + PAGE) + 5, dtype=np.uint8)    # page 0 (named) + 2 more
    ram[PAGE:3 * PAGE] = 7
    end, nbytes, zeros = impl.pack_page_records(ram, 8, idx, 0, np.zeros(0, np.uint8), True, b"abc", out)
    assert (end, nbytes, zeros) == (3, 8 + 1 + 3 + 1 + 2 * (8 + PAGE), 1)
    assert impl.pack_page_records(ram, 8, idx, 8, np.zeros(0, np.uint8), True, b"", out) == (8, 0, 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_pack_page_records_checks_indices(impl) -> None:
    ram = _ram(4, 7)
    out = np.zeros(4 * (8 + PAGE), dtype=np.uint8)
    with pytest.raises(ValueError, match="beyond the block"):
        impl.pack_page_records(ram, 4, np.array([1, 4], dtype=np.int64), 0, np.zeros(0, np.uint8), True, b"", out)
    with pytest.raises(ValueError, match="beyond the block"):
        impl.pack_page_records(ram, 4, np.array([-1], dtype=np.int64), 0, np.zeros(0, np.uint8), True, b"", out)
    # a block with more pages than the buffer holds: only known-zero pages may be packed
    with pytest.raises(ValueError, match="beyond the source buffer"):
        impl.pack_page_records(ram, 9, np.array([6], dtype=np.int64), 0, np.zeros(0, np.uint8), True, b"", out)
    assert impl.pack_page_records(ram, 9, np.array([6], dtype=np.int64), 0,
                                  np.ones(1, np.uint8), True, b"", out) == (1, 9, 1)


def test_pack_page_records_twins_agree() -> None:
    if _fastpath is None:
        pytest.skip("extension not built")
    rng = random.Random(12)
    for trial in range(40):
        npages = rng.randint(1, 20)
        ram = _ram(npages, trial)
        idx = np.array(rng.sample(range(npages), rng.randint(0, npages)), dtype=np.int64)
        known = np.array([rng.random() < 0.3 for _ in range(rng.randint(0, idx.size))], dtype=np.uint8)
        start = rng.randint(0, idx.size)
        name = rng.choice([b"", b"pc.ram"])
        scan = rng.random() < 0.7
        cap = rng.randint(0, 6 * (8 + PAGE))
        outs = [np.zeros(cap, dtype=np.uint8) for _ in range(2)]
        a = fastpath_py.pack_page_records(ram, npages, idx, start, known, scan, name, outs[0])
        b = _fastpath.pack_page_records(ram, npages, idx, start, known, scan, name, outs[1])
        assert a == b, trial
        assert (outs[0] == outs[1]).all(), trial


# -- the loader's map of pages known to be zero ------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_load_page_run_skips_pages_known_to_be_zero(impl) -> None:
    page = bytes(range(256)) * 16
    data = (struct.pack(">Q", 0 | ZERO | CONTINUE) + b"\0"
            + struct.pack(">Q", PAGE | ZERO | CONTINUE) + b"\0"
            + struct.pack(">Q", 2 * PAGE | PAGE_FLAG | CONTINUE) + page)
    dest = bytearray(b"\xee" * (3 * PAGE))
    written = np.array([0, 1, 0], dtype=np.uint8)
    assert impl.load_page_run(data, 0, dest, 2 * PAGE + 1, written) == (len(data), 1, 2)
    # page 0 is "known zero": not read, not written (its 0xee stays: the map is trusted)
    assert dest[:PAGE] == b"\xee" * PAGE
    assert dest[PAGE:2 * PAGE] == bytes(PAGE) and dest[2 * PAGE:] == page
    assert written.tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="shorter"):
        impl.load_page_run(data, 0, dest, 2 * PAGE + 1, np.zeros(2, dtype=np.uint8))
