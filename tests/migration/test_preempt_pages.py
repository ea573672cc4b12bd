"""The postcopy preempt channel's records, parsed in memory (pyvm.migration.stream.preempt_pages)."""

from __future__ import annotations

import struct

import pytest

from pyvm.migration.errors import StreamFormatError
from pyvm.migration.stream.preempt_pages import END, EOS_RECORD, PreemptPage, PreemptPageParser

PAGE, ZERO, CONT = 0x08, 0x02, 0x20


def _rec(offset: int, flags: int, name: str | None = None, tail: bytes = b"") -> bytes:
    head = struct.pack(">Q", offset | flags)
    if name is not None:
        head += bytes([len(name)]) + name.encode()
    return head + tail


def _stream() -> bytes:
    return (_rec(0x3000, PAGE, "pc.ram", b"\xab" * 4096) + _rec(0x5000, ZERO | CONT, None, b"\0")
            + _rec(0x1000, PAGE, "other", b"\x01" * 4096) + EOS_RECORD)


def test_records_in_any_split_parse_the_same() -> None:
    data = _stream()
    want = [PreemptPage("pc.ram", 0x3000, b"\xab" * 4096), PreemptPage("pc.ram", 0x5000, None),
            PreemptPage("other", 0x1000, b"\x01" * 4096), END]
    for step in (1, 7, 4096, len(data)):
        parser = PreemptPageParser()
        got = []
        for i in range(0, len(data), step):
            got += list(parser.feed(data[i:i + step]))
        assert got == want, step
        assert parser.ended


@pytest.mark.parametrize("data, text", [
    (_rec(0, 0x04, "pc.ram"), "Unknown combination of migration flags: 0x4 (postcopy mode)"),
    (_rec(0, PAGE | CONT, None, bytes(4096)), "Ack, bad migration stream!"),
    (_rec(0, ZERO, "pc.ram", b"\x07"), "Found a zero page with value 7"),
    (EOS_RECORD + b"x", "postcopy preempt channel: data after its end"),
])
def test_bad_records_are_refused_for_good(data: bytes, text: str) -> None:
    parser = PreemptPageParser()
    with pytest.raises(StreamFormatError) as e:
        list(parser.feed(data))
    assert text in str(e.value)
    with pytest.raises(StreamFormatError):
        list(parser.feed(b""))
