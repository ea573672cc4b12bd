"""Layers 5 and 6: whole streams from the encoder through the push-style decoder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from migration_fakes import (FAKE_VMSD, PAGE, FakeDevice, FakeTarget, decode_stream, encode_stream, make_ram,
                             sample_device)
from pyvm.fastpath import RecordBatch
from pyvm.migration.stream.ram_format import RamPageWriter
from pyvm.migration import StreamBlock, StreamDecoder, StreamEncoder
from pyvm.migration.stream.decoder import EndOfState, RunStateLoaded, SectionLoaded, StreamFinished, VmDescription
from pyvm.migration.errors import (DecoderStoppedError, EncodeError, MigrationError, StreamFormatError,
                                   TruncatedStreamError)
from tests.stream_in_memory import join_chunks


def _source(npages: int = 8):
    ram = make_ram(npages)
    return ram, [StreamBlock("pc.ram", len(ram), 0, ram)], [("fake-dev", 0, sample_device())]


def _destination(npages: int = 8, **kwargs):
    ram = bytearray(b"\xee" * (npages * PAGE))
    dev = FakeDevice()
    return ram, dev, FakeTarget([StreamBlock("pc.ram", len(ram), 0, ram)], {("fake-dev", 0): dev}, **kwargs)


@pytest.mark.parametrize("chunk", [0, 1, 7, 4096, 5000])
def test_round_trip_in_any_chunking(chunk: int) -> None:
    src_ram, blocks, devices = _source()
    data = encode_stream(blocks, devices, runstate="paused")
    ram, dev, target = _destination()
    dec = decode_stream(data, target, chunk)
    assert ram == src_ram
    assert dev.state() == sample_device().state()
    assert dev.post_loads == 1 and devices[0][2].pre_saves == 1
    assert target.runstate == "paused" and dec.runstate == "paused"
    assert dec.state_complete and dec.finished and dec.offset == len(data)


def test_events_in_stream_order() -> None:
    _, blocks, devices = _source(2)
    data = encode_stream(blocks, devices)
    _, _, target = _destination(2)
    dec = StreamDecoder(target, keep_vmdesc=True)
    events = dec.feed(data) + dec.close()
    kinds = [(e.section_type, e.idstr, e.section_id) for e in events if isinstance(e, SectionLoaded)]
    assert kinds == [(1, "ram", 2), (2, "ram", 2), (3, "ram", 2), (4, "fake-dev", 3), (4, "globalstate", 4)]
    assert RunStateLoaded("running") in events
    assert isinstance(events[-1], StreamFinished) and isinstance(events[-3], EndOfState)
    vmdesc = next(e for e in events if isinstance(e, VmDescription))
    assert vmdesc.json is not None
    assert json.loads(vmdesc.json)["devices"][0]["name"] == "fake-dev"


def test_vmdesc_exact_text() -> None:
    enc = StreamEncoder(describe_configuration=False)
    enc.header()
    enc.configuration("pc-i440fx-8.2")
    enc.register("timer", 0, section_id=0)
    enc.device_sections([("timer", 0, FakeDevice(FAKE_VMSD, extra=0))])
    tail = join_chunks(enc.eof_and_vmdesc())
    text = ('{"page_size": 4096, "devices": [{"name": "timer", "instance_id": 0, "vmsd_name": "fake-dev", '
            '"version": 2, "fields": [{"name": "a", "type": "uint8", "size": 1}, '
            '{"name": "regs", "array_len": 3, "type": "int32", "size": 4}, '
            '{"name": "blob", "type": "buffer", "size": 5}, {"name": "flag", "type": "bool", "size": 1}]}]}')
    assert tail == b"\x00\x06" + len(text).to_bytes(4, "big") + text.encode()


def test_vmdesc_configuration_object_first_by_default() -> None:
    enc = StreamEncoder()
    enc.configuration("pc", ["x-ignore-shared"])
    assert list(enc.vmdesc()) == ["configuration", "page_size", "devices"]


def test_section_ids_ram_first_then_registration_order() -> None:
    enc = StreamEncoder()
    assert enc.register("ram") == 2
    assert enc.register("timer", 0, section_id=0) == 0
    assert enc.register("cpu", 0) == 3 and enc.register("cpu", 1) == 4 and enc.register("cpu", 0) == 3
    with pytest.raises(EncodeError):
        enc.register("other", 0, section_id=3)


def test_device_without_vmsd_blocks_migration() -> None:
    class NoState:
        vmsd = None
    with pytest.raises(EncodeError, match="^State blocked by non-migratable device 'x'$"):
        StreamEncoder().device_section("x", 0, NoState())


def _fail(data: bytes, target: FakeTarget | None = None, chunk: int = 0) -> MigrationError:
    if target is None:
        target = _destination()[2]
    with pytest.raises(MigrationError) as info:
        decode_stream(data, target, chunk)
    return info.value


def _good_stream() -> bytes:
    _, blocks, devices = _source()
    return encode_stream(blocks, devices)


def test_header_errors() -> None:
    assert str(_fail(b"QEVX" + bytes(4))) == "Not a migration stream"
    err = _fail(bytes.fromhex("5145564d 00000002"))
    assert str(err) == "SaveVM v2 format is obsolete and don't work anymore"
    assert err.report()[-1] == "load of migration failed: Operation not supported"
    assert str(_fail(bytes.fromhex("5145564d 00000004"))) == "Unsupported migration stream version"
    assert str(_fail(bytes.fromhex("5145564d 00000003 01"))) == "Configuration section missing"


def test_machine_type_mismatch() -> None:
    err = _fail(_good_stream(), _destination(machine="pc-q35-8.2")[2])
    assert err.report() == ["Machine type received is 'pc-i440fx-8.2' and local is 'pc-q35-8.2'",
                            "load of migration failed: Invalid argument"]


def test_capability_mismatch() -> None:
    err = _fail(_good_stream(), _destination(caps=("x-ignore-shared",))[2])
    assert err.lines == ["Capability x-ignore-shared is on, but received capability is off"]


def test_unknown_device_section() -> None:
    ram, dev, target = _destination()
    del target.devices[("fake-dev", 0)]
    err = _fail(_good_stream(), target)
    assert str(err) == ("Unknown savevm section or instance 'fake-dev' 0. Make sure that your current VM setup "
                        "matches your saved VM setup, including any hotplugged devices")


def test_device_version_too_new() -> None:
    _, blocks, _ = _source()
    newer = FakeDevice(FAKE_VMSD.__class__(name="fake-dev", version_id=3, fields=FAKE_VMSD.fields))
    err = _fail(encode_stream(blocks, [("fake-dev", 0, newer)]))
    assert str(err) == "savevm: unsupported version 3 for 'fake-dev' v2"


def test_failed_device_load_keeps_old_state_and_adds_qemu_context() -> None:
    data = _good_stream()
    cut = data.index(b"fake-dev") + len(b"fake-dev") + 8 + 3     # inside the device's fields
    ram, dev, target = _destination()
    before = dev.state()
    err = _fail(data[:cut], target)
    assert err.lines == ["Failed to load fake-dev:regs", "error while loading state for instance 0x0 of device 'fake-dev'"]
    assert err.report()[-1] == "load of migration failed: Input/output error"
    assert dev.state() == before and dev.post_loads == 0


def test_unknown_section_type_and_unknown_section_id() -> None:
    data = _good_stream()
    eof = data.index(b"\x00\x06", len(data) - 2000)
    assert str(_fail(data[:eof] + b"\x09")) == "Unknown savevm section type 9"
    assert str(_fail(data[:eof] + bytes.fromhex("02 00000063"))) == "Unknown savevm section 99"


def test_missing_footer() -> None:
    data = bytearray(_good_stream())
    end = data.index(bytes.fromhex("03 00000002 00000000 00000010 7e"))
    data[end + 13] = 0x00
    assert str(_fail(bytes(data))) == "Missing section footer for ram"


def test_ram_error_in_part_section_context() -> None:
    data = bytearray(_good_stream())
    part = data.index(bytes.fromhex("02 00000002"))
    data[part + 5:part + 13] = bytes.fromhex("00000000 00000001")
    err = _fail(bytes(data))
    assert err.lines == ["Unknown combination of migration flags: 0x1", "error while loading state section id 2(ram)"]


def test_truncation_between_sections_is_an_io_error() -> None:
    data = _good_stream()
    end = data.index(bytes.fromhex("03 00000002 00000000 00000010 7e 00000002")) + 18
    err = _fail(data[:end])
    assert isinstance(err, TruncatedStreamError)
    assert err.report() == ["load of migration failed: Input/output error"]


def test_decoder_refuses_input_after_an_error() -> None:
    _, _, target = _destination()
    dec = StreamDecoder(target)
    with pytest.raises(StreamFormatError):
        dec.feed(b"NOPE" + bytes(8))
    with pytest.raises(DecoderStoppedError):
        dec.feed(_good_stream())
    with pytest.raises(DecoderStoppedError):
        dec.close()


def test_stream_without_vmdesc_only_warns() -> None:
    data = _good_stream()
    eof = data.index(b"\x00\x06", len(data) - 2000)
    _, _, target = _destination()
    dec = decode_stream(data[:eof + 1], target)
    assert dec.finished and dec.warnings == ["Expected vmdescription section, but got 0"]


@pytest.mark.parametrize("chunk", [0, 3])
def test_vmdesc_is_skipped_unless_kept(chunk: int) -> None:
    data = _good_stream()
    eof = data.index(b"\x00\x06", len(data) - 2000)
    length = int.from_bytes(data[eof + 2:eof + 6], "big")
    _, _, target = _destination()
    dec = StreamDecoder(target)
    pieces = [data[i:i + chunk] for i in range(0, len(data), chunk)] if chunk else [data]
    events = [e for piece in pieces for e in dec.feed(piece)] + dec.close()
    assert VmDescription(length, None) in events and dec.finished and not dec.warnings


def test_truncated_vmdesc_ends_the_load_quietly() -> None:
    """A trailer cut short (here: one that claims 1 GiB) cannot fail a finished load."""
    data = _good_stream()
    eof = data.index(b"\x00\x06", len(data) - 2000)
    data = data[:eof + 2] + (1 << 30).to_bytes(4, "big") + bytes(4096)
    _, _, target = _destination()
    dec = StreamDecoder(target)
    events = dec.feed(data) + dec.close()
    assert dec.finished and not any(isinstance(e, VmDescription) for e in events)


def test_bytes_after_the_stream_are_ignored() -> None:
    _, _, target = _destination()
    dec = StreamDecoder(target)
    dec.feed(_good_stream())
    assert dec.finished
    assert dec.feed(b"garbage") == [] and dec.trailing_bytes == 7


def test_decoder_releases_ram_views_at_the_end() -> None:
    ram, dev, target = _destination()
    dec = decode_stream(_good_stream(), target)
    assert dec.ram is not None and all(b.view is None for b in dec.ram.blocks.values())


def test_a_paused_source_in_globalstate() -> None:
    _, blocks, devices = _source()
    _, _, target = _destination()
    decode_stream(encode_stream(blocks, devices, runstate="prelaunch"), target)
    assert target.runstate == "prelaunch"


def test_x_ignore_shared_stream_round_trip() -> None:
    shared = bytearray(b"S" * (2 * PAGE))
    src_ram = make_ram(4)
    blocks = [StreamBlock("pc.ram", len(src_ram), 0, src_ram),
              StreamBlock("mem0", len(shared), 0x100000000, shared, ignored=True)]
    data = encode_stream(blocks, [], caps=("x-ignore-shared",))
    dst_ram = bytearray(len(src_ram))
    target = FakeTarget([StreamBlock("pc.ram", len(dst_ram), 0, dst_ram),
                         StreamBlock("mem0", len(shared), 0x100000000, None, ignored=True)],
                        caps=("x-ignore-shared",))
    decode_stream(data, target)
    assert dst_ram == src_ram
    wrong = FakeTarget([StreamBlock("pc.ram", len(dst_ram), 0, bytearray(len(src_ram))),
                        StreamBlock("mem0", len(shared), 0x200000000, None, ignored=True)], caps=("x-ignore-shared",))
    assert str(_fail(data, wrong)) == "Mismatched GPAs for block mem0 4294967296!= 8589934592"


def test_encoder_rejects_misuse() -> None:
    enc = StreamEncoder()
    block = StreamBlock("pc.ram", PAGE, 0, bytearray(PAGE))
    batch = RecordBatch(8)
    with pytest.raises(EncodeError, match="outside a RAM section"):
        enc.ram_pages(block, [0], [True])
    enc.ram_section_begin()
    with pytest.raises(EncodeError, match="page index 1 beyond the block"):
        RamPageWriter().batch_run(batch, block, np.array([1]), 0)
    with pytest.raises(EncodeError):
        enc.eof_and_vmdesc()
    with pytest.raises(EncodeError):
        enc.ram_setup([StreamBlock("odd", 100, 0, bytearray(100))], False)
