"""Layer 2: device state from a VMStateDescription, its vmdesc description, load checks."""

from __future__ import annotations

import random

import pytest

from migration_fakes import FAKE_VMSD, FakeDevice, sample_device
from pyvm.migration.stream import vmdesc_json
from pyvm.migration.errors import EncodeError, MigrationError, StreamMismatchError, TruncatedStreamError
from pyvm.migration.stream.reader import StreamReader
from pyvm.migration.stream.writer import StreamWriter
from pyvm.migration.stream.vmstate_codec import apply_loaded, load_vmstate, save_vmstate
from pyvm.vmstate import Field, Subsection, VMStateDescription
from tests.stream_in_memory import run_to_completion, writer_bytes

SAMPLE_BYTES = (bytes.fromhex("12" "00000001" "fffffffe" "7fffffff") + b"hello" + b"\x01"
                + b"\x05\x0efake-dev/extra" + bytes.fromhex("00000001" "0007"))


def _save(vmsd: VMStateDescription, obj: object) -> tuple[bytes, dict]:
    w = StreamWriter()
    desc: dict = {}
    save_vmstate(w, vmsd, obj, desc)
    return writer_bytes(w), desc


def _load(vmsd: VMStateDescription, data: bytes, version: int) -> dict:
    r = StreamReader()
    r.feed(data)
    values: dict = {}
    run_to_completion(load_vmstate(r, vmsd, version, values), r)
    assert r.available == 0
    return values


def test_encoding_is_byte_exact() -> None:
    data, _ = _save(FAKE_VMSD, sample_device())
    assert data == SAMPLE_BYTES


def test_vmdesc_text_is_qemu_style() -> None:
    _, desc = _save(FAKE_VMSD, sample_device())
    assert vmdesc_json.dumps(desc) == (
        '{"vmsd_name": "fake-dev", "version": 2, "fields": ['
        '{"name": "a", "type": "uint8", "size": 1}, '
        '{"name": "regs", "array_len": 3, "type": "int32", "size": 4}, '
        '{"name": "blob", "type": "buffer", "size": 5}, '
        '{"name": "flag", "type": "bool", "size": 1}], '
        '"subsections": [{"vmsd_name": "fake-dev/extra", "version": 1, "fields": '
        '[{"name": "extra", "type": "uint16", "size": 2}]}]}')


def test_subsection_not_needed_is_not_sent_nor_described() -> None:
    dev = sample_device()
    setattr(dev, "extra", 0)
    data, desc = _save(FAKE_VMSD, dev)
    assert data == SAMPLE_BYTES[:-len(b"\x05\x0efake-dev/extra") - 6]
    assert "subsections" not in desc


def test_round_trip_and_post_load_after_attributes() -> None:
    data, _ = _save(FAKE_VMSD, sample_device())
    values = _load(FAKE_VMSD, data, 2)
    dev = FakeDevice()
    seen = {}
    dev.post_load = lambda: seen.update(dev.state())  # type: ignore[method-assign]
    apply_loaded(dev, values)
    assert seen == sample_device().state() == dev.state()


def test_version_gating_on_load() -> None:
    # A version-1 stream has no "flag" field; the local default stays.
    data = bytes.fromhex("12 00000001 00000002 00000003") + b"hello"
    values = _load(FAKE_VMSD, data, 1)
    assert "flag" not in values and values["regs"] == [1, 2, 3]


def test_qemu_version_texts() -> None:
    with pytest.raises(StreamMismatchError) as info:
        _load(FAKE_VMSD, SAMPLE_BYTES, 3)
    assert str(info.value) == "fake-dev: incoming version_id 3 is too new for local version_id 2"
    with pytest.raises(StreamMismatchError) as info:
        _load(FAKE_VMSD, SAMPLE_BYTES, 0)
    assert str(info.value) == "fake-dev: incoming version_id 0 is too old for local minimum version_id  1"


def test_truncated_field_reports_failed_to_load() -> None:
    with pytest.raises(TruncatedStreamError) as info:
        _load(FAKE_VMSD, SAMPLE_BYTES[:7], 2)
    assert info.value.lines == ["Failed to load fake-dev:regs"]


def test_unknown_subsection_is_an_error() -> None:
    bad = SAMPLE_BYTES.replace(b"fake-dev/extra", b"fake-dev/other")
    with pytest.raises(MigrationError) as info:
        _load(FAKE_VMSD, bad, 2)
    assert info.value.errno == 2          # ENOENT, as vmstate_subsection_load returns
    assert "fake-dev/other" in info.value.detail


def test_foreign_subsection_ends_the_fields() -> None:
    # 0x05 followed by a name outside "fake-dev" is not ours: left unread for the footer check.
    data = SAMPLE_BYTES[:19] + b"\x05\x0bother/thing"
    r = StreamReader()
    r.feed(data)
    values: dict = {}
    run_to_completion(load_vmstate(r, FAKE_VMSD, 2, values), r)
    assert r.available == len(b"\x05\x0bother/thing")


def test_bool_loads_any_non_zero_as_true() -> None:
    data = bytearray(SAMPLE_BYTES)
    data[18] = 0x7F
    assert _load(FAKE_VMSD, bytes(data), 2)["flag"] is True


@pytest.mark.parametrize("name,value", [("a", 256), ("a", -1), ("regs", [1, 2]), ("regs", [1, 2, 1 << 31]),
                                        ("blob", b"toolong"), ("flag", 2), ("a", 1.5)])
def test_values_must_fit_their_type(name: str, value: object) -> None:
    dev = sample_device()
    setattr(dev, name, value)
    with pytest.raises(EncodeError) as info:
        _save(FAKE_VMSD, dev)
    assert str(info.value) == f"Save of field fake-dev/{name} failed"


def test_nested_subsections_and_buffer_arrays() -> None:
    inner = VMStateDescription("d/a/b", 1, (Field("deep", "int64"),))
    middle = VMStateDescription("d/a", 3, (Field("bufs", "buffer", size=2, count=2),),
                                subsections=(Subsection(inner, lambda o: True),))
    outer = VMStateDescription("d", 1, (Field("x", "uint64"),),
                               subsections=(Subsection(middle, lambda o: True),))
    dev = FakeDevice(outer, x=(1 << 64) - 1, bufs=[b"ab", b"cd"], deep=-5)
    data, desc = _save(outer, dev)
    assert desc["subsections"][0]["subsections"][0]["vmsd_name"] == "d/a/b"
    assert desc["subsections"][0]["fields"][0] == {"name": "bufs", "array_len": 2, "type": "buffer", "size": 2}
    assert _load(outer, data, 1) == {"x": (1 << 64) - 1, "bufs": [b"ab", b"cd"], "deep": -5}


def test_json_escapes_like_qemu() -> None:
    assert vmdesc_json.dumps({"a\"\\\n": [1, True, None, "\x7f\x01é\U0001F600"]}) == (
        '{"a\\"\\\\\\n": [1, true, null, "\\u007F\\u0001\\u00E9\\uD83D\\uDE00"]}')


def test_vmdesc_json_fast_and_exact_writers_agree() -> None:
    rng = random.Random(3)
    alphabet = "ab_/. -09\"\\\b\f\n\r\t\x01\x1f\x7f\x80éЖ\U0001F600u"
    for trial in range(300):
        def value(depth: int) -> object:
            kind = rng.randrange(6 if depth < 3 else 4)
            if kind == 0:
                return "".join(rng.choice(alphabet) for _ in range(rng.randrange(6)))
            if kind == 1:
                return rng.randrange(-2**40, 2**40)
            if kind == 2:
                return rng.choice([True, False, None])
            if kind == 3:
                return "plain-" + str(rng.randrange(100))
            if kind == 4:
                return [value(depth + 1) for _ in range(rng.randrange(4))]
            return {str(value(3)): value(depth + 1) for _ in range(rng.randrange(4))}
        v = value(0)
        parts: list[str] = []
        vmdesc_json._write(v, parts)
        assert vmdesc_json.dumps(v) == "".join(parts), (trial, v)
