"""ATA PIO disk and its raw image store: status sequences, IRQ 14, LBA/CHS, IDENTIFY, reads
and writes through a real temporary file, errors, resets, save/load mid-transfer."""

from __future__ import annotations

import os
from typing import Iterator

import pytest

from pyvm.block import DiskImage
from pyvm.devices.ata_disk import ATA_VMSD, AtaDisk
from pyvm.errors import ConfigError, DeviceError

DATA, ERROR, NSECT, LBA0, LBA1, LBA2, DEVICE, CMD = range(0x1F0, 0x1F8)
CTRL = 0x3F6
SECTORS = 2048


_RAMP = bytes(range(256)) * 3


def sector_pattern(lba: int) -> bytes:
    """Byte i of sector lba is (7 * lba + i) mod 256."""
    start = (lba * 7) & 0xFF
    return _RAMP[start:start + 512]


@pytest.fixture
def image_path(tmp_path) -> str:
    path = tmp_path / "disk.img"
    path.write_bytes(b"".join(sector_pattern(i) for i in range(SECTORS)))
    return str(path)


@pytest.fixture
def disk(ctx, image_path) -> Iterator[AtaDisk]:
    d = AtaDisk(DiskImage(image_path))
    d.attach(ctx)
    d.reset()
    yield d
    d.close()


def issue(disk: AtaDisk, cmd: int, lba: int = 0, count: int = 1) -> None:
    disk.io_write(NSECT, 1, count & 0xFF)
    disk.io_write(LBA0, 1, lba & 0xFF)
    disk.io_write(LBA1, 1, (lba >> 8) & 0xFF)
    disk.io_write(LBA2, 1, (lba >> 16) & 0xFF)
    disk.io_write(DEVICE, 1, 0xE0 | ((lba >> 24) & 0x0F))
    disk.io_write(CMD, 1, cmd)


def read_words(disk: AtaDisk, n: int) -> bytes:
    return b"".join(disk.io_read(DATA, 2).to_bytes(2, "little") for _ in range(n))


def test_power_on_signature(disk):
    assert disk.io_read(CMD, 1) == 0x50
    assert [disk.io_read(p, 1) for p in (ERROR, NSECT, LBA0, LBA1, LBA2)] == [1, 1, 1, 0, 0]


def test_identify_device(disk, ctx):
    disk.io_write(DEVICE, 1, 0xA0)
    disk.io_write(CMD, 1, 0xEC)
    assert ctx.levels[14] is True
    assert disk.io_read(CTRL, 1) == 0x58            # alternate status keeps INTRQ
    assert ctx.levels[14] is True
    assert disk.io_read(CMD, 1) == 0x58
    assert ctx.levels[14] is False                  # status read clears INTRQ
    block = read_words(disk, 256)
    words = [int.from_bytes(block[i:i + 2], "little") for i in range(0, 512, 2)]
    model = b"".join(w.to_bytes(2, "big") for w in words[27:47]).decode().strip()
    assert model == "PYVM HARDDISK"
    assert words[60] | (words[61] << 16) == SECTORS
    assert words[49] & 0x0200                       # LBA
    assert words[0] == 0x0040
    assert block[510] == 0xA5 and sum(block) & 0xFF == 0
    assert disk.io_read(CMD, 1) == 0x50


def test_read_sectors_status_sequence_and_data(disk, ctx):
    issue(disk, 0x20, lba=100, count=2)
    assert ctx.rising_edges(14) == 1
    assert disk.io_read(CMD, 1) == 0x58
    assert read_words(disk, 256) == sector_pattern(100)
    assert ctx.rising_edges(14) == 2                # second DRQ block interrupts again
    assert disk.io_read(CMD, 1) == 0x58
    assert read_words(disk, 256) == sector_pattern(101)
    assert disk.io_read(CMD, 1) == 0x50             # no DRQ after the last word
    assert ctx.rising_edges(14) == 2                # and no interrupt at the end of data-in
    # registers point past the transfer
    assert (disk.io_read(LBA0, 1), disk.io_read(NSECT, 1)) == (102, 0)


def test_read_with_32bit_transfers(disk):
    issue(disk, 0x20, lba=5, count=1)
    data = b"".join(disk.io_read(DATA, 4).to_bytes(4, "little") for _ in range(128))
    assert data == sector_pattern(5)
    assert disk.io_read(CMD, 1) == 0x50


def test_write_sectors_then_read_back_through_the_file(disk, ctx, image_path):
    payload = bytes(range(256)) * 4
    issue(disk, 0x30, lba=7, count=2)
    assert disk.io_read(CTRL, 1) == 0x58
    assert ctx.rising_edges(14) == 0                # data-out: first block without IRQ
    for i in range(0, 512, 2):
        disk.io_write(DATA, 2, int.from_bytes(payload[i:i + 2], "little"))
    assert ctx.rising_edges(14) == 1
    assert disk.io_read(CMD, 1) == 0x58
    for i in range(512, 1024, 4):
        disk.io_write(DATA, 4, int.from_bytes(payload[i:i + 4], "little"))
    assert ctx.rising_edges(14) == 2
    assert disk.io_read(CMD, 1) == 0x50
    with open(image_path, "rb") as f:
        f.seek(7 * 512)
        assert f.read(1024) == payload              # writethrough: already in the file
    issue(disk, 0x20, lba=7, count=2)
    assert read_words(disk, 512) == payload
    assert read_words(disk, 1) == b"\xff\xff"       # no transfer active


def test_chs_addressing(disk):
    disk.io_write(NSECT, 1, 1)
    disk.io_write(LBA0, 1, 2)                       # sector 2
    disk.io_write(LBA1, 1, 1)                       # cylinder 1
    disk.io_write(LBA2, 1, 0)
    disk.io_write(DEVICE, 1, 0xA0 | 3)              # head 3, CHS
    disk.io_write(CMD, 1, 0x20)
    assert read_words(disk, 256) == sector_pattern((1 * 16 + 3) * 63 + 1)


def test_chs_sector_zero_is_not_found(disk):
    disk.io_write(LBA0, 1, 0)
    disk.io_write(DEVICE, 1, 0xA0)
    disk.io_write(CMD, 1, 0x20)
    assert disk.io_read(CMD, 1) == 0x51
    assert disk.io_read(ERROR, 1) == 0x10


def test_out_of_range_read_fails_with_idnf(disk, ctx):
    issue(disk, 0x20, lba=SECTORS - 1, count=2)
    assert disk.io_read(CMD, 1) == 0x51
    assert disk.io_read(ERROR, 1) == 0x10
    assert ctx.rising_edges(14) == 1


def test_unknown_command_aborts_and_logs_once(disk, ctx):
    for _ in range(2):
        disk.io_write(CMD, 1, 0xB0)                 # SMART: not implemented
        assert disk.io_read(CMD, 1) == 0x51
        assert disk.io_read(ERROR, 1) == 0x04
    assert len([t for t, _ in ctx.logs if t == "unimp"]) == 1


def test_identify_packet_device_is_aborted(disk):
    disk.io_write(CMD, 1, 0xA1)
    assert disk.io_read(ERROR, 1) == 0x04


def test_software_reset(disk, ctx):
    issue(disk, 0x20, lba=1, count=4)
    disk.io_write(CTRL, 1, 0x04)                    # SRST
    assert disk.io_read(CTRL, 1) == 0x80
    disk.io_write(CMD, 1, 0xEC)                     # ignored while busy
    assert disk.io_read(CTRL, 1) == 0x80
    disk.io_write(CTRL, 1, 0x00)
    assert disk.io_read(CMD, 1) == 0x50
    assert [disk.io_read(p, 1) for p in (ERROR, NSECT, LBA0, LBA1, LBA2)] == [1, 1, 1, 0, 0]
    assert read_words(disk, 1) == b"\xff\xff"


def test_nien_masks_the_interrupt_line(disk, ctx):
    disk.io_write(CTRL, 1, 0x02)
    issue(disk, 0x20, lba=0, count=1)
    assert ctx.rising_edges(14) == 0
    assert disk.io_read(CTRL, 1) == 0x58            # the guest can still poll
    disk.io_write(CTRL, 1, 0x00)                    # INTRQ still pending: line rises now
    assert ctx.rising_edges(14) == 1


def test_execute_diagnostic(disk, ctx):
    issue(disk, 0x90)
    assert disk.io_read(ERROR, 1) == 0x01
    assert disk.io_read(CMD, 1) == 0x50
    assert ctx.rising_edges(14) == 1


def test_device1_is_absent(disk):
    disk.io_write(DEVICE, 1, 0xB0)
    assert disk.io_read(CMD, 1) == 0x00
    disk.io_write(CMD, 1, 0xEC)
    assert disk.io_read(CTRL, 1) == 0x00
    disk.io_write(DEVICE, 1, 0xA0)
    assert disk.io_read(CMD, 1) == 0x50             # the command went nowhere


def test_read_multiple(disk, ctx):
    issue(disk, 0xC4, count=8)                      # multiple mode not set yet
    assert disk.io_read(ERROR, 1) == 0x04
    disk.io_write(NSECT, 1, 4)
    disk.io_write(CMD, 1, 0xC6)
    assert disk.io_read(CMD, 1) == 0x50
    edges = ctx.rising_edges(14)
    issue(disk, 0xC4, lba=10, count=8)
    assert ctx.rising_edges(14) == edges + 1        # one interrupt per 4-sector block
    assert disk.io_read(CMD, 1) == 0x58             # the handler reads status: line drops
    assert read_words(disk, 1024) == b"".join(sector_pattern(i) for i in range(10, 14))
    assert disk.io_read(CMD, 1) == 0x58
    assert read_words(disk, 1024) == b"".join(sector_pattern(i) for i in range(14, 18))
    assert ctx.rising_edges(14) == edges + 2
    assert disk.io_read(CMD, 1) == 0x50


def test_set_features_and_flush_are_accepted(disk):
    disk.io_write(ERROR, 1, 0x03)                   # set transfer mode
    disk.io_write(CMD, 1, 0xEF)
    assert disk.io_read(CMD, 1) == 0x50
    disk.io_write(CMD, 1, 0xE7)
    assert disk.io_read(CMD, 1) == 0x50


def test_write_to_readonly_image_aborts(ctx, image_path):
    d = AtaDisk(DiskImage(image_path, readonly=True))
    d.attach(ctx)
    d.reset()
    issue(d, 0x30, lba=0, count=1)
    assert d.io_read(CMD, 1) == 0x51
    assert d.io_read(ERROR, 1) == 0x04
    d.close()


def test_save_between_data_reads_resumes(disk, ctx, image_path, vmsd_fits, migrate):
    issue(disk, 0x20, lba=20, count=3)
    first = read_words(disk, 100)
    disk.pre_save()
    vmsd_fits(disk, ATA_VMSD)
    other = AtaDisk(DiskImage(image_path))
    other.attach(ctx)
    other.reset()
    migrate(disk, other)
    rest = read_words(other, 3 * 256 - 100)
    assert first + rest == b"".join(sector_pattern(i) for i in range(20, 23))
    assert other.io_read(CMD, 1) == 0x50
    other.close()


def test_save_between_data_writes_resumes(disk, ctx, image_path, vmsd_fits, migrate):
    payload = bytes(reversed(range(256))) * 2
    issue(disk, 0x30, lba=30, count=1)
    for i in range(0, 200, 2):
        disk.io_write(DATA, 2, int.from_bytes(payload[i:i + 2], "little"))
    disk.pre_save()
    vmsd_fits(disk, ATA_VMSD)
    other = AtaDisk(DiskImage(image_path))
    other.attach(ctx)
    other.reset()
    migrate(disk, other)
    for i in range(200, 512, 2):
        other.io_write(DATA, 2, int.from_bytes(payload[i:i + 2], "little"))
    assert other.io_read(CMD, 1) == 0x50
    assert other.image.read(30, 1) == payload
    other.close()


# -- DiskImage -------------------------------------------------------------------------------
def test_missing_image_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="Could not open .*No such file or directory"):
        DiskImage(str(tmp_path / "nope.img"))


def test_directory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="Is a directory"):
        DiskImage(str(tmp_path))


def test_bad_cache_mode(image_path):
    with pytest.raises(ConfigError, match="cache"):
        DiskImage(image_path, cache="unsafe-ish")


def test_partial_last_sector_reads_as_zero_padded(tmp_path):
    path = tmp_path / "odd.img"
    path.write_bytes(b"\x11" * 700)
    img = DiskImage(str(path))
    assert img.sectors == 2
    assert img.read(1, 1) == b"\x11" * 188 + bytes(324)
    img.write(1, b"\x22" * 512)
    assert os.path.getsize(path) == 1024
    img.close()


def test_range_and_readonly_errors(image_path):
    img = DiskImage(image_path, readonly=True)
    with pytest.raises(DeviceError, match="beyond the end"):
        img.read(SECTORS, 1)
    with pytest.raises(DeviceError, match="read-only"):
        img.write(0, bytes(512))
    with pytest.raises(ValueError):
        img.write(0, bytes(100))
    img.close()
    img.close()                         # twice is fine
    assert img.closed


def test_writeback_keeps_sectors_until_flush(image_path):
    img = DiskImage(image_path, cache="writeback")
    img.write(3, b"\xAA" * 1024)
    img.write(9, b"\xBB" * 512)
    assert img.dirty_sectors == 3
    assert img.read(2, 3) == sector_pattern(2) + b"\xAA" * 1024     # cache merged into reads
    with open(image_path, "rb") as f:
        f.seek(3 * 512)
        assert f.read(512) == sector_pattern(3)                   # not in the file yet
    img.flush()
    assert img.dirty_sectors == 0
    with open(image_path, "rb") as f:
        data = f.read()
    assert data[3 * 512:5 * 512] == b"\xAA" * 1024
    assert data[9 * 512:10 * 512] == b"\xBB" * 512
    img.close()


def test_writeback_close_flushes(image_path):
    img = DiskImage(image_path, cache="writeback")
    img.write(0, b"\xCC" * 512)
    img.close()
    with open(image_path, "rb") as f:
        assert f.read(512) == b"\xCC" * 512
