"""XBZRLE: QEMU's encoding (migration/xbzrle.c) in the native kernel and its twin.

Golden vectors are computed by hand from the format (ULEB128 zero-run / changed-run
pairs, trailing unchanged run left out); the native kernel and the pure-Python twin must
agree byte for byte on random pages and on whole batches of the source's page decision,
cache state included.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pyvm import xbzrle_py

try:
    _native = importlib.import_module("pyvm._xbzrle")
except ImportError:  # pragma: no cover - the build must provide it; a test says so
    _native = None

IMPLS = [pytest.param(xbzrle_py, id="python"),
         pytest.param(_native, id="cython",
                      marks=pytest.mark.skipif(_native is None, reason="extension not built"))]
PAGE = 4096


def test_extension_is_built() -> None:
    assert _native is not None, "pyvm._xbzrle is not built"
    assert _native.IMPLEMENTATION == "cython"


def _enc(impl, old: bytes, new: bytes, dlen: int = PAGE) -> bytes | int:
    dst = bytearray(dlen)
    n = impl.encode(old, new, dst)
    return n if n <= 0 else bytes(dst[:n])


def _page_with(changes: dict[int, bytes]) -> bytes:
    page = bytearray(PAGE)
    for off, data in changes.items():
        page[off:off + len(data)] = data
    return bytes(page)


GOLDEN = [
    # (changes to an all-zero page, encoding against the all-zero page)
    ({}, 0),                                                    # unchanged
    ({3: b"\xaa"}, b"\x03\x01\xaa"),                            # one byte, trailing run dropped
    ({0: b"\x01\x02"}, b"\x00\x02\x01\x02"),                    # leading zrun of length 0
    ({200: b"\x11\x22", 4000: b"\x33"},                         # two-byte ULEB lengths
     b"\xc8\x01" + b"\x02\x11\x22" + b"\xd6\x1d" + b"\x01\x33"),
    ({4095: b"\x7f"}, b"\xff\x1f\x01\x7f"),                     # 4095 = 0x7f | 0x1f << 7
    ({0: b"\x01" * 200}, b"\x00\xc8\x01" + b"\x01" * 200),      # long changed run
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("changes,expected", GOLDEN)
def test_golden_encodings(impl, changes, expected) -> None:
    assert _enc(impl, bytes(PAGE), _page_with(changes)) == expected
    if expected:
        page = bytearray(PAGE)
        assert impl.decode(expected, page) == max(changes) + len(changes[max(changes)])
        assert bytes(page) == _page_with(changes)


@pytest.mark.parametrize("impl", IMPLS)
def test_overflow(impl) -> None:
    # every other byte changed: 3 encoded bytes per 2 page bytes cannot fit a page
    new = bytes([1, 0] * (PAGE // 2))
    assert _enc(impl, bytes(PAGE), new) == -1
    # ... but fits a larger buffer, where the decoder restores it
    enc = _enc(impl, bytes(PAGE), new, dlen=3 * PAGE)
    assert isinstance(enc, bytes) and len(enc) == 3 * (PAGE // 2)
    page = bytearray(PAGE)
    assert impl.decode(enc, page) == PAGE - 1
    assert bytes(page) == new


@pytest.mark.parametrize("impl", IMPLS)
def test_overflow_points_are_qemus(impl) -> None:
    # one changed byte encodes to 3 bytes, but the trailing unchanged run still needs room
    # for two more before it is seen (the d + 2 > dlen check at the top of the loop)
    new = _page_with({0: b"\x05"})
    assert _enc(impl, bytes(PAGE), new, dlen=1) == -1
    assert _enc(impl, bytes(PAGE), new, dlen=3) == -1
    assert _enc(impl, bytes(PAGE), new, dlen=4) == -1
    assert _enc(impl, bytes(PAGE), new, dlen=5) == b"\x00\x01\x05"
    # the last byte changed: no trailing run, so the encoding fits exactly
    new = _page_with({4095: b"\x05"})
    assert _enc(impl, bytes(PAGE), new, dlen=5) == b"\xff\x1f\x01\x05"
    new = _page_with({0: b"\x05\x06"})
    assert _enc(impl, bytes(PAGE), new, dlen=5) == -1
    assert _enc(impl, bytes(PAGE), new, dlen=6) == b"\x00\x02\x05\x06"


BAD = [
    b"\x00",                         # a lone byte: fewer than two left for a zrun
    b"\x05\x00",                     # empty nzrun
    b"\x00\x01\xaa\x00\x01\xbb",     # an empty zrun after the first
    b"\x81\x20\x01\x00",             # zrun of 4097 bytes runs past the page
    b"\x80\x80\x01",                 # a ULEB128 longer than two bytes
    b"\x00\x05\x01\x02",             # nzrun longer than the input
    b"\x03\x01\xaa\x05",             # a dangling zrun at the end
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", BAD)
def test_decoder_refuses_malformed(impl, bad) -> None:
    assert impl.decode(bad, bytearray(PAGE)) == -1


@pytest.mark.skipif(_native is None, reason="extension not built")
@settings(max_examples=300, deadline=None)
@given(old=st.binary(min_size=1, max_size=600), data=st.data())
def test_native_matches_twin(old: bytes, data) -> None:
    n = len(old)
    edits = data.draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 255)), max_size=40))
    new = bytearray(old)
    for pos, value in edits:
        new[pos] = value
    dlen = data.draw(st.integers(0, 2 * n + 4))
    a, b = _enc(_native, old, bytes(new), dlen), _enc(xbzrle_py, old, bytes(new), dlen)
    assert a == b
    if isinstance(a, bytes):
        restored = bytearray(old)
        assert _native.decode(a, restored) == xbzrle_py.decode(a, bytearray(old))
        assert bytes(restored) == bytes(new)


@pytest.mark.skipif(_native is None, reason="extension not built")
@settings(max_examples=200, deadline=None)
@given(blob=st.binary(min_size=0, max_size=64), dlen=st.integers(0, 80))
def test_native_decoder_matches_twin(blob: bytes, dlen: int) -> None:
    a, b = bytearray(range(dlen)), bytearray(range(dlen))
    assert _native.decode(blob, a) == xbzrle_py.decode(blob, b)


# -- the source's batch decision ---------------------------------------------------------------

class _Cache:
    def __init__(self, slots: int) -> None:
        self.data = np.zeros(slots * PAGE, dtype=np.uint8)
        self.addr = np.full(slots, -1, dtype=np.int64)
        self.age = np.zeros(slots, dtype=np.uint64)


def _pack(impl, mem, indices, cache, gen, started, last, name=b"pc.ram", base=0, start=0,
          known=np.zeros(0, np.uint8), cap=1 << 16):
    out = np.zeros(cap, dtype=np.uint8)
    counters = np.zeros(8, dtype=np.int64)
    end, n = impl.pack_pages(mem, mem.size // PAGE, np.asarray(indices, dtype=np.int64), start,
                             known, name, cache.data, cache.addr, cache.age, base, gen, started,
                             last, out, counters)
    return end, out[:n].tobytes(), counters.tolist()


@pytest.mark.parametrize("impl", IMPLS)
def test_pack_rounds(impl) -> None:
    mem = np.zeros(4 * PAGE, dtype=np.uint8)
    mem[PAGE:2 * PAGE] = 7
    mem[2 * PAGE + 10] = 1
    cache = _Cache(8)
    # before xbzrle starts: PAGE/ZERO only, nothing cached
    end, out, c = _pack(impl, mem, [0, 1, 2], cache, 1, False, False)
    assert end == 3 and c == [1, 2, 0, 0, 0, 0, 0, 0]
    assert out[:8] == (0 | 0x02).to_bytes(8, "big") and out[8:15] == b"\x06pc.ram"
    assert (cache.addr == -1).all()
    # started: misses are inserted and sent whole; a zero page is cached too
    end, out, c = _pack(impl, mem, [0, 1, 2], cache, 2, True, False)
    assert c == [1, 2, 0, 0, 0, 2, 0, 0]
    assert cache.addr[:3].tolist() == [0, 1, 2]
    # change a few bytes: page 1 is encoded, page 2 unchanged is skipped, page 0 stays ZERO
    mem[PAGE + 100:PAGE + 103] = 9
    end, out, c = _pack(impl, mem, [0, 1, 2], cache, 3, True, False)
    assert c[:4] == [1, 0, 1, 2] and c[7] == 1
    enc = b"\x64\x03\x09\x09\x09"
    record = (PAGE | 0x40 | 0x20).to_bytes(8, "big") + b"\x01" + len(enc).to_bytes(2, "big") + enc
    assert out.endswith(record)
    assert c[4] == len(record) - 8
    assert bytes(cache.data[PAGE:2 * PAGE]) == bytes(mem[PAGE:2 * PAGE])


@pytest.mark.skipif(_native is None, reason="extension not built")
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_pack_native_matches_twin(data) -> None:
    npages = data.draw(st.integers(1, 12))
    slots = data.draw(st.sampled_from([1, 2, 4, 16]))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    mem = np.zeros(npages * PAGE, dtype=np.uint8)
    caches = (_Cache(slots), _Cache(slots))
    for gen in range(1, data.draw(st.integers(2, 6))):
        for _ in range(data.draw(st.integers(0, 30))):
            page = int(rng.integers(npages))
            kind = rng.integers(4)
            if kind == 0:
                mem[page * PAGE:(page + 1) * PAGE] = 0
            elif kind == 1:
                mem[page * PAGE:(page + 1) * PAGE] = rng.integers(0, 256, PAGE, dtype=np.uint8)
            else:
                offs = rng.integers(0, PAGE, int(rng.integers(1, 20)))
                mem[page * PAGE + offs] = rng.integers(0, 256, offs.size, dtype=np.uint8)
        indices = sorted(set(data.draw(st.lists(st.integers(0, npages - 1), max_size=npages))))
        known = np.zeros(len(indices), np.uint8)
        started, last = gen > 1, data.draw(st.booleans())
        cap = data.draw(st.sampled_from([5000, 1 << 16]))
        start = 0
        while True:
            a = _pack(_native, mem, indices, caches[0], gen, started, last, start=start, cap=cap,
                      base=3, known=known)
            b = _pack(xbzrle_py, mem, indices, caches[1], gen, started, last, start=start, cap=cap,
                      base=3, known=known)
            assert a == b
            for x, y in zip((caches[0].data, caches[0].addr, caches[0].age),
                            (caches[1].data, caches[1].addr, caches[1].age)):
                assert np.array_equal(x, y)
            if a[0] >= len(indices):
                break
            assert a[0] > start
            start = a[0]
