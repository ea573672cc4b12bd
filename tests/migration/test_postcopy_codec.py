"""Postcopy's stream commands and the return path, encoded and decoded without a VM."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from pyvm.migration.errors import DecoderStoppedError, StreamFormatError, StreamMismatchError
from pyvm.migration.stream import postcopy_commands as pc
from pyvm.migration.stream import return_path as rp


def _split(record: bytes) -> tuple[int, bytes]:
    marker, cmd, length = struct.unpack_from(">BHH", record)
    assert marker == 0x08
    payload = record[5:]
    assert len(payload) == length
    return cmd, payload


@pytest.mark.parametrize("command", [
    pc.OpenReturnPath(), pc.Ping(0xDEADBEEF), pc.PostcopyAdvise(4096, 4096), pc.PostcopyListen(),
    pc.PostcopyRun(), pc.RamDiscard("pc.ram", ((0, 4096), (1 << 20, 8192))), pc.Packaged(12345),
    pc.PostcopyResume(), pc.RecvBitmap("pc.ram"),
])
def test_every_command_round_trips(command: pc.PostcopyCommand) -> None:
    cmd, payload = _split(pc.encode_command(command))
    assert pc.parse_command(cmd, payload) == command


def test_wire_bytes_match_savevm_c() -> None:
    # savevm.c: ADVISE carries two be64, PING one be32, DISCARD version/len/name/nil/ranges
    assert pc.encode_command(pc.PostcopyAdvise(4096, 4096)) == (
        b"\x08\x00\x03\x00\x10" + (4096).to_bytes(8, "big") * 2)
    assert pc.encode_command(pc.Ping(1)) == b"\x08\x00\x02\x00\x04\x00\x00\x00\x01"
    assert pc.encode_command(pc.RamDiscard("ab", ((16, 32),))) == (
        b"\x08\x00\x06\x00\x15" + b"\x00\x02ab\x00" + (16).to_bytes(8, "big") + (32).to_bytes(8, "big"))
    assert pc.packaged(b"xyz") == b"\x08\x00\x07\x00\x04\x00\x00\x00\x03xyz"


def test_discards_go_twelve_ranges_per_command() -> None:
    ranges = [(i * 8192, 4096) for i in range(30)]
    records = pc.discard_commands("pc.ram", ranges)
    assert len(records) == 3
    parsed = [pc.parse_command(*_split(r)) for r in records]
    assert [len(p.ranges) for p in parsed if isinstance(p, pc.RamDiscard)] == [12, 12, 6]
    assert [r for p in parsed if isinstance(p, pc.RamDiscard) for r in p.ranges] == ranges


@pytest.mark.parametrize("cmd, payload, text", [
    (pc.MIG_CMD_POSTCOPY_RAM_DISCARD, b"\x01\x01a\x00", "CMD_POSTCOPY_RAM_DISCARD invalid version (1)"),
    (pc.MIG_CMD_POSTCOPY_RAM_DISCARD, b"\x00\x01ax", "CMD_POSTCOPY_RAM_DISCARD missing nil (120)"),
    (pc.MIG_CMD_POSTCOPY_RAM_DISCARD, b"\x00\x01a\x00" + b"\0" * 15, "CMD_POSTCOPY_RAM_DISCARD invalid length (19)"),
    (pc.MIG_CMD_PING, b"\0\0\0", "PING received with bad length - expecting 4, got 3"),
    (pc.MIG_CMD_PACKAGED, struct.pack(">I", (1 << 24) + 1), "Unreasonably large packaged state: 16777217"),
    (pc.MIG_CMD_RECV_BITMAP, b"\x05ab", "CMD_RECV_BITMAP: invalid length 3"),
    (11, b"", "MIG_CMD 0xb unknown (len 0x0)"),
])
def test_malformed_commands_are_refused(cmd: int, payload: bytes, text: str) -> None:
    with pytest.raises(StreamFormatError) as info:
        pc.parse_command(cmd, payload)
    assert str(info.value) == text


def test_advise_checks_page_sizes() -> None:
    pc.check_advise(pc.PostcopyAdvise(4096, 4096), 4096)
    with pytest.raises(StreamMismatchError, match=r"^Postcopy needs matching RAM page sizes \(s=200000 d=1000\)$"):
        pc.check_advise(pc.PostcopyAdvise(0x200000, 4096), 4096)
    with pytest.raises(StreamMismatchError, match=r"^Postcopy needs matching target page sizes \(s=8192 d=4096\)$"):
        pc.check_advise(pc.PostcopyAdvise(4096, 8192), 4096)


# -- return path ----------------------------------------------------------------------------------

BLOCKS = {"pc.ram": 1000, "vga.vram": 64}


def _decoder() -> rp.ReturnPathDecoder:
    return rp.ReturnPathDecoder(BLOCKS.get)


def test_return_path_round_trip_byte_by_byte() -> None:
    enc = rp.ReturnPathEncoder()
    bitmap = np.zeros(rp.bitmap_bytes(BLOCKS["pc.ram"]) // 8, dtype=np.uint64)
    bitmap[3] = 0x8000_0000_0000_0001
    wire = (enc.pong(7) + enc.req_pages("pc.ram", 4096, 8192) + enc.req_pages("pc.ram", 0, 4096)
            + enc.req_pages("vga.vram", 0, 4096) + enc.recv_bitmap("pc.ram", bitmap)
            + enc.resume_ack() + enc.shut(False))
    # the second request for the same block is the short form
    assert wire.count(struct.pack(">HH", rp.MIG_RP_MSG_REQ_PAGES, 12)) == 1
    dec = _decoder()
    got: list[rp.ReturnPathMessage] = []
    for i in range(len(wire)):
        got += dec.feed(wire[i:i + 1])
    assert got[:4] == [rp.Pong(7), rp.ReqPages("pc.ram", 4096, 8192), rp.ReqPages("pc.ram", 0, 4096),
                       rp.ReqPages("vga.vram", 0, 4096)]
    assert isinstance(got[4], rp.RecvBitmap) and got[4].block == "pc.ram"
    assert np.array_equal(got[4].words, bitmap)
    assert got[5:] == [rp.ResumeAck(1), rp.Shut(False)]


def test_bitmap_on_the_wire_is_little_endian_words_with_the_end_mark() -> None:
    words = np.array([1, 2], dtype=np.uint64)
    msg = rp.ReturnPathEncoder().recv_bitmap("b", words)
    assert msg == (b"\x00\x05\x00\x02\x01b" + (16).to_bytes(8, "big") + (1).to_bytes(8, "little")
                   + (2).to_bytes(8, "little") + (0x0123456789ABCDEF).to_bytes(8, "big"))


@pytest.mark.parametrize("wire, text", [
    (struct.pack(">HH", 0, 0), "Received invalid message 0x0000 length 0x0000"),
    (struct.pack(">HH", 9, 4), "Received invalid message 0x0009 length 0x0004"),
    (struct.pack(">HHI", 2, 3, 0), "Received 'PONG' message (0x0002) withincorrect length 3 expecting 4"),
    (struct.pack(">HHQI", 4, 12, 0, 4096), "migrate_handle_rp_req_pages: no previous block"),
    (struct.pack(">HHQIB", 3, 14, 0, 4096, 1) + b"x", "MIG_RP_MSG_REQ_PAGES has no block 'x'"),
    (struct.pack(">HHQIB", 3, 19, 1000 * 4096, 4096, 6) + b"pc.ram",
     "MIG_RP_MSG_REQ_PAGES request overrun, start=0x3e8000 len=0x1000"),
    (struct.pack(">HHB", 5, 2, 1) + b"b", "RP: Invalid block name 'b'"),
    (struct.pack(">HHB", 5, 9, 8) + b"vga.vram" + struct.pack(">Q", 16),
     "ramblock 'vga.vram' bitmap size mismatch (0x10 != 0x8)"),
    (struct.pack(">HHB", 5, 9, 8) + b"vga.vram" + struct.pack(">QQQ", 8, 0, 5),
     "ramblock 'vga.vram' end mark incorrect: 0x5"),
    (struct.pack(">HHI", 6, 4, 2), "illegal resume_ack value 2"),
])
def test_the_source_refuses_what_qemu_refuses(wire: bytes, text: str) -> None:
    dec = _decoder()
    with pytest.raises(StreamFormatError) as info:
        dec.feed(wire)
    assert str(info.value) == text
    with pytest.raises(DecoderStoppedError):
        dec.feed(b"\0")
