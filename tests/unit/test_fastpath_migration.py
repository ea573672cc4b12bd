"""The migration kernels (zero scan by index, page-record batches and loader): both twins agree."""

from __future__ import annotations

import errno
import os
import random
import socket
import struct

import numpy as np
import pytest

from pyvm import fastpath_py, pagestream_py

try:
    from pyvm import _fastpath, _pagestream
except ImportError:  # pragma: no cover - test_fastpath.py reports a missing build
    _fastpath = _pagestream = None

IMPLS = [pytest.param(fastpath_py, id="python"),
         pytest.param(_fastpath, id="cython",
                      marks=pytest.mark.skipif(_fastpath is None, reason="extension not built"))]
STREAM_IMPLS = [pytest.param(pagestream_py, id="python"),
                pytest.param(_pagestream, id="cython",
                             marks=pytest.mark.skipif(_pagestream is None, reason="extension not built"))]

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
    if _pagestream is None:
        pytest.skip("extension not built")
    rng = random.Random(11)
    for trial in range(60):
        npages = rng.randint(1, 12)
        data = _records(rng, npages, rng.randint(0, 30))
        cut = rng.randint(0, len(data))
        limit = rng.choice([npages * PAGE - PAGE + 1, rng.randint(-PAGE, npages * PAGE), npages * PAGE * 4])
        a = _run_all(pagestream_py, data, npages, limit, cut)
        b = _run_all(_pagestream, data, npages, limit, cut)
        assert a[0] == b[0], trial
        assert (a[1] == b[1]).all(), trial


@pytest.mark.parametrize("impl", STREAM_IMPLS)
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


# -- the record batch (headers in the batch, pages from RAM) -----------------------------------

def _expected_records(ram: np.ndarray, idx: list[int], zero: list[bool], name: bytes) -> bytes:
    out = bytearray()
    for k, (i, z) in enumerate(zip(idx, zero)):
        flags = (ZERO if z else PAGE_FLAG) | (0 if name and k == 0 else CONTINUE)
        out += struct.pack(">Q", i * PAGE | flags)
        if name and k == 0:
            out += bytes([len(name)]) + name
        out += b"\0" if z else ram[i * PAGE:(i + 1) * PAGE].tobytes()
    return bytes(out)


def _sent(impl, batch, tmp_path) -> bytes:
    """Everything the batch sends, written to a file with writev."""
    path = tmp_path / "sent"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        while batch.remaining:
            assert batch.send(fd) > 0
    finally:
        os.close(fd)
    return path.read_bytes()


NONE = np.zeros(0, np.uint8)


@pytest.mark.parametrize("impl", STREAM_IMPLS)
def test_record_batch_scans_and_names_the_block(impl, tmp_path) -> None:
    ram = _ram(24, 5)
    idx = np.array([3, 0, 17, 5, 23, 9], dtype=np.int64)
    scanned = [not ram[i * PAGE:(i + 1) * PAGE].any() for i in idx.tolist()]
    batch = impl.RecordBatch(16)
    end, nbytes, zeros = batch.pack(ram, 24, idx, 0, NONE, True, b"pc.ram")
    assert (end, zeros) == (idx.size, sum(scanned)) and batch.remaining == nbytes
    assert _sent(impl, batch, tmp_path) == _expected_records(ram, idx.tolist(), scanned, b"pc.ram")
    # known-zero pages are ZERO without reading them; without scan the rest go as PAGE
    known = np.array([1, 0, 0, 1, 0, 0], dtype=np.uint8)
    end, nbytes, zeros = batch.pack(ram, 24, idx, 1, known, False, b"")
    assert (end, zeros) == (idx.size, 1)
    assert _sent(impl, batch, tmp_path) == _expected_records(
        ram, idx.tolist()[1:], [False, False, True, False, False], b"")


@pytest.mark.parametrize("impl", STREAM_IMPLS)
def test_record_batch_stops_at_its_page_count_and_header_room(impl, tmp_path) -> None:
    ram = np.zeros(16 * PAGE, dtype=np.uint8)
    ram[PAGE:4 * PAGE] = 7                     # pages 1-3 hold data, the rest is zero
    idx = np.arange(16, dtype=np.int64)
    batch = impl.RecordBatch(2, 512)
    assert batch.pack(ram, 16, idx, 0, NONE, True, b"abc")[:1] == (3,)     # 0, 1, 2: two PAGE records
    with pytest.raises(ValueError, match="unsent"):
        batch.pack(ram, 16, idx, 3, NONE, True, b"")
    batch.clear()
    assert batch.remaining == 0
    end = batch.pack(ram, 16, idx, 4, NONE, True, b"")[0]
    assert end == 16                              # 12 ZERO records fit in 512 bytes
    big = np.zeros(100 * PAGE, dtype=np.uint8)
    assert batch.clear() is None and batch.pack(big, 100, np.arange(100, dtype=np.int64), 0, NONE, True,
                                                b"")[0] == 512 // 9
    batch.clear()
    assert batch.pack(ram, 16, idx, 16, NONE, True, b"") == (16, 0, 0)


@pytest.mark.parametrize("impl", STREAM_IMPLS)
def test_record_batch_checks_indices(impl) -> None:
    ram = _ram(4, 7)
    batch = impl.RecordBatch(8)
    with pytest.raises(ValueError, match="beyond the block"):
        batch.pack(ram, 4, np.array([1, 4], dtype=np.int64), 0, NONE, True, b"")
    with pytest.raises(ValueError, match="beyond the block"):
        batch.pack(ram, 4, np.array([-1], dtype=np.int64), 0, NONE, True, b"")
    # a block with more pages than the buffer holds: only known-zero pages may be sent
    with pytest.raises(ValueError, match="beyond the source buffer"):
        batch.pack(ram, 9, np.array([6], dtype=np.int64), 0, NONE, True, b"")
    assert batch.pack(ram, 9, np.array([6], dtype=np.int64), 0, np.ones(1, np.uint8), True, b"") == (1, 9, 1)


def test_record_batch_twins_agree(tmp_path) -> None:
    if _pagestream is None:
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
        max_pages, room = rng.randint(1, 6), rng.randint(512, 2048)
        a, b = pagestream_py.RecordBatch(max_pages, room), _pagestream.RecordBatch(max_pages, room)
        assert a.pack(ram, npages, idx, start, known, scan, name) == \
            b.pack(ram, npages, idx, start, known, scan, name), trial
        assert _sent(pagestream_py, a, tmp_path) == _sent(_pagestream, b, tmp_path), trial


@pytest.mark.parametrize("impl", STREAM_IMPLS)
def test_record_batch_resumes_after_partial_writes(impl) -> None:
    ram = _ram(64, 8)
    ram[5 * PAGE:6 * PAGE] = 0
    idx = np.arange(64, dtype=np.int64)
    r, w = os.pipe()
    os.set_blocking(w, False)
    got = bytearray()
    try:
        batch = impl.RecordBatch(64)
        batch.pack(ram, 64, idx, 0, NONE, True, b"pc.ram")
        blocked = 0
        while batch.remaining:
            try:
                batch.send(w)
            except BlockingIOError:               # pipe full: drain it, as poll() would wait
                blocked += 1
                got += os.read(r, 1 << 20)
        os.close(w)
        w = -1
        while chunk := os.read(r, 1 << 20):
            got += chunk
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    assert blocked > 0
    zero = [not ram[i * PAGE:(i + 1) * PAGE].any() for i in range(64)]
    assert bytes(got) == _expected_records(ram, list(range(64)), zero, b"pc.ram")


@pytest.mark.parametrize("impl", STREAM_IMPLS)
def test_record_batch_sendmsg_and_errors(impl) -> None:
    ram = _ram(4, 9)
    a, b = socket.socketpair()
    with a, b:
        batch = impl.RecordBatch(8)
        n = batch.pack(ram, 4, np.arange(4, dtype=np.int64), 0, NONE, False, b"")[1]
        assert batch.send(a.fileno(), True) == n
        got = bytearray()
        while len(got) < n:
            got += b.recv(1 << 20)
        assert bytes(got) == _expected_records(ram, [0, 1, 2, 3], [False] * 4, b"")
        b.close()
        batch.pack(ram, 4, np.arange(4, dtype=np.int64), 0, NONE, False, b"")
        with pytest.raises(OSError) as info:
            while batch.remaining:
                batch.send(a.fileno(), True)
        assert info.value.errno in (errno.EPIPE, errno.ECONNRESET)


# -- the loader's map of pages known to be zero ------------------------------------------------

@pytest.mark.parametrize("impl", STREAM_IMPLS)
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
