"""pyvm-analyze (layer 7) on pyvm streams and on a hand-made QEMU-style stream; QEMU's own
scripts/analyze-migration.py on pyvm streams, including a real saved guest."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from migration_fakes import PAGE, encode_stream, make_ram, sample_device
from pyvm import analyze
from pyvm.migration import StreamBlock
from pyvm.migration.stream import vmdesc_json
from pyvm.migration.stream.writer import StreamWriter
from tests.stream_in_memory import writer_bytes
from tests.conftest import guest


def _write_stream(path: Path, caps: tuple[str, ...] = ()) -> dict[str, bytearray]:
    rams = {"pc.ram": make_ram(4), "/rom@etc/acpi/tables": make_ram(2, seed=9)}
    blocks = [StreamBlock(name, len(ram), 0x1000 * i, ram) for i, (name, ram) in enumerate(rams.items())]
    path.write_bytes(encode_stream(blocks, [("fake-dev", 0, sample_device())], caps=caps))
    return rams


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = analyze.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_state_dump(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_stream(tmp_path / "s")
    rc, out, _ = _run(capsys, "-f", str(tmp_path / "s"))
    assert rc == 0
    state = json.loads(out)
    assert list(state) == ["ram (2)", "fake-dev (3)", "globalstate (4)"]
    assert state["ram (2)"] == {"section sizes": {"pc.ram": "0x0000000000004000",
                                                  "/rom@etc/acpi/tables": "0x0000000000002000"}}
    assert state["fake-dev (3)"] == {"a": "0x12", "regs": ["0x00000001", "0xfffffffe (-2)", "0x7fffffff"],
                                     "blob": "68 65 6c 6c 6f", "flag": True, "fake-dev/extra": {"extra": "0x0007"}}
    assert state["globalstate (4)"]["size"] == "0x00000008"
    assert out.startswith('{\n    "ram (2)": {\n        "section sizes"')     # QEMU's indent and separators


def test_desc_dump_is_the_trailer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_stream(tmp_path / "s", caps=("x-ignore-shared",))
    rc, out, _ = _run(capsys, "-f", str(tmp_path / "s"), "-d", "desc")
    desc = json.loads(out)
    assert rc == 0 and list(desc) == ["configuration", "page_size", "devices"]
    raw = (tmp_path / "s").read_bytes()
    assert raw.endswith(vmdesc_json.dumps(desc).encode())


def test_memory_dump(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rams = _write_stream(tmp_path / "s")
    rc, out, _ = _run(capsys, "-f", str(tmp_path / "s"), "-m")
    memory = json.loads(out)["ram (2)"]["memory"]
    assert rc == 0 and len(memory) == 6
    assert memory["pc.ram (0x0000000000001000)"] == "Filled with 0x00"
    first = memory["pc.ram (0x0000000000000000)"].split()
    assert bytes(int(b, 16) for b in first) == bytes(rams["pc.ram"][:PAGE])


def test_extract_writes_ram_files(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    rams = _write_stream(tmp_path / "s")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    monkeypatch.chdir(out_dir)
    rc, out, _ = _run(capsys, "-f", str(tmp_path / "s"), "-x")
    assert rc == 0 and out.split() == ["desc.json", "pc.ram", "/rom@etc/acpi/tables", "state.json"]
    assert (out_dir / "pc.ram").read_bytes() == rams["pc.ram"]
    assert (out_dir / "rom@etc" / "acpi" / "tables").read_bytes() == rams["/rom@etc/acpi/tables"]
    assert json.loads((out_dir / "state.json").read_text())["fake-dev (3)"]["a"] == "0x12"


@pytest.mark.parametrize("content,needle", [(b"", "empty file"), (b"hello world!", "Invalid file magic"),
                                            (bytes.fromhex("5145564d 00000003 07"), "No Debug Migration device")])
def test_bad_files_give_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes,
                                       needle: str) -> None:
    (tmp_path / "bad").write_bytes(content)
    rc, out, err = _run(capsys, "-f", str(tmp_path / "bad"))
    assert rc == 1 and out == "" and needle in err and err.count("\n") == 1


def test_truncated_stream_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_stream(tmp_path / "s")
    data = (tmp_path / "s").read_bytes()
    vmdesc_at = data.rindex(b"\x06")
    (tmp_path / "cut").write_bytes(data[:300] + data[vmdesc_at:])
    rc, _, err = _run(capsys, "-f", str(tmp_path / "cut"))
    assert rc == 1 and err.startswith(f"pyvm-analyze: {tmp_path / 'cut'}: ")


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run(capsys, "-f", str(tmp_path / "nope"))
    assert rc == 1 and "No such file" in err


def test_extract_refuses_escaping_block_names(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    ram = bytearray(PAGE)
    (tmp_path / "s").write_bytes(encode_stream([StreamBlock("../evil", PAGE, 0, ram)], []))
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path / "out")
    rc, _, err = _run(capsys, "-f", str(tmp_path / "s"), "-x")
    assert rc == 1 and "unsafe name" in err and not (tmp_path / "evil").exists()


def _qemu_style_stream() -> bytes:
    """A stream shaped like QEMU's: 'timer' with an unused_buffer, a struct field, types pyvm does not use."""
    w = StreamWriter()
    w.be32(0x5145564D); w.be32(3)
    w.u8(0x07); w.be32(13); w.raw(b"pc-i440fx-7.2")
    w.u8(0x04); w.be32(0); w.counted_string("timer"); w.be32(0); w.be32(2)
    w.be64((1 << 64) - 5); w.raw(bytes(8)); w.be64(42)
    w.u8(0x7E); w.be32(0)
    w.u8(0x04); w.be32(5); w.counted_string("0000:00:01.0/dev"); w.be32(0); w.be32(1)
    w.be32(7); w.be16(1); w.be16(2); w.be32(0xFFFFFFFF); w.u8(0x30)
    w.u8(0x05); w.counted_string("dev/sub"); w.be32(1); w.u8(1)
    w.u8(0x7E); w.be32(5)
    w.u8(0x00)
    desc = {"page_size": 4096, "devices": [
        {"name": "timer", "instance_id": 0, "vmsd_name": "timer", "version": 2, "fields": [
            {"name": "cpu_ticks_offset", "type": "int64", "size": 8},
            {"name": "unused", "type": "unused_buffer", "size": 8},
            {"name": "cpu_clock_offset", "type": "int64", "size": 8}]},
        {"name": "0000:00:01.0/dev", "instance_id": 0, "vmsd_name": "dev", "version": 1, "fields": [
            {"name": "irq", "type": "uint32 equal", "size": 4},
            {"name": "s", "type": "struct", "struct": {"vmsd_name": "pair", "version": 1, "fields": [
                {"name": "v", "array_len": 2, "type": "uint16", "size": 2}]}, "size": 4},
            {"name": "le", "type": "int32 le", "size": 4},
            {"name": "ptr", "type": "nullptr", "size": 1}],
         "subsections": [{"vmsd_name": "dev/sub", "version": 1, "fields": [
             {"name": "on", "type": "bool", "size": 1}]}]}]}
    text = vmdesc_json.dumps(desc).encode()
    w.u8(0x06); w.be32(len(text)); w.raw(text)
    return writer_bytes(w)


def test_reads_qemu_style_descriptions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "q").write_bytes(_qemu_style_stream())
    rc, out, err = _run(capsys, "-f", str(tmp_path / "q"))
    assert rc == 0, err
    assert json.loads(out) == {
        "timer (0)": {"cpu_ticks_offset": "0xfffffffffffffffb (-5)", "unused": "00 00 00 00 00 00 00 00",
                      "cpu_clock_offset": "0x000000000000002a"},
        "0000:00:01.0/dev (5)": {"irq": "0x00000007", "s": {"v": ["0x0001", "0x0002"]},
                                 "le": "0xffffffff (-1)", "ptr": "nullptr", "dev/sub": {"on": True}}}


# -- QEMU's own scripts/analyze-migration.py, when it is available -----------------------------------
#
# scripts/setup.sh fetches it from Debian's qemu source package into .cache/qemu (see
# scripts/fetch_qemu_analyzer.py); PYVM_QEMU_ANALYZE_MIGRATION or PATH may name another copy.

ROOT = Path(__file__).resolve().parents[2]
CACHED_ANALYZER = ROOT / ".cache" / "qemu" / "analyze-migration.py"


def _qemu_analyzer() -> str | None:
    for path in (os.environ.get("PYVM_QEMU_ANALYZE_MIGRATION"), shutil.which("analyze-migration.py"),
                 str(CACHED_ANALYZER)):
        if path and os.path.isfile(path):
            return os.path.abspath(path)
    return None


needs_qemu_analyzer = pytest.mark.skipif(
    _qemu_analyzer() is None,
    reason="QEMU's analyze-migration.py not found: run scripts/fetch_qemu_analyzer.py "
           "(needs the Debian archive apt is configured with) or set PYVM_QEMU_ANALYZE_MIGRATION")


def _skip_unless_analyzer_reads(caps: tuple[str, ...]) -> None:
    """Older analyzers (QEMU 7.2's, bookworm) stop at the configuration section's capability
    subsection, on QEMU's own x-ignore-shared streams as well; they cannot judge those."""
    script = _qemu_analyzer()
    assert script is not None
    text = Path(script).read_text(errors="replace")
    for cap in caps:
        if f"'{cap}'" not in text and f'"{cap}"' not in text:
            pytest.skip(f"this analyze-migration.py ({script}) predates {cap} support")


def _qemu_analyze(stream: Path, *args: str, cwd: Path | None = None) -> str:
    script = _qemu_analyzer()
    assert script is not None
    r = subprocess.run([sys.executable, script, "-f", str(stream), *args], cwd=cwd,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"analyze-migration.py {' '.join(args)} failed on {stream}:\n{r.stderr[-2000:]}"
    return r.stdout


def _same_dumps(capsys: pytest.CaptureFixture[str], stream: Path) -> dict[str, Any]:
    """QEMU's -d desc and -d state equal pyvm-analyze's (as JSON); returns the description."""
    dumps: dict[str, Any] = {}
    for what in ("desc", "state"):
        theirs = json.loads(_qemu_analyze(stream, "-d", what))
        rc, ours, err = _run(capsys, "-f", str(stream), "-d", what)
        assert rc == 0, err
        assert json.loads(ours) == theirs, f"-d {what} differs"
        dumps[what] = theirs
    return dumps["desc"]


@needs_qemu_analyzer
@pytest.mark.parametrize("caps", [(), ("x-ignore-shared",)])
def test_qemu_analyze_migration_reads_pyvm_streams(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   caps: tuple[str, ...]) -> None:
    _skip_unless_analyzer_reads(caps)
    rams = _write_stream(tmp_path / "s", caps)
    _same_dumps(capsys, tmp_path / "s")
    (tmp_path / "x").mkdir()
    _qemu_analyze(tmp_path / "s", "-x", cwd=tmp_path / "x")
    assert (tmp_path / "x" / "pc.ram").read_bytes() == rams["pc.ram"]
    assert (tmp_path / "x" / "rom@etc" / "acpi" / "tables").read_bytes() == rams["/rom@etc/acpi/tables"]


E2E_RAM = 16 << 20


@needs_qemu_analyzer
@pytest.mark.parametrize("caps", [(), ("x-ignore-shared",)])
def test_qemu_analyze_migration_reads_a_real_pyvm_save(vms, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       caps: tuple[str, ...]) -> None:
    """A running guest saved with ``migrate uri=file:``: QEMU's analyzer reads it like pyvm-analyze,
    and the RAM it extracts is the guest's RAM at switchover."""
    _skip_unless_analyzer_reads(caps)
    src = vms("src", "-m", "16M", "-kernel", guest("memcheck.elf"), "-append", "start=1 size=4",
              "-display", "none")
    src.wait_serial("memcheck gen 1 ok")                  # the guest has dirtied its RAM
    if caps:
        src.cmd("migrate-set-capabilities", capabilities=[{"capability": c, "state": True} for c in caps])
    stream = tmp_path / "vm.state"
    src.cmd("migrate", uri=f"file:{stream}")
    done = src.wait_migration()
    assert done["status"] == "completed", done
    assert src.status() == "postmigrate"
    ram = src.pmem(E2E_RAM)                              # stopped since switchover: the saved RAM
    assert ram.count(0) < len(ram)

    desc = _same_dumps(capsys, stream)
    cap_subsections = [s["vmsd_name"] for s in desc["configuration"].get("subsections", [])]
    # with x-ignore-shared the analyzer must learn it from the stream to read each block's GPA
    assert ("configuration/capabilities" in cap_subsections) == bool(caps)

    (tmp_path / "x").mkdir()
    _qemu_analyze(stream, "-x", cwd=tmp_path / "x")
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["desc.json", "pc.ram", "state.json"]
    assert (tmp_path / "x" / "pc.ram").read_bytes() == ram


@pytest.mark.parametrize("length", [1 << 63, 1 << 49], ids=["beyond-ssize_t", "beyond-memory"])
@pytest.mark.parametrize("extract", [False, True], ids=["dump", "extract"])
def test_a_huge_ram_block_length_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch, length: int,
                                               extract: bool) -> None:
    # found by the torture suite's property-based fuzzing: the analyzer mapped (or, with
    # -x, created) whatever length a damaged block list named -- OverflowError or ENOMEM
    _write_stream(tmp_path / "s")
    raw = bytearray((tmp_path / "s").read_bytes())
    at = raw.index(b"pc.ram") + len(b"pc.ram")
    raw[at:at + 8] = length.to_bytes(8, "big")
    (tmp_path / "bad").write_bytes(bytes(raw))
    monkeypatch.chdir(tmp_path)
    rc, out, err = _run(capsys, "-f", str(tmp_path / "bad"), *(["-x"] if extract else []))
    assert rc == 1
    assert "Traceback" not in err and f"length 0x{length:x} is out of range" in err, err
    assert not (tmp_path / "pc.ram").exists() or (tmp_path / "pc.ram").stat().st_size == 0
