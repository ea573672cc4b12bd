"""Page records laid out in a native batch follow the format; the native loader path."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from migration_fakes import PAGE, FakeTarget, decode_stream, encode_stream, make_ram, ram_batch_bytes
from pyvm.migration import StreamBlock, StreamEncoder
from pyvm.migration.errors import EncodeError, MigrationError
from pyvm.fastpath import RecordBatch
from pyvm.migration.stream.ram_format import RamPageWriter
from pyvm.migration.stream.ram_loader import RamLoader
from pyvm.migration.stream.reader import StreamReader
from pyvm.migration.stream.writer import StreamWriter
from tests.stream_in_memory import join_chunks, run_to_completion


def _random_ram(npages: int, rng: random.Random) -> bytearray:
    ram = bytearray(npages * PAGE)
    for p in range(npages):
        if rng.random() < 0.6:
            ram[p * PAGE:(p + 1) * PAGE] = rng.randbytes(PAGE)
    return ram


def _batch_bytes(writer: RamPageWriter, block: StreamBlock, idx: np.ndarray, tmp_path) -> tuple[bytes, int]:
    batch = RecordBatch(8)
    out, start, zeros = bytearray(), 0, 0
    path = tmp_path / "sent"
    while start < idx.size:
        start, _, z = writer.batch_run(batch, block, idx, start)
        zeros += z
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            while batch.remaining:
                batch.send(fd)
        finally:
            os.close(fd)
        out += path.read_bytes()
    return bytes(out), zeros


def _reference_records(ram: bytes, idx: list[int], name: bytes) -> bytes:
    """Page records built one by one from the format (QEMU migration/ram.c): ZERO for an
    all-zero page, PAGE otherwise; the first record names the block unless ``name`` is
    empty, the others CONTINUE."""
    out = bytearray()
    for i, index in enumerate(idx):
        page = ram[index * PAGE:(index + 1) * PAGE]
        zero = not any(page)
        named = bool(name) and i == 0
        out += ((index * PAGE) | (0x02 if zero else 0x08) | (0 if named else 0x20)).to_bytes(8, "big")
        if named:
            out += bytes([len(name)]) + name
        out += b"\0" if zero else page
    return bytes(out)


def test_batched_records_follow_the_format(tmp_path) -> None:
    rng = random.Random(5)
    for trial in range(40):
        npages = rng.randint(1, 40)
        ram = _random_ram(npages, rng)
        block = StreamBlock(rng.choice(["pc.ram", "/rom@etc/acpi/tables"]), len(ram), 0, ram)
        idx = np.array(rng.sample(range(npages), rng.randint(0, npages)), dtype=np.int64)
        batched = RamPageWriter()
        named = rng.random() < 0.5
        if not named:                            # the block was named before: CONTINUE only
            batched.last_block = block.name
        data, zeros = _batch_bytes(batched, block, idx, tmp_path)
        expected = _reference_records(ram, idx.tolist(), block.name.encode() if named else b"")
        assert data == expected, trial
        assert zeros == sum(not any(ram[i * PAGE:(i + 1) * PAGE]) for i in idx.tolist()), trial
        assert batched.last_block == (block.name if idx.size or not named else None)


def test_batch_checks_like_write() -> None:
    ram = make_ram(4)
    block = StreamBlock("pc.ram", len(ram), 0, ram)
    batch = RecordBatch(8)
    with pytest.raises(EncodeError, match="RAM block 'pc.ram': page index 4 beyond the block"):
        RamPageWriter().batch_run(batch, block, np.array([1, 4]), 0)
    with pytest.raises(EncodeError, match="beyond the source buffer"):
        RamPageWriter().batch_run(batch, StreamBlock("pc.ram", len(ram), 0, None), np.array([1]), 0)
    with pytest.raises(EncodeError, match="not migrated"):
        RamPageWriter().batch_run(batch, StreamBlock("pc.ram", len(ram), 0, ram, ignored=True), np.array([1]), 0)
    known = np.ones(2, dtype=bool)
    assert RamPageWriter().batch_run(batch, StreamBlock("pc.ram", len(ram), 0, None), np.array([1, 2]), 0,
                                     known) == (2, 8 + 1 + 6 + 1 + 9, 2)


@pytest.mark.parametrize("chunk", [1, 7, 4104, 4105, 65536, 0])
def test_native_run_loads_in_any_chunking(chunk: int) -> None:
    rng = random.Random(chunk)
    src = _random_ram(64, rng)
    blocks = [StreamBlock("pc.ram", len(src), 0, src), StreamBlock("pc.bios", 2 * PAGE, 0, _random_ram(2, rng))]
    data = encode_stream(blocks, [], rounds=3)
    dst = [StreamBlock("pc.ram", len(src), 0, bytearray(b"\xee" * len(src))),
           StreamBlock("pc.bios", 2 * PAGE, 0, bytearray(b"\xee" * 2 * PAGE))]
    dec = decode_stream(data, FakeTarget(dst), chunk=chunk)
    assert dec.finished
    assert dst[0].buffer == src and dst[1].buffer == blocks[1].buffer
    assert dec.ram is not None
    assert dec.ram.normal_pages + dec.ram.zero_pages == 66


def test_bad_offset_after_a_native_run_keeps_qemu_text() -> None:
    ram = bytearray(4 * PAGE)
    enc = StreamEncoder()
    block = StreamBlock("pc.ram", 4 * PAGE, 0, make_ram(4))
    enc.ram_section_begin()                 # the section header is not part of the payload
    payload = ram_batch_bytes(enc, block, [0, 1, 2])
    payload += bytes.fromhex("00000000 00004028") + bytes(PAGE)          # page 4 of 4
    loader = RamLoader(lambda name, length: StreamBlock("pc.ram", 4 * PAGE, 0, ram), False)
    r = StreamReader()
    r.feed(payload)
    with pytest.raises(MigrationError) as info:
        run_to_completion(loader.load(r, 4), r)
    assert str(info.value) == "Illegal RAM offset 4000"
    assert ram[:3 * PAGE] == block.buffer[:3 * PAGE]
    assert ram[3 * PAGE:] == bytes(PAGE)
    assert (loader.normal_pages, loader.zero_pages) == (1, 2)       # make_ram: 1 and 2 are zero


def test_observed_blocks_see_every_page() -> None:
    src = make_ram(6)
    seen: list[tuple[int, bool]] = []
    dst = StreamBlock("pc.ram", len(src), 0, bytearray(len(src)), on_page=lambda off, z: seen.append((off, z)))
    decode_stream(encode_stream([StreamBlock("pc.ram", len(src), 0, src)], [], rounds=1), FakeTarget([dst]))
    assert [off for off, _ in seen] == [i * PAGE for i in range(6)]
    assert dst.buffer == src
