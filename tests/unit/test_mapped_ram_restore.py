"""The parallel mapped-ram page reader on its own: pieces cut as QEMU cuts them, pages
read from their slots by several threads, a short file reported with QEMU's texts."""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import pytest

from pyvm.migration.control.mapped_ram_restore import ParallelPageReader, pieces
from pyvm.migration.errors import StreamFormatError
from pyvm.migration.stream.reader import StreamReader

PAGE = 4096


def test_pieces_follow_runs_and_the_1_mib_cut() -> None:
    present = np.zeros(700, dtype=bool)
    present[3:5] = True
    present[10:10 + 256 + 7] = True
    present[699] = True
    assert pieces(present) == [(3, 2), (10, 256), (266, 7), (699, 1)]
    assert pieces(np.zeros(5, dtype=bool)) == []


@pytest.mark.parametrize("channels", [1, 2, 4])
def test_threads_read_every_set_page_into_ram(tmp_path: Path, channels: int) -> None:
    npages, pages_offset = 600, 1 << 20
    rng = np.random.default_rng(channels)
    data = rng.integers(0, 256, npages * PAGE, dtype=np.uint8).tobytes()
    path = tmp_path / "f"
    with open(path, "wb") as f:
        f.write(bytes(pages_offset) + data)
    present = rng.random(npages) < 0.7
    ram = mmap.mmap(-1, npages * PAGE)
    reader = ParallelPageReader(str(path), channels)
    with memoryview(ram) as view:
        got = reader.read_block("pc.ram", view, pages_offset, present)
    assert got == int(present.sum()) == sum(reader.pages_read)
    out = np.frombuffer(ram, dtype=np.uint8).reshape(npages, PAGE)
    src = np.frombuffer(data, dtype=np.uint8).reshape(npages, PAGE)
    assert (out[present] == src[present]).all()
    assert not out[~present].any()


def test_a_short_file_gives_qemu_texts(tmp_path: Path) -> None:
    path = tmp_path / "f"
    with open(path, "wb") as f:
        f.write(bytes((1 << 20) + 300 * PAGE))           # the last pages are missing
    present = np.ones(512, dtype=bool)
    ram = mmap.mmap(-1, 512 * PAGE)
    with memoryview(ram) as view, pytest.raises(StreamFormatError) as info:
        ParallelPageReader(str(path), 2).read_block("pc.ram", view, 1 << 20, present)
    text = str(info.value)
    assert text.startswith("(pc.ram) failed to read page 100000from file offset 200000: "
                           "multifd recv ("), text
    assert text.endswith("): read 0x2c000, expected 0x100000"), text


def test_skip_unread_counts_the_skipped_input() -> None:
    r = StreamReader()
    r.feed(b"abcdef")
    r.skip(2)
    assert r.skip_unread(3) == 0 and r.offset == 5
    assert r.skip_unread(100) == 99 and r.offset == 105
    r.feed(b"xy")
    assert r.offset == 105 and r.u8() == ord("x")


def test_without_multifd_no_channel_is_named(tmp_path: Path) -> None:
    path = tmp_path / "f"
    with open(path, "wb") as f:
        f.write(bytes((1 << 20) + 3 * PAGE))
    ram = mmap.mmap(-1, 8 * PAGE)
    with memoryview(ram) as view, pytest.raises(StreamFormatError) as info:
        ParallelPageReader(str(path), 1, multifd=False).read_block(
            "pc.ram", view, 1 << 20, np.ones(8, dtype=bool))
    assert str(info.value) == ("(pc.ram) failed to read page 0from file offset 100000: "
                               "read 0x3000, expected 0x8000")
