"""mapped-ram files without a VM: MappedRamChannel writes them (one thread or several, at a
``file:`` offset), the stream decoder loads them, the layout is QEMU's."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from migration_fakes import PAGE, FakeTarget, make_ram

from pyvm.migration import StreamBlock, StreamDecoder, StreamEncoder
from pyvm.migration.control.channel import PageRun, StreamChannel
from pyvm.migration.control.mapped_ram_channel import MappedRamChannel
from pyvm.migration.errors import MigrationError
from pyvm.migration.stream import mapped_ram
from pyvm.migration.transports.file_transport import file_outgoing


def _save(path: Path, blocks: list[StreamBlock], rounds: list[dict[str, np.ndarray]],
          threads: int, offset: int = 0) -> int:
    channel = MappedRamChannel(StreamChannel(file_outgoing(str(path), offset)), offset, threads)
    enc = StreamEncoder()
    channel.write_stream(enc.header())
    channel.write_stream(enc.configuration("pc-i440fx-8.2", ["mapped-ram"]))
    channel.write_stream(enc.ram_setup(blocks, False, channel.block_trailer))
    for i, pages in enumerate(rounds):
        channel.write_stream(enc.ram_section_begin(final=i == len(rounds) - 1))
        for index, block in enumerate(blocks):
            if block.name in pages:
                for _ in channel.send_pages(PageRun(block, index, pages[block.name])):
                    pass
        channel.write_stream(enc.ram_eos())
    channel.write_stream(enc.globalstate("running"))
    channel.write_stream(enc.eof_and_vmdesc())
    channel.flush()
    channel.close()
    return channel.bytes_moved


def _load(path: Path, blocks: list[StreamBlock], offset: int = 0) -> FakeTarget:
    target = FakeTarget(blocks, caps=("mapped-ram",))
    dec = StreamDecoder(target)
    data = path.read_bytes()[offset:]
    for s in range(0, len(data), 100_000):       # fed in pieces, as a transport would
        dec.feed(data[s:s + 100_000])
    dec.close()
    assert dec.finished
    return target


@pytest.mark.parametrize("threads,offset", [(1, 0), (3, 0), (4, 4096 * 3 + 5)])
def test_round_trip_with_rewrites(tmp_path: Path, threads: int, offset: int) -> None:
    ram = make_ram(600)
    rom = make_ram(5, seed=7)
    blocks = [StreamBlock("pc.ram", len(ram), 0, ram), StreamBlock("pc.bios", len(rom), 0, rom)]
    path = tmp_path / "m.state"
    first = {"pc.ram": np.arange(600), "pc.bios": np.arange(5)}
    # the guest rewrote some pages and zeroed one that held data before the second round
    ram[3 * PAGE:3 * PAGE + 4] = b"\xff\xfe\xfd\xfc"
    ram[6 * PAGE:7 * PAGE] = bytes(PAGE)
    ram[599 * PAGE] = 0x42
    second = {"pc.ram": np.array([3, 6, 100, 101, 102, 599])}
    _save(path, blocks, [first, second], threads, offset)
    size = path.stat().st_size
    assert size <= offset + 2 * mapped_ram.MAPPED_RAM_FILE_OFFSET_ALIGNMENT + len(ram) + len(rom) \
        + 8192
    dst_ram, dst_rom = bytearray(len(ram)), bytearray(len(rom))
    _load(path, [StreamBlock("pc.ram", len(ram), 0, dst_ram),
                 StreamBlock("pc.bios", len(rom), 0, dst_rom)], offset)
    assert dst_ram == ram and dst_rom == rom


def test_layout_is_qemus(tmp_path: Path) -> None:
    ram = make_ram(70)
    path = tmp_path / "m.state"
    _save(path, [StreamBlock("pc.ram", len(ram), 0, ram)], [{"pc.ram": np.arange(70)}], 1)
    data = path.read_bytes()
    entry = b"\x06pc.ram" + struct.pack(">Q", len(ram))
    at = data.index(entry) + len(entry)
    version, page_size, bitmap_offset, pages_offset = struct.unpack(">IQQQ", data[at:at + 28])
    assert (version, page_size) == (1, PAGE)
    assert bitmap_offset == at + 28
    assert pages_offset == 1 << 20                          # rounded up to 1 MiB
    assert mapped_ram.bitmap_size(len(ram)) == 16           # 70 bits in two longs
    bitmap = np.unpackbits(np.frombuffer(data[bitmap_offset:bitmap_offset + 16], np.uint8),
                           bitorder="little")[:70]
    assert bitmap.tolist() == [1 if i % 3 == 0 else 0 for i in range(70)]
    assert data[pages_offset + 3 * PAGE:pages_offset + 4 * PAGE] == bytes(ram[3 * PAGE:4 * PAGE])
    # the stream resumes right after the pages region: the EOS of the START section
    assert data[pages_offset + len(ram):pages_offset + len(ram) + 8] == struct.pack(">Q", 0x10)


def test_newer_header_version_is_refused(tmp_path: Path) -> None:
    ram = make_ram(8)
    path = tmp_path / "m.state"
    _save(path, [StreamBlock("pc.ram", len(ram), 0, ram)], [{"pc.ram": np.arange(8)}], 1)
    data = bytearray(path.read_bytes())
    entry = b"\x06pc.ram" + struct.pack(">Q", len(ram))
    at = data.index(entry) + len(entry)
    data[at:at + 4] = struct.pack(">I", 2)
    path.write_bytes(bytes(data))
    with pytest.raises(MigrationError) as info:
        _load(path, [StreamBlock("pc.ram", len(ram), 0, bytearray(len(ram)))])
    assert str(info.value) == ("Migration mapped-ram capability version not supported "
                               "(expected <= 1, got 2)")


def test_pyvm_analyze_reads_mapped_ram_files(tmp_path: Path, capsys) -> None:
    import json

    from pyvm.analyze import main

    ram = make_ram(70)
    path = tmp_path / "m.state"
    _save(path, [StreamBlock("pc.ram", len(ram), 0, ram)], [{"pc.ram": np.arange(70)}], 2)
    assert main(["-f", str(path), "-m"]) == 0
    state = json.loads(capsys.readouterr().out)
    section = next(v for k, v in state.items() if k.startswith("ram ("))
    info = section["mapped-ram"]["pc.ram"]
    assert info["pages"] == 24 and info["pages_offset"] == 1 << 20 and info["version"] == 1
    memory = section["memory"]
    assert len(memory) == 24 and "pc.ram (0x0000000000003000)" in memory


def test_qemu_analyze_migration_reads_pyvm_mapped_ram(tmp_path: Path) -> None:
    from test_pyvm_analyze import _qemu_analyze, _qemu_analyzer, _skip_unless_analyzer_reads

    if _qemu_analyzer() is None:
        pytest.skip("QEMU's analyze-migration.py not found (scripts/fetch_qemu_analyzer.py)")
    _skip_unless_analyzer_reads(("mapped-ram",))
    ram = make_ram(300)
    path = tmp_path / "m.state"
    _save(path, [StreamBlock("pc.ram", len(ram), 0, ram)], [{"pc.ram": np.arange(300)}], 2)
    (tmp_path / "x").mkdir()
    _qemu_analyze(path, "-x", cwd=tmp_path / "x")
    assert (tmp_path / "x" / "pc.ram").read_bytes() == bytes(ram)


def _o_direct_works(directory: Path) -> bool:
    import os

    probe = directory / "probe"
    probe.write_bytes(b"")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_DIRECT))
        return True
    except OSError:
        return False


def test_direct_io_page_writes(tmp_path: Path) -> None:
    from pyvm.migration.transports.base import TransportError

    import mmap

    ram = mmap.mmap(-1, 300 * PAGE)          # page aligned, as guest RAM is (O_DIRECT needs it)
    ram[:] = make_ram(300)
    path = tmp_path / "d.state"
    if not _o_direct_works(tmp_path):
        with pytest.raises(TransportError, match=r"^Could not open '.*d\.state': Invalid argument$"):
            MappedRamChannel(StreamChannel(file_outgoing(str(path))), 0, 2, direct_io=True)
        return
    channel = MappedRamChannel(StreamChannel(file_outgoing(str(path))), 0, 2, direct_io=True)
    block = StreamBlock("pc.ram", len(ram), 0, ram)
    enc = StreamEncoder()
    channel.write_stream(enc.header())
    channel.write_stream(enc.configuration("pc-i440fx-8.2", ["mapped-ram"]))
    channel.write_stream(enc.ram_setup([block], False, channel.block_trailer))
    channel.write_stream(enc.ram_section_begin(final=True))
    for _ in channel.send_pages(PageRun(block, 0, np.arange(300))):
        pass
    channel.write_stream(enc.ram_eos())
    channel.write_stream(enc.globalstate("running"))
    channel.write_stream(enc.eof_and_vmdesc())
    channel.flush()
    channel.close()
    dst = bytearray(len(ram))
    _load(path, [StreamBlock("pc.ram", len(ram), 0, dst)])
    assert dst == ram[:]
