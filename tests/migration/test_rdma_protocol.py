"""The rdma transport's control messages and write planning, without any fabric."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvm.migration.transports.base import TransportError
from pyvm.migration.transports.rdma_protocol import (
    HEADER_SIZE, MAX_PAYLOAD, RDMA_CAPABILITY_PIN_ALL, RDMA_CONTROL_MAX_BUFFER,
    RDMA_MERGE_MAX, RDMA_REG_CHUNK_SIZE, RdmaCapabilities, ChunkMap, Compress, ControlType,
    DestBlock, RdmaError, RdmaProtocolError, Register, RegisterResult, block_base_for,
    decode_compress, decode_dest_blocks, decode_message, decode_register_requests,
    decode_register_results, encode_compress, encode_dest_blocks,
    encode_header, encode_message, encode_register_requests, encode_register_results, expect,
    merge_pages, remote_address)

MiB = 1 << 20


def test_control_types_have_qemus_numbers() -> None:
    assert [(t.name, t.value) for t in ControlType] == [
        ("NONE", 0), ("ERROR", 1), ("READY", 2), ("QEMU_FILE", 3), ("RAM_BLOCKS_REQUEST", 4),
        ("RAM_BLOCKS_RESULT", 5), ("COMPRESS", 6), ("REGISTER_REQUEST", 7),
        ("REGISTER_RESULT", 8), ("REGISTER_FINISHED", 9), ("UNREGISTER_REQUEST", 10),
        ("UNREGISTER_FINISHED", 11)]


def test_header_layout_is_network_order() -> None:
    raw = encode_message(ControlType.QEMU_FILE, b"abc")
    assert raw == bytes.fromhex("00000003 00000003 00000001 00000000") + b"abc"
    msg = decode_message(raw)
    assert (msg.type, msg.repeat, msg.payload) == (ControlType.QEMU_FILE, 1, b"abc")


def test_errors_are_transport_errors_with_the_prefix() -> None:
    err = RdmaProtocolError("something")
    assert isinstance(err, RdmaError) and isinstance(err, TransportError)
    assert str(err) == "RDMA ERROR: something"
    assert str(RdmaError("RDMA ERROR: once")) == "RDMA ERROR: once"


@pytest.mark.parametrize("raw, text", [
    (b"\x00" * 8, "has no header"),
    (struct.pack(">IIII", 5, 3, 1, 0) + b"abc", "does not match"),
    (struct.pack(">IIII", 0, 77, 1, 0), "unsupported control message type 77"),
    (struct.pack(">IIII", 0, 10, 1, 0), "unsupported control message type 10"),
    (struct.pack(">IIII", 0, 6, 1, 0), "COMPRESS of 0 bytes does not hold 1 entries"),
    (struct.pack(">IIII", 0, 2, 0, 0), "repeat 0 out of range"),
    (struct.pack(">IIII", 0, 2, 4097, 0), "repeat 4097 out of range"),
    (struct.pack(">IIII", 1, 2, 1, 0) + b"x", "READY carries 1 unexpected bytes"),
    (struct.pack(">IIII", 24, 7, 2, 0) + bytes(24), "does not hold 2 entries"),
    (struct.pack(">IIII", 31, 5, 1, 0) + bytes(31), "is not a block list"),
])
def test_malformed_messages_are_refused(raw: bytes, text: str) -> None:
    with pytest.raises(RdmaProtocolError, match=text):
        decode_message(raw)


def test_payload_and_repeat_are_bounded_when_encoding() -> None:
    assert MAX_PAYLOAD == RDMA_CONTROL_MAX_BUFFER - HEADER_SIZE
    encode_header(ControlType.QEMU_FILE, MAX_PAYLOAD)
    with pytest.raises(RdmaProtocolError):
        encode_header(ControlType.QEMU_FILE, MAX_PAYLOAD + 1)
    with pytest.raises(RdmaProtocolError):
        encode_header(ControlType.READY, 0, repeat=4097)


def test_capabilities_exchange() -> None:
    wanted = RdmaCapabilities(flags=RDMA_CAPABILITY_PIN_ALL | 0x80)
    assert wanted.encode() == bytes.fromhex("00000001 00000081")
    assert RdmaCapabilities.decode(wanted.encode()) == wanted
    # The destination answers with the flags it supports; unknown bits are cleared.
    assert wanted.answer(RDMA_CAPABILITY_PIN_ALL).flags == RDMA_CAPABILITY_PIN_ALL
    assert wanted.answer(0).flags == 0
    with pytest.raises(RdmaProtocolError, match=r"Unknown source RDMA version: 2, bailing\.\.\."):
        RdmaCapabilities(version=2).answer(RDMA_CAPABILITY_PIN_ALL)
    with pytest.raises(RdmaProtocolError, match="too short"):
        RdmaCapabilities.decode(b"\x00\x00\x00\x01")


def test_dest_block_layout_carries_a_64_bit_key() -> None:
    block = DestBlock(remote_host_addr=0x7F00_1234_5000, offset=0x400_0000, length=0x2_0000,
                      key=0x1122_3344_5566_7788)
    raw = block.encode()
    assert raw == (bytes.fromhex("00007f0012345000 0000000004000000 0000000000020000")
                   + bytes.fromhex("55667788 11223344"))
    msg = decode_message(encode_message(ControlType.RAM_BLOCKS_RESULT,
                                        encode_dest_blocks([block, DestBlock(0, 0, 4096)])))
    assert decode_dest_blocks(msg) == [block, DestBlock(0, 0, 4096, 0)]


def test_a_32_bit_key_leaves_the_padding_zero_as_in_qemu() -> None:
    assert RegisterResult(0xABCD, 0x1000).encode() == bytes.fromhex(
        "0000abcd 00000000 0000000000001000")


def test_register_request_and_result_round_trip() -> None:
    requests = [Register(0x10_0000, 0, 0), Register(0x420_0000, 3, 5)]
    raw = encode_register_requests(requests)
    assert raw[HEADER_SIZE:HEADER_SIZE + 24] == bytes.fromhex(
        "0000000000100000 00000000 00000000 0000000000000000")
    msg = decode_message(raw)
    assert msg.repeat == 2
    assert decode_register_requests(msg) == requests
    results = [RegisterResult(1, 0), RegisterResult(1 << 40, (1 << 64) - MiB)]
    assert decode_register_results(decode_message(encode_register_results(results))) == results


def test_compress_round_trip() -> None:
    fills = [Compress(0, 1, 0x10_0000, 0x10_0000), Compress(0xFF, 0, 4096, 4096)]
    raw = encode_compress(fills)
    assert raw[HEADER_SIZE:HEADER_SIZE + 24] == bytes.fromhex(
        "00000000 00000001 0000000000100000 0000000000100000")
    msg = decode_message(raw)
    assert msg.type == ControlType.COMPRESS and msg.repeat == 2
    assert decode_compress(msg) == fills


def test_expect_reports_errors_and_surprises() -> None:
    ready = decode_message(encode_message(ControlType.READY, repeat=8))
    assert expect(ready, ControlType.READY) is ready
    with pytest.raises(RdmaProtocolError, match="expected REGISTER_RESULT, received READY"):
        expect(ready, ControlType.REGISTER_RESULT)
    with pytest.raises(RdmaProtocolError, match="peer reported an error"):
        expect(decode_message(encode_message(ControlType.ERROR)), ControlType.READY)


def test_block_base_and_remote_address_wrap_modulo_2_64() -> None:
    # Offset-based registration starting 3 MiB into a block: byte 3 MiB + 5 is offset 5.
    base = block_base_for(0, 3 * MiB)
    assert base == (1 << 64) - 3 * MiB
    assert remote_address(base, 3 * MiB + 5) == 5
    # Virtual addressing: the base is the block's own address.
    assert block_base_for(0x7F00_0030_0000, 3 * MiB) == 0x7F00_0000_0000


def test_merge_pages_joins_contiguous_pages_up_to_the_limit() -> None:
    page = 4096
    offsets = [0, 4096, 8192, 5 * page, 6 * page, 100 * page]
    assert list(merge_pages(offsets, page, 1 << 30)) == [
        (0, 3 * page), (5 * page, 2 * page), (100 * page, page)]
    whole = list(merge_pages(range(0, 5 * MiB, page), page, 5 * MiB))
    assert whole == [(0, RDMA_MERGE_MAX), (2 * MiB, RDMA_MERGE_MAX), (4 * MiB, MiB)]


@pytest.mark.parametrize("offset", [1, -4096, 8192])
@pytest.mark.parametrize("as_array", [False, True])
def test_merge_pages_refuses_pages_outside_the_block(offset: int, as_array: bool) -> None:
    pages = np.array([0, offset]) if as_array else [0, offset]
    with pytest.raises(ValueError, match="is not a page of a block"):
        list(merge_pages(pages, 4096, 8192))


@given(st.lists(st.integers(0, 1023), max_size=300), st.sampled_from([4096, 8192]),
       st.sampled_from([8192, 65536, RDMA_MERGE_MAX]))
def test_merge_pages_of_an_array_equals_the_loop(pages: list[int], page_size: int,
                                                 limit: int) -> None:
    offsets = [p * page_size for p in pages]
    expected = list(merge_pages(offsets, page_size, 1024 * page_size, limit))
    got = list(merge_pages(np.array(offsets, dtype=np.uint64), page_size, 1024 * page_size, limit))
    assert got == expected
    assert all(isinstance(v, int) for run in got for v in run)


def test_chunk_map_missing_runs_and_segments() -> None:
    chunk_map: ChunkMap[tuple[int, int]] = ChunkMap(5 * MiB + 4096)
    assert len(chunk_map) == 6
    assert chunk_map.missing_runs([(MiB - 4096, 2 * MiB)]) == [(0, 3)]
    assert chunk_map.missing_runs([(0, 4096), (5 * MiB, 4096), (MiB, 4096)]) == [(0, 2), (5, 1)]
    first = (7, 0)
    chunk_map.set_range(1, 2, first)
    assert chunk_map.missing_runs([(0, 4 * MiB)]) == [(0, 1), (3, 1)]
    assert chunk_map.chunk_span(5, 1) == (5 * MiB, 4096)
    second = (8, (1 << 64) - 3 * MiB)
    chunk_map.set_range(3, 1, second)
    pieces = list(chunk_map.segments(MiB + 4096, 3 * MiB - 8192))
    assert pieces == [(MiB + 4096, 2 * MiB - 4096, first), (3 * MiB, MiB - 4096, second)]
    with pytest.raises(RdmaError, match="chunk 0 is used before it is registered"):
        list(chunk_map.segments(0, 4096))


@given(st.lists(st.integers(0, 15), min_size=1, max_size=16),
       st.integers(0, 16 * MiB - 1), st.integers(1, 8 * MiB))
def test_segments_cover_the_range_exactly(cuts: list[int], offset: int, length: int) -> None:
    size = 16 * MiB
    length = min(length, size - offset)
    chunk_map: ChunkMap[int] = ChunkMap(size)
    boundaries = sorted(set(cuts) | {0, 16})
    for key, (start, stop) in enumerate(zip(boundaries, boundaries[1:])):
        chunk_map.set_range(start, stop - start, key)
    pieces = list(chunk_map.segments(offset, length))
    assert pieces[0][0] == offset
    assert sum(p[1] for p in pieces) == length
    for (a, alen, reg), (b, _blen, reg_b) in zip(pieces, pieces[1:]):
        assert a + alen == b and reg != reg_b
    for start, piece_len, reg in pieces:
        last = (start + piece_len - 1) // RDMA_REG_CHUNK_SIZE
        for chunk in range(start // RDMA_REG_CHUNK_SIZE, last + 1):
            assert chunk_map.get(chunk) == reg


def test_compress_fill_writes_only_pages_that_need_it() -> None:
    from pyvm.migration.transports.rdma_transport import RdmaIncoming
    page = 4096
    ram = bytearray(8 * page)
    ram[2 * page + 5] = 1
    ram[7 * page] = 3
    inc = RdmaIncoming.__new__(RdmaIncoming)     # just the block table _fill needs
    inc._blocks, inc._views, inc._offsets = [("pc.ram", ram, len(ram))], [memoryview(ram)], [0]
    inc._zero_hints = [None]
    inc._fill(Compress(0, 0, page, 6 * page))
    assert ram[2 * page + 5] == 0 and ram[7 * page] == 3
    inc._fill(Compress(7, 0, 0, page))
    assert ram[:page] == b"\x07" * page and ram[page:7 * page] == bytes(6 * page)
    # pages a hint says are zero (never populated) are neither read nor written
    ram[3 * page] = ram[4 * page] = 9
    asked = []

    def hint(first: int, count: int):
        asked.append((first, count))
        return np.array([i == 3 for i in range(first, first + count)])
    inc._zero_hints = [hint]
    inc._fill(Compress(0, 0, 2 * page, 3 * page))
    assert asked == [(2, 3)]
    assert ram[3 * page] == 9 and ram[4 * page] == 0
