"""Layer 1: the stream writer and the push-fed reader."""

from __future__ import annotations

import pytest

from pyvm.migration.errors import DecoderStoppedError, EncodeError, StreamFormatError, TruncatedStreamError
from pyvm.migration.stream.reader import StreamReader
from pyvm.migration.stream.writer import StreamWriter
from tests.stream_in_memory import join_chunks, run_to_completion, writer_bytes


def test_writer_big_endian_items() -> None:
    w = StreamWriter()
    w.u8(0x01)
    w.be16(0x0203)
    w.be32(0x04050607)
    w.be64(0x08090A0B0C0D0E0F)
    w.counted_string("ram")
    w.raw(b"xy")
    assert w.size == 1 + 2 + 4 + 8 + 4 + 2
    assert writer_bytes(w) == bytes.fromhex("01 0203 04050607 08090a0b0c0d0e0f 03") + b"ramxy"
    assert w.size == 0


def test_counted_string_limit() -> None:
    w = StreamWriter()
    w.counted_string("x" * 255)
    assert len(writer_bytes(w)) == 256
    with pytest.raises(EncodeError):
        w.counted_string("x" * 256)


def test_views_are_chunks_not_copies() -> None:
    ram = bytearray(b"A" * 8192)
    w = StreamWriter()
    w.be64(1)
    w.view(memoryview(ram)[4096:8192])
    w.u8(7)
    assert w.size == 8 + 4096 + 1
    chunks = w.take_chunks()
    assert [type(c) for c in chunks] == [bytes, memoryview, bytes]
    assert w.size == 0
    ram[4096] = ord("B")            # the chunk is a window on guest RAM, not a copy
    assert bytes(chunks[1][:1]) == b"B"
    assert join_chunks(chunks)[8:9] == b"B"


def _read_all(r: StreamReader):
    a = yield from r.read_u8("a")
    b = yield from r.read_be16("b")
    c = yield from r.read_be32("c")
    d = yield from r.read_be64("d")
    name = yield from r.read_counted("name")
    rest = yield from r.read_bytes(3, "rest")
    return a, b, c, d, name, rest


def test_reader_waits_for_input_byte_by_byte() -> None:
    w = StreamWriter()
    w.u8(9); w.be16(0x1234); w.be32(0xDEADBEEF); w.be64(1 << 63); w.counted_string("pc.ram"); w.raw(b"end")
    data = writer_bytes(w)
    r = StreamReader()
    step = _read_all(r)
    next(step)                          # nothing buffered: waits
    result = None
    for i in range(len(data)):
        r.feed(data[i:i + 1])
        try:
            next(step)
        except StopIteration as done:
            result = done.value
            assert i == len(data) - 1
    assert result == (9, 0x1234, 0xDEADBEEF, 1 << 63, b"pc.ram", b"end")
    assert r.offset == len(data)


def test_reader_truncation_names_the_item() -> None:
    r = StreamReader()
    r.feed(b"\x00\x01")
    with pytest.raises(TruncatedStreamError) as info:
        run_to_completion(r.read_be32("section id"), r)
    assert info.value.what == "section id"
    assert info.value.errno == 5
    assert "section id" in str(info.value)
    assert info.value.report() == ["load of migration failed: Input/output error"]


def test_reader_is_dead_after_an_error() -> None:
    r = StreamReader()
    r.fail(StreamFormatError("Unknown savevm section type 9"))
    with pytest.raises(DecoderStoppedError) as info:
        r.feed(b"more")
    assert "Unknown savevm section type 9" in str(info.value)


def test_reader_refuses_input_after_close() -> None:
    r = StreamReader()
    r.close()
    with pytest.raises(DecoderStoppedError):
        r.feed(b"x")


def test_reader_compacts_consumed_input() -> None:
    r = StreamReader()
    r.feed(bytes(2 << 20))
    assert run_to_completion(r.skip_or_end(2 << 20), r) is True
    r.closed = False
    r.feed(b"\x07")
    assert (r.pos, r.end) == (0, 1) and r.offset == 2 << 20     # consumed bytes were dropped
    assert r.u8() == 7
    for _ in range(20):                                          # memory stays bounded
        r.feed(bytes(1 << 20))
        assert run_to_completion(r.skip_or_end(1 << 20), r) is True
        r.closed = False
    assert len(r.buffer) <= 4 << 20 and r.offset == (2 << 20) + 1 + (20 << 20)


def test_skip_or_end_consumes_as_input_arrives() -> None:
    r = StreamReader()
    step = r.skip_or_end(3 << 20)
    next(step)                                                   # nothing fed yet: waits
    for _ in range(2):
        r.feed(bytes(1 << 20))
        next(step)                                               # consumed, waits for more
        assert r.available == 0 and len(r.buffer) <= 2 << 20     # nothing piles up
    r.feed(bytes(1 << 20) + b"\x09")
    with pytest.raises(StopIteration) as done:
        next(step)
    assert done.value.value is True and r.u8() == 9 and r.offset == (3 << 20) + 1


def test_skip_or_end_reports_the_end_of_input() -> None:
    r = StreamReader()
    r.feed(bytes(10))
    assert run_to_completion(r.skip_or_end(11), r) is False
    assert r.offset == 10


def test_reader_fill_reads_straight_into_the_buffer() -> None:
    r = StreamReader()
    r.feed(b"\x01\x02")
    assert r.u8() == 1

    def readinto(view: memoryview) -> int:
        view[:3] = b"\x03\x04\x05"
        return 3
    assert r.fill(readinto, 1 << 20) == 3
    assert r.available == 4 and r.take(4) == b"\x02\x03\x04\x05"
    assert r.fill(lambda view: 0, 16) == 0 and r.available == 0
    r.close()
    with pytest.raises(DecoderStoppedError):
        r.fill(readinto, 16)


def test_wait_or_end_peeks_without_failing() -> None:
    r = StreamReader()
    r.feed(b"\x05")
    r.close()
    step = r.wait_or_end(2)
    with pytest.raises(StopIteration) as done:
        next(step)
    assert done.value.value is False
