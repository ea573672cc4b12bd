"""Loading XBZRLE records (QEMU migration/ram.c ``load_xbzrle``): pages decoded in place,
malformed records refused with QEMU's texts and the page left as QEMU leaves it."""

from __future__ import annotations

import numpy as np
import pytest

from pyvm import xbzrle_py
from pyvm.migration import StreamBlock
from pyvm.migration.errors import StreamFormatError
from pyvm.migration.stream.ram_loader import RamLoader
from pyvm.migration.stream.reader import StreamReader
from tests.stream_in_memory import run_to_completion

PAGE = 4096
EOS = bytes.fromhex("00000000 00000010")


def _record(offset: int, payload: bytes, named: bool = True, flag: int = 1,
            length: int | None = None) -> bytes:
    word = offset | 0x40 | (0 if named else 0x20)
    head = word.to_bytes(8, "big") + (b"\x06pc.ram" if named else b"")
    size = len(payload) if length is None else length
    return head + bytes((flag,)) + size.to_bytes(2, "big") + payload


def _load(payload: bytes, ram: bytearray, split: int | None = None) -> RamLoader:
    loader = RamLoader(lambda name, length: StreamBlock("pc.ram", len(ram), 0, ram)
                       if name == "pc.ram" else None, False)
    r = StreamReader()
    data = payload + EOS
    if split is None:
        r.feed(data)
        run_to_completion(loader.load(r, 4), r)
    else:
        # fed in two pieces: the loader waits for the rest of a record
        gen = loader.load(r, 4)
        r.feed(data[:split])
        next(gen)
        r.feed(data[split:])
        run_to_completion(gen, r)
    return loader


@pytest.mark.parametrize("split", [None, 5, 16, 18])
def test_xbzrle_pages_decode_in_place(split) -> None:
    ram = bytearray(2 * PAGE)
    ram[PAGE:2 * PAGE] = b"\x11" * PAGE
    new = bytearray(ram[PAGE:2 * PAGE])
    new[10:13] = b"abc"
    new[4000] = 0
    enc = bytearray(PAGE)
    n = xbzrle_py.encode(bytes(ram[PAGE:2 * PAGE]), bytes(new), enc)
    assert n > 0
    second = bytearray(new)
    second[0] = 0x99
    enc2 = bytearray(PAGE)
    n2 = xbzrle_py.encode(bytes(new), bytes(second), enc2)
    loader = _load(_record(PAGE, bytes(enc[:n])) + _record(PAGE, bytes(enc2[:n2]), named=False),
                   ram, split)
    assert bytes(ram[PAGE:]) == bytes(second)
    assert bytes(ram[:PAGE]) == bytes(PAGE)
    assert loader.xbzrle_pages == 2


@pytest.mark.parametrize("record,lines", [
    (_record(0, b"\x00\x01\x05", flag=2),
     ["Failed to load XBZRLE page - wrong compression!", "Failed to decompress XBZRLE page at 0"]),
    (_record(PAGE, b"", length=PAGE + 1),
     ["Failed to load XBZRLE page - len overflow!", "Failed to decompress XBZRLE page at 1000"]),
    (_record(0, b"\x00\x00"),
     ["Failed to load XBZRLE page - decode error!", "Failed to decompress XBZRLE page at 0"]),
    (_record(0, b"\x81\x20\x01\x00"),
     ["Failed to load XBZRLE page - decode error!", "Failed to decompress XBZRLE page at 0"]),
])
def test_malformed_xbzrle_records_use_qemu_texts(record: bytes, lines: list[str]) -> None:
    ram = bytearray(np.arange(2 * PAGE, dtype=np.uint8).tobytes())
    guard = bytes(ram)
    with pytest.raises(StreamFormatError) as info:
        _load(record, ram)
    assert info.value.lines == lines
    assert ram == guard
