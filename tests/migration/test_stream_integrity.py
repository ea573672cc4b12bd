"""Streams that cannot load half-right: completeness at EOF, x-checksum, escaped names."""

from __future__ import annotations

import random

import pytest

from migration_fakes import (PAGE, FakeDevice, FakeTarget, encode_stream, make_ram,
                             sample_device)
from pyvm.migration import StreamBlock, StreamDecoder, StreamEncoder
from pyvm.migration.errors import MigrationError, StreamMismatchError
from pyvm.migration.stream.text import shown
from tests.stream_mutations import mutations, split_stream

NPAGES = 16
DEVICES = ("fake-dev", 0), ("fake-dev", 1)
EXPECTED = [("ram", 0), ("globalstate", 0), *DEVICES]


def _stream(checksum: bool = False, **kw) -> bytes:
    ram = make_ram(NPAGES)
    blocks = [StreamBlock("pc.ram", len(ram), 0, ram)]
    devices = [(idstr, inst, sample_device()) for idstr, inst in DEVICES]
    caps = ("x-checksum",) if checksum else ()
    return encode_stream(blocks, devices, caps=caps, encoder=StreamEncoder(checksum=checksum), **kw)


def _load(data: bytes, checksum: bool = False, expected=EXPECTED, caps=None):
    ram = bytearray(NPAGES * PAGE)
    target = FakeTarget([StreamBlock("pc.ram", len(ram), 0, ram)],
                        {key: FakeDevice() for key in DEVICES},
                        caps=(("x-checksum",) if checksum else ()) if caps is None else caps)
    dec = StreamDecoder(target, expected_sections=expected)
    dec.feed(data)
    dec.close()
    return ram, target


def test_complete_stream_loads_with_the_check_on() -> None:
    ram, target = _load(_stream())
    assert ram == make_ram(NPAGES) and target.runstate == "running"


@pytest.mark.parametrize("idstr", ["fake-dev", "globalstate", "ram"])
def test_missing_section_fails_naming_the_device(idstr: str) -> None:
    split = split_stream(_stream())
    index = next(i for i, s in enumerate(split.sections) if s.opens and s.idstr == idstr)
    with pytest.raises(MigrationError) as info:
        _load(split.without(index))
    # ram's PART sections lose their START: that fails earlier, as an unknown section id
    if idstr != "ram":
        assert f"'{idstr}' instance 0" in str(info.value)
        assert "ended without the state of" in str(info.value)


def test_duplicate_section_fails_naming_the_device() -> None:
    split = split_stream(_stream())
    index = next(i for i, s in enumerate(split.sections) if s.idstr == "fake-dev")
    with pytest.raises(MigrationError, match=r"Section 'fake-dev' instance 0 appears twice"):
        _load(split.duplicated(index))


def test_without_expected_sections_the_decoder_stays_qemu_lenient() -> None:
    split = split_stream(_stream())
    index = next(i for i, s in enumerate(split.sections) if s.idstr == "globalstate")
    _, target = _load(split.without(index), expected=None)
    assert target.runstate is None


def test_checksum_round_trip_and_stream_shape() -> None:
    plain, summed = _stream(), _stream(checksum=True)
    split = split_stream(summed)
    plain_split = split_stream(plain)
    assert len(split.sections) == len(plain_split.sections)
    # up to EOF: the capability listed in the configuration, 4 more bytes per section
    assert split.tail_start - plain_split.tail_start - len(split.sections) * 4 \
        == len(b"\x05\x1aconfiguration/capabilities") + 4 + 4 + 1 + len("x-checksum")
    ram, target = _load(summed, checksum=True)
    assert ram == make_ram(NPAGES) and target.runstate == "running"


def test_checksum_capability_must_match_on_both_ends() -> None:
    with pytest.raises(StreamMismatchError,
                       match="Capability x-checksum is on, but received capability is off"):
        _load(_stream(), checksum=True)
    with pytest.raises(StreamMismatchError,
                       match="Capability x-checksum is off, but received capability is on"):
        _load(_stream(checksum=True), checksum=False)


def test_every_bit_flip_in_the_sections_is_caught_with_checksums() -> None:
    data = _stream(checksum=True)
    split = split_stream(data)
    rng = random.Random(16)
    offsets = range(split.prefix_end, split.tail_start)
    loaded = []
    for off in offsets:
        bad = bytearray(data)
        bad[off] ^= 1 << rng.randrange(8)
        try:
            _load(bytes(bad), checksum=True)
        except MigrationError:
            continue
        loaded.append(off)
    assert loaded == [], f"bit flips at {loaded[:10]} loaded"
    assert len(offsets) > 10000


def test_no_mutation_loads_with_checksums() -> None:
    data = _stream(checksum=True)
    split = split_stream(data)
    count = 0
    for label, bad in mutations(split, random.Random(7), random_count=100):
        count += 1
        with pytest.raises(MigrationError):
            _load(bad, checksum=True)
            pytest.fail(f"{label} loaded")
    assert count > 400


def test_structural_mutations_never_load_without_checksums() -> None:
    """Without the capability, only edits confined to page data may load."""
    split = split_stream(_stream())
    for i, s in enumerate(split.sections):
        if not s.opens or s.idstr == "ram":
            continue
        for bad in (split.without(i), split.duplicated(i)):
            with pytest.raises(MigrationError):
                _load(bad)


def test_shown_escapes_every_non_printable_byte() -> None:
    assert shown(b"pc.ram") == "pc.ram"
    assert shown(b"a\nb\x1b[31m\\\xff") == "a\\x0ab\\x1b[31m\\\\\\xff"
    assert shown(b"x" * 1000).endswith("...") and len(shown(b"x" * 1000)) == 259


def test_hostile_names_appear_escaped_in_errors() -> None:
    ram = make_ram(NPAGES)
    evil = "dev\n\x1b]0;owned\x07"
    data = encode_stream([StreamBlock("pc.ram", len(ram), 0, ram)], [(evil, 0, sample_device())])
    with pytest.raises(MigrationError) as info:
        _load(data, expected=None)
    text = "\n".join(info.value.report())
    assert "dev\\x0a\\x1b]0;owned\\x07" in text
    assert not any(ord(c) < 0x20 and c != "\n" for c in text)
    assert all(line.isprintable() for line in info.value.report())
