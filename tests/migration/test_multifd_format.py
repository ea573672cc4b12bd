"""The multifd packet codec and the per-channel compression streams, without a VM.

Golden bytes are laid out by hand from QEMU 8.2's migration/multifd.h structs
(``MultiFDInit_t``, ``MultiFDPacket_t``, both packed and big-endian)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from pyvm.migration.stream.multifd_compression import (ZlibCompressor, ZlibDecompressor,
                                                       ZstdCompressor, ZstdDecompressor,
                                                       compressor, decompressor)
from pyvm.migration.stream.multifd_format import (MULTIFD_FLAG_SYNC, MULTIFD_FLAG_ZLIB,
                                                  PACKET_SIZE, MultifdPacketError,
                                                  decode_initial_packet, decode_packet,
                                                  encode_initial_packet, encode_packet)

UUID = bytes.fromhex("00112233445566778899aabbccddeeff")
BLOCKS = {"pc.ram": 32 << 20}


def _length(name: str) -> int | None:
    return BLOCKS.get(name)


def test_initial_packet_golden_bytes() -> None:
    golden = (bytes.fromhex("11223344" "00000001") + UUID + b"\x03" + bytes(7) + bytes(32))
    assert len(golden) == 64
    assert encode_initial_packet(UUID, 3) == golden
    assert decode_initial_packet(golden, UUID, 4) == 3


def test_page_packet_golden_bytes() -> None:
    golden = bytearray()
    golden += bytes.fromhex("11223344" "00000001" "00000002" "00000080" "00000002" "00000064")
    golden += bytes.fromhex("0000000000000005") + bytes(32)
    golden += b"pc.ram" + bytes(256 - 6)
    golden += bytes.fromhex("0000000000001000" "0000000000003000") + bytes(126 * 8)
    assert len(golden) == PACKET_SIZE == 1344
    offsets = np.array([0x1000, 0x3000], dtype=np.int64)
    assert encode_packet(MULTIFD_FLAG_ZLIB, 5, "pc.ram", offsets, 100) == bytes(golden)
    packet = decode_packet(golden, _length)
    assert (packet.flags, packet.pages_alloc, packet.next_packet_size, packet.packet_num,
            packet.block) == (MULTIFD_FLAG_ZLIB, 128, 100, 5, "pc.ram")
    assert packet.offsets.tolist() == [0x1000, 0x3000]
    assert not packet.sync and packet.compression == MULTIFD_FLAG_ZLIB


def test_sync_packet_names_no_block() -> None:
    raw = encode_packet(MULTIFD_FLAG_SYNC, 9, "pc.ram", np.zeros(0, dtype=np.int64), 0)
    assert raw[:28] == bytes.fromhex("11223344" "00000001" "00000001" "00000080" "00000000"
                                     "00000000" "00000000")
    assert raw[64:320] == bytes(256)
    packet = decode_packet(raw, _length)
    assert packet.sync and packet.normal_pages == 0 and packet.packet_num == 9


def _packet(**fields: int) -> bytearray:
    raw = bytearray(encode_packet(0, 1, "pc.ram", np.array([0, 4096], dtype=np.int64), 8192))
    where = {"magic": 0, "version": 4, "pages_alloc": 12, "normal": 16}
    for name, value in fields.items():
        raw[where[name]:where[name] + 4] = value.to_bytes(4, "big")
    return raw


@pytest.mark.parametrize("fields,text", [
    ({"magic": 0x11223345}, "multifd: received packet magic 11223345 and expected magic 11223344"),
    ({"version": 2}, "multifd: received packet version 2 and expected version 1"),
    ({"pages_alloc": 129}, "multifd: received packet with size 129 and expected a size of 128"),
    ({"pages_alloc": 1}, "multifd: received packet with 2 pages and expected maximum pages are 1"),
])
def test_corrupted_packets_are_refused_with_qemus_texts(fields, text) -> None:
    with pytest.raises(MultifdPacketError) as err:
        decode_packet(_packet(**fields), _length)
    assert str(err.value) == text


def test_packet_naming_an_unknown_block_or_a_page_outside_it() -> None:
    raw = bytearray(encode_packet(0, 1, "nope", np.array([0], dtype=np.int64), 4096))
    with pytest.raises(MultifdPacketError, match="^multifd: unknown ram block nope$"):
        decode_packet(raw, _length)
    last = (32 << 20) - 4096
    assert decode_packet(encode_packet(0, 1, "pc.ram", np.array([last], dtype=np.int64), 4096),
                         _length).offsets.tolist() == [last]
    raw = encode_packet(0, 1, "pc.ram", np.array([0, last + 4096], dtype=np.int64), 8192)
    with pytest.raises(MultifdPacketError) as err:
        decode_packet(raw, _length)
    assert str(err.value) == f"multifd: offset too long {last + 4096} (max 2000000)"
    with pytest.raises(MultifdPacketError, match="not page aligned"):
        decode_packet(encode_packet(0, 1, "pc.ram", np.array([5], dtype=np.int64), 4096), _length)


def test_initial_packet_refusals() -> None:
    good = encode_initial_packet(UUID, 1)
    bad_magic = b"\x11\x22\x33\x45" + good[4:]
    with pytest.raises(MultifdPacketError, match="^multifd: received packet magic 11223345 "
                                                 "expected 11223344$"):
        decode_initial_packet(bad_magic, UUID, 2)
    with pytest.raises(MultifdPacketError, match="^multifd: received packet version 7 expected 1$"):
        decode_initial_packet(good[:4] + (7).to_bytes(4, "big") + good[8:], UUID, 2)
    with pytest.raises(MultifdPacketError) as err:
        decode_initial_packet(good, bytes(16), 2)
    assert str(err.value) == ("multifd: received uuid '00112233-4455-6677-8899-aabbccddeeff' and "
                              "expected uuid '00000000-0000-0000-0000-000000000000' for channel 1")
    with pytest.raises(MultifdPacketError, match="received channel version 1 expected 1"):
        decode_initial_packet(encode_initial_packet(UUID, 2), UUID, 2)


def _pages(n: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    # text-like pages: compressible, different per page
    return rng.integers(97, 105, n * 4096, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("method", ["zlib", "zstd"])
def test_one_stream_per_channel_with_a_flush_per_packet(method) -> None:
    comp = compressor(method, 1, 1)
    decomp = decompressor(method, 0)
    assert comp is not None and decomp is not None
    packets = [_pages(n, seed) for seed, n in enumerate((1, 128, 7))]
    outs = [comp.compress(p) for p in packets]
    if method == "zlib":
        assert outs[0][:2] == b"\x78\x01"                 # zlib header, level 1: one stream
        assert all(o[-4:] == b"\x00\x00\xff\xff" for o in outs)   # Z_SYNC_FLUSH marks
        assert all(o[:2] != b"\x78\x01" for o in outs[1:])
        # the packets together are one zlib stream any inflater reads
        assert zlib.decompressobj().decompress(b"".join(outs)) == b"".join(packets)
    else:
        assert outs[0][:4] == bytes.fromhex("28b52ffd")   # zstd frame magic, once
        assert all(o[:4] != bytes.fromhex("28b52ffd") for o in outs[1:])
    for p, o in zip(packets, outs):
        assert len(o) < len(p)
        assert decomp.decompress(o, len(p)) == p          # each packet alone, in order


def test_decompression_refusals_use_qemus_texts() -> None:
    comp = ZlibCompressor(1)
    data = comp.compress(_pages(2, 3))
    with pytest.raises(MultifdPacketError, match=r"^multifd 3: packet size received 8192 size "
                                                 r"expected 4096$"):
        ZlibDecompressor(3).decompress(data, 4096)
    with pytest.raises(MultifdPacketError, match=r"^multifd 1: inflate returned -3 instead of Z_OK$"):
        ZlibDecompressor(1).decompress(b"\x78\x01\xff\xff\xff\xff" + data, 8192)
    zdata = ZstdCompressor(1).compress(_pages(2, 3))
    with pytest.raises(MultifdPacketError, match=r"^multifd 2: packet size received 8192 size "
                                                 r"expected 12288$"):
        ZstdDecompressor(2).decompress(zdata, 12288)
    with pytest.raises(MultifdPacketError, match=r"^multifd 0: decompressStream returned "):
        ZstdDecompressor(0).decompress(b"\x00" * 32, 4096)
