"""Layer 3: section framing, configuration, globalstate and commands, with QEMU's bytes and texts."""

from __future__ import annotations

import pytest

from pyvm.migration.errors import (MigrationError, StreamFormatError, StreamMismatchError,
                                   TruncatedStreamError, UnsupportedFeatureError)
from pyvm.migration.stream.sections import (Configuration, GlobalState, check_configuration, read_command,
                                     read_configuration, read_section_footer, write_configuration,
                                     write_section_footer, write_section_header)
from pyvm.migration.stream.reader import StreamReader
from pyvm.migration.stream.writer import StreamWriter
from tests.stream_in_memory import run_to_completion, writer_bytes


def _run(step_factory, data: bytes):
    r = StreamReader()
    r.feed(data)
    return run_to_completion(step_factory(r), r)


def test_section_headers() -> None:
    w = StreamWriter()
    write_section_header(w, 0x01, 2, "ram", 0, 4)
    write_section_header(w, 0x02, 2)
    write_section_footer(w, 2)
    assert writer_bytes(w) == bytes.fromhex("01 00000002 03") + b"ram" + bytes.fromhex(
        "00000000 00000004" "02 00000002" "7e 00000002")


def test_footer_texts() -> None:
    _run(lambda r: read_section_footer(r, "ram", 2), bytes.fromhex("7e 00000002"))
    with pytest.raises(StreamFormatError, match="^Missing section footer for timer$"):
        _run(lambda r: read_section_footer(r, "timer", 0), bytes.fromhex("00 00000000"))
    with pytest.raises(StreamFormatError) as info:
        _run(lambda r: read_section_footer(r, "ram", 2), bytes.fromhex("7e 00000003"))
    assert info.value.lines == ["Mismatched section id in footer for ram - read 0x3 expected 0x2"]
    with pytest.raises(TruncatedStreamError) as trunc:
        _run(lambda r: read_section_footer(r, "ram", 2), b"")
    # observed on QEMU 7.2 for a stream cut before a footer
    assert trunc.value.report() == ["check_section_footer: Read section footer failed: -5",
                                    "load of migration failed: Invalid argument"]


def test_configuration_bytes_as_observed_on_qemu_7_2() -> None:
    w = StreamWriter()
    desc = write_configuration(w, "pc-i440fx-7.2")
    assert writer_bytes(w) == bytes.fromhex("07 0000000d") + b"pc-i440fx-7.2"
    assert desc == {"vmsd_name": "configuration", "version": 1, "fields": [
        {"name": "len", "type": "uint32", "size": 4}, {"name": "name", "type": "buffer", "size": 13}]}


def test_configuration_with_x_ignore_shared() -> None:
    w = StreamWriter()
    desc = write_configuration(w, "pc-q35-8.2", ["events", "x-ignore-shared"])
    data = writer_bytes(w)
    assert data == (bytes.fromhex("07 0000000a") + b"pc-q35-8.2" + b"\x05\x1a" + b"configuration/capabilities"
                    + bytes.fromhex("00000001 00000001 0f") + b"x-ignore-shared")
    assert desc["subsections"] == [{"vmsd_name": "configuration/capabilities", "version": 1, "fields": [
        {"name": "caps_count", "type": "uint32", "size": 4},
        {"name": "capabilities", "type": "capability", "size": 16}]}]
    config = _run(read_configuration, data[1:] + b"\x00")
    assert config == Configuration(b"pc-q35-8.2", ["x-ignore-shared"])


def test_configuration_checks_use_qemu_texts() -> None:
    config = Configuration(b"pc-i440fx-7.2")
    check_configuration(config, "pc-i440fx-7.2", ())
    with pytest.raises(StreamMismatchError, match="^Machine type received is 'pc-i440fx-7.2' and local is 'pc-q35-8.2'$"):
        check_configuration(config, "pc-q35-8.2", ())
    # QEMU compares only the received length (strncmp): a prefix is accepted
    check_configuration(Configuration(b"pc-i440fx"), "pc-i440fx-7.2", ())
    with pytest.raises(StreamMismatchError) as info:
        check_configuration(config, "pc-i440fx-7.2", ("x-ignore-shared",))
    assert info.value.lines == ["Capability x-ignore-shared is on, but received capability is off"]
    with pytest.raises(StreamMismatchError, match="^Received TARGET_PAGE_BITS is 13 but local is 12$"):
        check_configuration(Configuration(b"pc", target_page_bits=13), "pc", ())
    check_configuration(Configuration(b"anything", ["x-ignore-shared"]), None, None)


def test_unknown_capability_text() -> None:
    data = (bytes.fromhex("00000002") + b"pc" + b"\x05\x1aconfiguration/capabilities"
            + bytes.fromhex("00000001 00000001 03") + b"foo")
    with pytest.raises(StreamMismatchError) as info:
        _run(read_configuration, data)
    assert info.value.lines == ["Received unknown capability foo",
                                "Failed to load configuration/capabilities:capabilities"]


def test_configuration_subsection_versions() -> None:
    data = bytes.fromhex("00000002") + b"pc" + b"\x05\x1econfiguration/target-page-bits" + bytes.fromhex("00000002")
    with pytest.raises(StreamMismatchError, match="is too new for local version_id 1"):
        _run(read_configuration, data)


def test_overlong_machine_name_is_refused_before_reading_it() -> None:
    with pytest.raises(StreamFormatError, match="^Failed to load configuration:name$"):
        _run(read_configuration, bytes.fromhex("7fffffff"))


def test_globalstate_bytes_as_observed_on_qemu_7_2() -> None:
    state = GlobalState("prelaunch")
    assert state.size == 0x0A
    assert state.runstate == b"prelaunch" + bytes(91)
    assert state.runstate_name() == "prelaunch"


def test_globalstate_rejects_unknown_runstate() -> None:
    state = GlobalState()
    state.runstate = b"flying".ljust(100, b"\0")
    with pytest.raises(StreamMismatchError, match="^invalid parameter value: flying$"):
        state.runstate_name()
    state.runstate = b"r" * 100        # no NUL at all: cut at 99 bytes as QEMU does
    with pytest.raises(StreamMismatchError):
        state.runstate_name()


@pytest.mark.parametrize("payload,error,text", [
    ("0000 0000", StreamFormatError, "MIG_CMD 0x0 unknown (len 0x0)"),
    ("000b 0000", StreamFormatError, "MIG_CMD 0xb unknown (len 0x0)"),       # 10.0's SWITCHOVER_START
    ("0002 0008", StreamFormatError, "PING received with bad length - expecting 4, got 8"),
    ("0001 0000", UnsupportedFeatureError, "CMD_OPEN_RETURN_PATH failed"),
    ("0002 0004 00000001", UnsupportedFeatureError, "CMD_PING (0x1) received with no return path"),
    ("0003 0000", UnsupportedFeatureError, "MIG_CMD 0x3 unknown (len 0x0)"),
])
def test_commands_are_refused_with_qemu_texts(payload: str, error: type, text: str) -> None:
    with pytest.raises(error) as info:
        _run(read_command, bytes.fromhex(payload))
    assert str(info.value) == text
    assert isinstance(info.value, MigrationError)
