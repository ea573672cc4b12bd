"""pyvm-analyze on postcopy streams (no vmdesc, QEMU_VM_COMMAND records, a PACKAGED nested
stream), and what QEMU's own analyze-migration.py does with one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pyvm import analyze
from pyvm.migration.stream import postcopy_commands as pc
from pyvm.migration.stream.writer import StreamWriter
from tests.stream_in_memory import writer_bytes
from tests.migration.test_pyvm_analyze import _qemu_analyzer, needs_qemu_analyzer


def _postcopy_stream() -> tuple[bytes, int]:
    """The shape of a postcopy stream (savevm.c): commands after the configuration, a
    package holding LISTEN, the devices and RUN, then EOF and no vmdesc."""
    nested = StreamWriter()
    nested.raw(pc.encode_command(pc.PostcopyListen()))
    nested.u8(0x04); nested.be32(3); nested.counted_string("timer"); nested.be32(0); nested.be32(2)
    # device bytes that look like a footer but are not followed by a record: skipped
    nested.raw(bytes([0x7E, 0, 0, 0, 3, 0x55]) + bytes(18))
    nested.u8(0x7E); nested.be32(3)
    nested.u8(0x04); nested.be32(4); nested.counted_string("globalstate"); nested.be32(0); nested.be32(1)
    nested.be32(8); nested.raw(b"running".ljust(100, b"\0"))     # size, runstate[100]
    nested.u8(0x7E); nested.be32(4)
    nested.raw(pc.encode_command(pc.PostcopyRun()))
    blob = writer_bytes(nested)
    w = StreamWriter()
    w.be32(0x5145564D); w.be32(3)
    w.u8(0x07); w.be32(13); w.raw(b"pc-i440fx-7.2")
    w.raw(pc.encode_command(pc.OpenReturnPath()))
    w.raw(pc.encode_command(pc.Ping(1)))
    w.raw(pc.encode_command(pc.PostcopyAdvise(4096, 4096)))
    for record in pc.discard_commands("pc.ram", [(0x2000, 0x3000)]):
        w.raw(record)
    w.raw(pc.packaged(blob))
    w.u8(0x00)
    return writer_bytes(w), len(blob)


def test_a_postcopy_stream_is_read_to_its_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, package = _postcopy_stream()
    (tmp_path / "p").write_bytes(data)
    rc = analyze.main(["-f", str(tmp_path / "p")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    state = json.loads(out)
    assert state["commands"] == [
        {"command": "OPEN_RETURN_PATH"}, {"command": "PING", "value": 1},
        {"command": "POSTCOPY_ADVISE", "host page summary": "0x1000", "target page size": 4096},
        {"command": "POSTCOPY_RAM_DISCARD", "block": "pc.ram", "ranges": 1, "pages": 3},
        {"command": "PACKAGED", "length": package},
        {"command": "POSTCOPY_LISTEN"}, {"command": "POSTCOPY_RUN"}]
    assert state["timer (3)"]["size"] == 24
    assert state["globalstate (4)"] == {"runstate": "running"}


def test_a_stream_without_vmdesc_or_commands_is_still_refused(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    data, _ = _postcopy_stream()
    w = StreamWriter()
    w.be32(0x5145564D); w.be32(3)
    w.u8(0x07); w.be32(13); w.raw(b"pc-i440fx-7.2")
    w.u8(0x00)
    (tmp_path / "s").write_bytes(writer_bytes(w))
    assert analyze.main(["-f", str(tmp_path / "s")]) == 1
    assert "no vmdesc trailer" in capsys.readouterr().err
    (tmp_path / "p").write_bytes(data)
    assert analyze.main(["-f", str(tmp_path / "p"), "-d", "desc"]) == 1   # nothing to show


@needs_qemu_analyzer
def test_qemu_analyzer_refuses_postcopy_streams(tmp_path: Path) -> None:
    """QEMU's analyze-migration.py needs the vmdesc trailer, which postcopy streams lack
    (QEMU's own too), and knows no postcopy command: it fails on them."""
    (tmp_path / "p").write_bytes(_postcopy_stream()[0])
    script = _qemu_analyzer()
    assert script is not None
    r = subprocess.run([sys.executable, script, "-f", str(tmp_path / "p")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0
    assert "Exception" in r.stderr or "Error" in r.stderr, r.stderr
