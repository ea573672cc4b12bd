"""The guest images in pyvm/guests/ are exactly what firmware/ builds.

``make -C firmware check`` rebuilds every image in a temporary directory and compares
the bytes with the committed ones.  The other tests check each committed image against
the boot contract: ELF images load at 1 MiB or above and enter inside what they load,
boot sectors are 512 bytes with the 0x55 0xaa signature.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

ROOT = Path(__file__).resolve().parents[2]
FIRMWARE = ROOT / "firmware"
GUESTS = ROOT / "pyvm" / "guests"

ELF32_IMAGES = ("hello.elf", "ab.elf", "memcheck.elf", "store-loop.elf", "dirty.elf", "timer-pm.elf",
                "torture.elf", "serial-stream.elf")
ELF64_IMAGES = ("timer-lm.elf",)
BOOT_IMAGES = ("boot-pm.img", "timer-real.img", "disk-rw.img", "fault.img", "pm-realss.img")
ALL_IMAGES = ELF32_IMAGES + ELF64_IMAGES + BOOT_IMAGES

LOAD_BASE = 0x100000
MULTIBOOT_MAGIC = 0x1BADB002
MULTIBOOT_SEARCH = 8192

_MISSING_TOOLS = [tool for tool in ("make", "as", "ld", "objcopy") if shutil.which(tool) is None]
needs_toolchain = pytest.mark.skipif(
    bool(_MISSING_TOOLS), reason=f"firmware toolchain missing: {', '.join(_MISSING_TOOLS)}"
)


def _make(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "-s", "--no-print-directory", "-C", str(FIRMWARE), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@needs_toolchain
def test_rebuild_gives_the_committed_bytes() -> None:
    result = _make("check")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_toolchain
def test_check_reports_an_image_that_differs(tmp_path: Path) -> None:
    for name in ALL_IMAGES:
        shutil.copyfile(GUESTS / name, tmp_path / name)
    altered = bytearray((tmp_path / "memcheck.elf").read_bytes())
    altered[-1] ^= 0xFF
    (tmp_path / "memcheck.elf").write_bytes(bytes(altered))
    result = _make("check", f"OUT={tmp_path}")
    assert result.returncode != 0
    assert "memcheck.elf differs" in result.stdout
    assert "hello.elf differs" not in result.stdout


@needs_toolchain
def test_makefile_builds_exactly_the_expected_images() -> None:
    result = _make("list")
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split()) == sorted(ALL_IMAGES)


@pytest.mark.parametrize("name", ALL_IMAGES)
def test_image_is_committed(name: str) -> None:
    path = GUESTS / name
    assert path.is_file(), f"{path} is missing: run make -C firmware"
    assert path.stat().st_size > 0


@pytest.mark.parametrize("name", BOOT_IMAGES)
def test_boot_sector_is_512_bytes_with_signature(name: str) -> None:
    data = (GUESTS / name).read_bytes()
    assert len(data) == 512
    assert data[510:] == b"\x55\xaa"


@pytest.mark.parametrize(
    ("name", "elf_class", "machine"),
    [(n, 32, "EM_386") for n in ELF32_IMAGES] + [(n, 64, "EM_X86_64") for n in ELF64_IMAGES],
)
def test_elf_loads_at_one_mib_and_enters_what_it_loads(
    name: str, elf_class: int, machine: str
) -> None:
    with open(GUESTS / name, "rb") as stream:
        elf = ELFFile(stream)
        assert elf.elfclass == elf_class
        assert elf["e_machine"] == machine
        assert elf["e_type"] == "ET_EXEC"
        loads = [seg for seg in elf.iter_segments() if seg["p_type"] == "PT_LOAD"]
        assert loads, "no loadable segment"
        for seg in loads:
            assert seg["p_paddr"] >= LOAD_BASE
            assert seg["p_filesz"] == seg["p_memsz"], "images carry their .bss as file bytes"
        entry = elf["e_entry"]
        assert any(seg["p_paddr"] <= entry < seg["p_paddr"] + seg["p_filesz"] for seg in loads)


@pytest.mark.parametrize("name", ELF32_IMAGES)
def test_elf32_guest_carries_a_multiboot_header(name: str) -> None:
    data = (GUESTS / name).read_bytes()[:MULTIBOOT_SEARCH]
    for offset in range(0, len(data) - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", data, offset)
        if magic == MULTIBOOT_MAGIC:
            assert (magic + flags + checksum) & 0xFFFFFFFF == 0
            return
    pytest.fail("no Multiboot header in the first 8 KiB")
