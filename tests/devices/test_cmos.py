"""MC146818 RTC: time from the host plus the virtual clock, BCD/binary, 12/24 h, setting the
time, UIP, register C flags and IRQ 8, CMOS RAM, save/load."""

from __future__ import annotations

import calendar

import pytest

from pyvm.config import MachineConfig
from pyvm.devices.cmos_rtc import RTC_VMSD, CmosRtc, periodic_rate_hz
from pyvm.guests import guest_path
from pyvm.machine import Machine, cmos_memory_sizes

NS = 1_000_000_000
# Thursday 2024-02-29 23:59:58 UTC
START_S = calendar.timegm((2024, 2, 29, 23, 59, 58, 0, 0, 0))


@pytest.fixture
def rtc(ctx) -> CmosRtc:
    ctx.clock.ns = 7 * NS               # the virtual clock need not start at 0
    r = CmosRtc(host_time_ns=START_S * NS)
    r.attach(ctx)
    r.reset()
    return r


def reg(rtc: CmosRtc, index: int) -> int:
    rtc.io_write(0x70, 1, index)
    return rtc.io_read(0x71, 1)


def setreg(rtc: CmosRtc, index: int, value: int) -> None:
    rtc.io_write(0x70, 1, index)
    rtc.io_write(0x71, 1, value)


def calendar_regs(rtc: CmosRtc) -> tuple[int, ...]:
    return tuple(reg(rtc, i) for i in (0x32, 0x09, 0x08, 0x07, 0x06, 0x04, 0x02, 0x00))


def test_time_from_host_in_bcd_24h(rtc):
    # century, year, month, day, weekday (Sunday = 1), hours, minutes, seconds
    assert calendar_regs(rtc) == (0x20, 0x24, 0x02, 0x29, 0x05, 0x23, 0x59, 0x58)


def test_virtual_clock_advances_the_calendar(rtc, ctx):
    ctx.clock.advance(2 * NS)
    assert calendar_regs(rtc) == (0x20, 0x24, 0x03, 0x01, 0x06, 0x00, 0x00, 0x00)


def test_binary_mode(rtc):
    setreg(rtc, 0x0B, 0x06)             # binary, 24 h
    assert calendar_regs(rtc) == (20, 24, 2, 29, 5, 23, 59, 58)


def test_twelve_hour_mode(rtc, ctx):
    setreg(rtc, 0x0B, 0x00)             # BCD, 12 h
    assert reg(rtc, 0x04) == 0x80 | 0x11            # 11 PM
    ctx.clock.advance(2 * NS)
    assert reg(rtc, 0x04) == 0x12                   # 12 AM
    setreg(rtc, 0x0B, 0x04)             # binary, 12 h
    assert reg(rtc, 0x04) == 12


def test_setting_the_time_with_set_bit(rtc, ctx):
    setreg(rtc, 0x0B, 0x82)             # SET, 24 h, BCD
    for index, value in ((0x32, 0x19), (0x09, 0x99), (0x08, 0x12), (0x07, 0x31),
                         (0x04, 0x23), (0x02, 0x59), (0x00, 0x50)):
        setreg(rtc, index, value)
    ctx.clock.advance(30 * NS)          # frozen while SET is on
    assert reg(rtc, 0x00) == 0x50
    setreg(rtc, 0x0B, 0x02)             # run
    ctx.clock.advance(15 * NS)
    assert calendar_regs(rtc)[:4] == (0x20, 0x00, 0x01, 0x01)
    assert (reg(rtc, 0x04), reg(rtc, 0x02), reg(rtc, 0x00)) == (0x00, 0x00, 0x05)


def test_writing_a_time_register_without_set_applies_at_once(rtc, ctx):
    setreg(rtc, 0x02, 0x30)             # minutes := 30
    ctx.clock.advance(1 * NS)
    assert (reg(rtc, 0x04), reg(rtc, 0x02), reg(rtc, 0x00)) == (0x23, 0x30, 0x59)


def test_uip_bit_before_each_update(rtc, ctx):
    ctx.clock.ns = 7 * NS + NS - 100_000        # 100 us before the next second
    assert reg(rtc, 0x0A) & 0x80
    ctx.clock.ns = 7 * NS + NS // 2
    assert reg(rtc, 0x0A) == 0x26


def test_register_d_and_c(rtc, ctx):
    assert reg(rtc, 0x0D) == 0x80
    ctx.clock.advance(3 * NS)
    assert reg(rtc, 0x0C) & 0x50 == 0x50        # PF and UF set, no interrupt enabled
    assert reg(rtc, 0x0C) == 0


def test_nvram_and_nmi_mask(rtc):
    rtc.io_write(0x70, 1, 0x80 | 0x40)
    assert rtc.nmi_masked == 1
    rtc.io_write(0x71, 1, 0x5A)
    rtc.io_write(0x70, 1, 0x40)
    assert rtc.nmi_masked == 0
    assert rtc.io_read(0x71, 1) == 0x5A
    assert rtc.io_read(0x70, 1) == 0xFF        # the index port is write-only
    rtc.write_nvram(0x7E, b"\x01\x02")
    assert reg(rtc, 0x7F) == 0x02
    with pytest.raises(ValueError):
        rtc.write_nvram(0x0D, b"\x00")         # register D is not RAM


def test_periodic_rates():
    assert periodic_rate_hz(0x26) == 1024
    assert periodic_rate_hz(0x23) == 8192
    assert periodic_rate_hz(0x2F) == 2
    assert periodic_rate_hz(0x21) == 256
    assert periodic_rate_hz(0x20) == 0


def test_periodic_interrupt_is_a_deadline(rtc, ctx):
    assert rtc.deadline() is None
    setreg(rtc, 0x0A, 0x2F)             # 2 Hz
    setreg(rtc, 0x0B, 0x42)             # PIE
    first = rtc.deadline()
    assert first is not None and 7 * NS < first <= 7 * NS + NS // 2
    ctx.clock.ns = first
    rtc.run_timers(first)
    assert ctx.levels[8] is True
    assert rtc.deadline() is None       # line held until register C is read
    assert reg(rtc, 0x0C) & 0xC0 == 0xC0
    assert ctx.levels[8] is False
    assert rtc.deadline() == first + NS // 2


def test_update_ended_interrupt_once_per_second(rtc, ctx):
    setreg(rtc, 0x0B, 0x12)             # UIE
    when = rtc.deadline()
    assert when == 8 * NS               # wall 23:59:58.0 -> the next second boundary
    ctx.clock.ns = when
    rtc.run_timers(when)
    assert ctx.levels[8] is True
    # IRQF, UF, and PF: the 1024 Hz divider sets PF whether or not PIE is on
    assert reg(rtc, 0x0C) == 0xD0
    assert rtc.deadline() == 9 * NS


def test_alarm_interrupt(rtc, ctx):
    setreg(rtc, 0x01, 0x01)             # alarm at hh:mm:01, any hour, any minute
    setreg(rtc, 0x03, 0xC0)
    setreg(rtc, 0x05, 0xFF)
    setreg(rtc, 0x0B, 0x22)             # AIE
    hits = []
    for _ in range(4):
        when = rtc.deadline()
        assert when is not None
        ctx.clock.ns = when
        rtc.run_timers(when)
        hits.append(bool(ctx.levels.get(8)))
        reg(rtc, 0x0C)
    # 23:59:59, 00:00:00, 00:00:01 (match), 00:00:02
    assert hits == [False, False, True, False]


def test_reset_clears_enables_but_keeps_time_and_ram(rtc, ctx):
    setreg(rtc, 0x0B, 0x72)
    setreg(rtc, 0x50, 0xAB)
    rtc.reset()
    assert reg(rtc, 0x0B) == 0x02
    assert reg(rtc, 0x50) == 0xAB
    assert reg(rtc, 0x00) == 0x58


def test_save_and_load(rtc, ctx, vmsd_fits, migrate):
    setreg(rtc, 0x60, 0x42)
    setreg(rtc, 0x0B, 0x06)
    rtc.pre_save()
    vmsd_fits(rtc, RTC_VMSD)
    other = CmosRtc(host_time_ns=0)     # a different host time: the saved offset wins
    other.attach(ctx)
    migrate(rtc, other)
    ctx.clock.advance(1 * NS)
    assert reg(other, 0x60) == 0x42
    assert calendar_regs(other) == calendar_regs(rtc) == (20, 24, 2, 29, 5, 23, 59, 59)


def test_guest_set_year_is_clamped_so_state_stays_saveable(rtc, ctx, vmsd_fits):
    setreg(rtc, 0x0B, 0x86)             # SET, binary, 24 h
    setreg(rtc, 0x32, 99)               # year 9999
    setreg(rtc, 0x09, 99)
    setreg(rtc, 0x0B, 0x06)
    assert (reg(rtc, 0x32), reg(rtc, 0x09)) == (21, 99)
    rtc.pre_save()
    vmsd_fits(rtc, RTC_VMSD)


def _cmos_word(m: Machine, low: int, width: int = 2) -> int:
    value = 0
    for i in range(width):
        m.iobus.write(0x70, 1, low + i)
        value |= m.iobus.read(0x71, 1) << (8 * i)
    return value


@pytest.mark.parametrize("mib", [8, 48, 300])
def test_machine_presets_memory_sizes_like_qemu(mib: int) -> None:
    """A guest (or its firmware) reading CMOS through ports 0x70/0x71 sees its RAM size, in
    the bytes QEMU's PC machine writes (hw/i386/pc.c, pc_cmos_init)."""
    size = mib << 20
    m = Machine(MachineConfig(ram_size=size, kernel=guest_path("hello.elf"), serial=["null"],
                              start_paused=True))
    try:
        assert _cmos_word(m, 0x15) == 640                           # base memory, KiB
        extended = min((size - (1 << 20)) // 1024, 65535)           # above 1 MiB, KiB, capped
        assert _cmos_word(m, 0x17) == _cmos_word(m, 0x30) == extended
        assert _cmos_word(m, 0x34) == max(size - (16 << 20), 0) // 65536
        assert _cmos_word(m, 0x5B, 3) == 0                          # nothing above 4 GiB
    finally:
        m.close()
        m.ram.close()


def test_memory_size_bytes_cap_and_reach_above_4g() -> None:
    sizes = dict(cmos_memory_sizes((6 << 30) + (576 << 10)))
    assert sizes[0x15] == (640).to_bytes(2, "little")
    assert sizes[0x17] == sizes[0x30] == b"\xff\xff"                 # capped at 65535 KiB
    assert sizes[0x34] == ((4 << 30) - (16 << 20) >> 16).to_bytes(2, "little")   # 64 KiB units
    assert sizes[0x5B] == (((2 << 30) >> 16) + 9).to_bytes(3, "little")  # 2 GiB + 9 x 64 KiB
    small = dict(cmos_memory_sizes(512 << 10))                         # below 1 MiB
    assert small[0x15] == (512).to_bytes(2, "little")
    assert small[0x17] == small[0x34] == b"\x00\x00"
