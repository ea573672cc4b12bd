"""Pages never populated are known to be zero, only for private anonymous RAM."""

from __future__ import annotations

import sys

import pytest

from pyvm.pagemap import unpopulated_pages
from pyvm.ram import MemoryBackend, MemoryBackendConfig, RamBlock

PAGE = 4096
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/pagemap is Linux's")


def _block(qom_type: str, share: bool = False, **kw: object) -> RamBlock:
    cfg = MemoryBackendConfig(qom_type, "r", 64 * PAGE, share=share, **kw)  # type: ignore[arg-type]
    return RamBlock("pc.ram", 0, MemoryBackend(cfg))


def test_written_and_read_pages_are_populated() -> None:
    block = _block("memory-backend-ram")
    mask = block.unpopulated()
    if mask is None:
        pytest.skip("pagemap is not readable here")
    assert mask.tolist() == [True] * 64
    block.mem[5 * PAGE + 17] = 1             # a store populates the page
    _ = int(block.mem[9 * PAGE])             # a load maps the zero page: present too
    mask = block.unpopulated()
    assert mask is not None
    assert [i for i in range(64) if not mask[i]] == [5, 9]
    part = block.unpopulated(4, 3)
    assert part is not None and part.tolist() == [True, False, True]
    with pytest.raises(ValueError, match="outside RAM block"):
        block.unpopulated(60, 5)


@pytest.mark.parametrize("qom_type,share", [("memory-backend-ram", True), ("memory-backend-memfd", True)])
def test_shared_memory_is_never_assumed_zero(qom_type: str, share: bool) -> None:
    # An absent page of shared or file-backed memory may hold data another mapping wrote.
    assert _block(qom_type, share).unpopulated() is None


def test_file_backed_memory_is_never_assumed_zero(tmp_path) -> None:
    path = tmp_path / "ram"
    path.write_bytes(b"\x01" * 64 * PAGE)
    assert _block("memory-backend-file", False, mem_path=str(path)).unpopulated() is None


def test_empty_range() -> None:
    assert unpopulated_pages(0, 0) is not None
    assert unpopulated_pages(0, 0).size == 0  # type: ignore[union-attr]


def test_prealloc_populates_every_page_and_keeps_file_contents(tmp_path) -> None:
    block = _block("memory-backend-ram", prealloc=True)
    mask = block.unpopulated()
    if mask is None:
        pytest.skip("pagemap is not readable here")
    assert not mask.any()
    path = tmp_path / "ram"
    data = bytes(range(256)) * (64 * PAGE // 256)
    path.write_bytes(data)
    private = _block("memory-backend-file", False, mem_path=str(path), prealloc=True)
    assert private.mem.tobytes() == data
