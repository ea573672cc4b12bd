"""Layer 4: the "ram" section payload, against QEMU 7.2's observed bytes, and its load checks."""

from __future__ import annotations

import pytest

import numpy as np

from migration_fakes import PAGE, FakeTarget, make_ram, ram_batch_bytes
from pyvm.fastpath import RecordBatch
from pyvm.migration.stream.ram_format import RamPageWriter
from pyvm.migration import StreamBlock, StreamDecoder, StreamEncoder
from pyvm.migration.errors import MigrationError, StreamFormatError, StreamMismatchError, UnsupportedFeatureError
from pyvm.migration.stream.ram_loader import RamLoader
from pyvm.migration.stream.reader import StreamReader
from tests.stream_in_memory import join_chunks, run_to_completion

# QEMU 7.2, -machine pc -m 64 (a stream QEMU wrote): block names and used lengths
QEMU72_BLOCKS = [("pc.ram", 0x4000000), ("/rom@etc/acpi/tables", 0x20000), ("pc.bios", 0x40000),
                 ("pc.rom", 0x20000), ("/rom@etc/table-loader", 0x1000), ("/rom@etc/acpi/rsdp", 0x1000)]
QEMU72_HEADER = bytes.fromhex("5145564d 00000003 07 0000000d") + b"pc-i440fx-7.2"
QEMU72_RAM_START = (bytes.fromhex("01 00000002 03") + b"ram" + bytes.fromhex("00000000 00000004")
                    + bytes.fromhex("00000000 04082004")
                    + b"\x06pc.ram" + bytes.fromhex("00000000 04000000")
                    + b"\x14/rom@etc/acpi/tables" + bytes.fromhex("00000000 00020000")
                    + b"\x07pc.bios" + bytes.fromhex("00000000 00040000")
                    + b"\x06pc.rom" + bytes.fromhex("00000000 00020000")
                    + b"\x15/rom@etc/table-loader" + bytes.fromhex("00000000 00001000")
                    + b"\x12/rom@etc/acpi/rsdp" + bytes.fromhex("00000000 00001000")
                    + bytes.fromhex("00000000 00000010 7e 00000002"))
QEMU72_PART_START = bytes.fromhex("02 00000002 00000000 00000002 06") + b"pc.ram" + b"\x00" + bytes.fromhex(
    "00000000 00001022 00")
QEMU72_END = bytes.fromhex("03 00000002 00000000 00000010 7e 00000002")


def _blocks(with_buffers: bool = False) -> list[StreamBlock]:
    return [StreamBlock(name, length, 0, bytearray(length) if with_buffers else None) for name, length in QEMU72_BLOCKS]


def test_encoder_writes_qemu_7_2_setup_bytes() -> None:
    enc = StreamEncoder()
    blocks = _blocks(with_buffers=True)
    data = join_chunks(enc.header() + enc.configuration("pc-i440fx-7.2") + enc.ram_setup(blocks, False))
    assert data == QEMU72_HEADER + QEMU72_RAM_START
    part = join_chunks(enc.ram_section_begin()) + ram_batch_bytes(enc, blocks[0], [0, 1])
    assert part == QEMU72_PART_START
    assert join_chunks(enc.ram_eos()) == bytes.fromhex("00000000 00000010 7e 00000002")
    assert join_chunks(enc.ram_section_begin(final=True) + enc.ram_eos()) == QEMU72_END


def test_decoder_reads_qemu_7_2_stream_prefix() -> None:
    blocks = _blocks(with_buffers=True)
    blocks[0].buffer[0:4] = b"junk"
    target = FakeTarget(blocks, machine="pc-i440fx-7.2")
    dec = StreamDecoder(target)
    dec.feed(QEMU72_HEADER + QEMU72_RAM_START + QEMU72_PART_START + bytes.fromhex("00000000 00000010 7e 00000002")
             + QEMU72_END)
    assert target.lookups == [(name, length) for name, length in QEMU72_BLOCKS]
    assert blocks[0].buffer[0:4] == bytes(4)            # the ZERO record cleared page 0
    assert dec.ram is not None and dec.ram.zero_pages == 2
    assert not dec.state_complete


def test_x_ignore_shared_setup_carries_gpas() -> None:
    enc = StreamEncoder()
    ram = StreamBlock("pc.ram", 2 * PAGE, 0x100000, bytearray(2 * PAGE), ignored=True)
    data = join_chunks(enc.ram_setup([ram], True))
    assert data[17:] == (bytes.fromhex("00000000 00002004 06") + b"pc.ram"
                         + bytes.fromhex("00000000 00002000 00000000 00100000 00000000 00000010 7e 00000002"))


def test_page_payloads_are_read_from_guest_ram_when_sent(tmp_path) -> None:
    ram = make_ram(4)                       # pages 0 and 3 hold data, 1 and 2 are zero
    block = StreamBlock("pc.ram", len(ram), 0, ram)
    batch = RecordBatch(8)
    end, _, zeros = RamPageWriter().batch_run(batch, block, np.array([0, 1, 3]), 0)
    assert (end, zeros) == (3, 1)
    ram[3 * PAGE:3 * PAGE + 5] = b"later"   # after packing, before sending: no copy was made
    with open(tmp_path / "sent", "wb") as f:
        while batch.remaining:
            batch.send(f.fileno())
    sent = (tmp_path / "sent").read_bytes()
    assert sent.endswith(b"later" + bytes(ram[3 * PAGE + 5:4 * PAGE]))


def _load_payload(payload: bytes, blocks: list[StreamBlock], ignore_shared: bool = False) -> RamLoader:
    loader = RamLoader(lambda name, length: next((b for b in blocks if b.name == name), None), ignore_shared)
    r = StreamReader()
    r.feed(payload)
    run_to_completion(loader.load(r, 4), r)
    return loader


SETUP_1 = bytes.fromhex("00000000 00002004 06") + b"pc.ram" + bytes.fromhex("00000000 00002000")
EOS = bytes.fromhex("00000000 00000010")


@pytest.mark.parametrize("payload,text", [
    (bytes.fromhex("00000000 00002004 03") + b"foo" + bytes.fromhex("00000000 00002000"),
     'Unknown ramblock "foo", cannot accept migration'),
    (bytes.fromhex("00000000 00004004 06") + b"pc.ram" + bytes.fromhex("00000000 00004000"),
     "Size mismatch: pc.ram: 0x4000 != 0x2000: Invalid argument"),
    (bytes.fromhex("00000000 00002002 03") + b"foo" + b"\x00", "Can't find block foo"),
    (bytes.fromhex("00000000 00002022 00"), "Ack, bad migration stream!"),
    (bytes.fromhex("00000000 00002002 06") + b"pc.ram" + b"\x00", "Illegal RAM offset 2000"),
    (bytes.fromhex("ffffffff fffff008 06") + b"pc.ram" + bytes(PAGE), "Illegal RAM offset fffffffffffff000"),
    (bytes.fromhex("00000000 00000001"), "Unknown combination of migration flags: 0x1"),
    (bytes.fromhex("00000000 0000000a 06") + b"pc.ram", "Unknown combination of migration flags: 0xa"),
    (bytes.fromhex("00000000 00000100"), "Received an unexpected compressed page"),
    (bytes.fromhex("00000000 00000040 06") + b"pc.ram",
     "Failed to load XBZRLE page - wrong compression!"),
])
def test_ram_load_errors_use_qemu_texts(payload: bytes, text: str) -> None:
    ram = bytearray(2 * PAGE)
    guard = bytes(ram)
    with pytest.raises(MigrationError) as info:
        _load_payload(payload + EOS, [StreamBlock("pc.ram", len(ram), 0, ram)])
    assert str(info.value) == text
    assert ram == guard


def test_illegal_offset_lines_follow_qemu() -> None:
    with pytest.raises(StreamMismatchError) as info:
        _load_payload(bytes.fromhex("00000000 00001002 03") + b"foo" + b"\x00" + EOS,
                      [StreamBlock("pc.ram", PAGE, 0, bytearray(PAGE))])
    assert info.value.lines == ["Can't find block foo", "Illegal RAM offset 1000"]


def test_gpa_mismatch_text() -> None:
    payload = SETUP_1 + bytes.fromhex("00000000 00200000") + EOS
    block = StreamBlock("pc.ram", 2 * PAGE, 0x100000, None, ignored=True)
    with pytest.raises(StreamMismatchError, match="^Mismatched GPAs for block pc.ram 2097152!= 1048576$"):
        _load_payload(payload, [block], ignore_shared=True)
    _load_payload(SETUP_1 + bytes.fromhex("00000000 00100000") + EOS, [block], ignore_shared=True)


def test_pages_for_an_ignored_block_are_refused() -> None:
    block = StreamBlock("pc.ram", 2 * PAGE, 0, None, ignored=True)
    with pytest.raises(StreamMismatchError, match="^block pc.ram should not be migrated !$"):
        _load_payload(bytes.fromhex("00000000 00000002 06") + b"pc.ram" + b"\x00" + EOS, [block])


def test_multifd_flush_and_hook_markers_are_no_ops() -> None:
    markers = bytes.fromhex("00000000 00000200 00000000 00000080")     # MULTIFD_FLUSH, HOOK
    ram = bytearray(b"\x5a" * 2 * PAGE)
    loader = _load_payload(markers + EOS, [StreamBlock("pc.ram", 2 * PAGE, 0, ram)])
    assert ram == b"\x5a" * 2 * PAGE                                  # nothing written
    assert (loader.normal_pages, loader.zero_pages) == (0, 0)
    # ... and the records around them still load where they say
    page = bytes(range(256)) * (PAGE // 256)
    loader = _load_payload(markers + bytes.fromhex("00000000 00001008 06") + b"pc.ram" + page
                           + markers + bytes.fromhex("00000000 00000022 00") + EOS,
                           [StreamBlock("pc.ram", 2 * PAGE, 0, ram)])
    assert ram == bytes(PAGE) + page
    assert (loader.normal_pages, loader.zero_pages) == (1, 1)


def test_nonzero_fill_byte_fills_the_page_as_qemu_8_2_does() -> None:
    ram = bytearray(PAGE)
    _load_payload(bytes.fromhex("00000000 00000002 06") + b"pc.ram" + b"\xaa" + EOS, [StreamBlock("pc.ram", PAGE, 0, ram)])
    assert ram == b"\xaa" * PAGE


def test_read_only_destination_buffer_is_refused() -> None:
    with pytest.raises(StreamMismatchError):
        _load_payload(SETUP_1 + EOS, [StreamBlock("pc.ram", 2 * PAGE, 0, bytes(2 * PAGE))])


def test_unknown_flags_beyond_known_set() -> None:
    with pytest.raises(StreamFormatError):
        _load_payload(bytes.fromhex("00000000 00000400") + EOS, [])


def test_ram_version_other_than_4_is_refused() -> None:
    loader = RamLoader(lambda n, l: None, False)
    r = StreamReader()
    with pytest.raises(StreamMismatchError):
        run_to_completion(loader.load(r, 3), r)


def test_feature_errors_are_migration_errors() -> None:
    assert issubclass(UnsupportedFeatureError, MigrationError)
