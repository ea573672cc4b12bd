"""The MC146818 real-time clock and CMOS RAM (index port 0x70, data port 0x71, IRQ 8).

Reference: Motorola MC146818A datasheet, "Address Map", "Registers A-D" and "Interrupts".

* Bit 7 of a write to 0x70 is the PC's NMI mask (stored, see :attr:`CmosRtc.nmi_masked`);
  bits 0-6 select one of 128 bytes.  0x70 is write-only and reads as 0xff.
* The guest's wall clock is the virtual clock plus an offset (``offset_ns``).  The offset is
  set from the host's UTC time when the machine is created and changed when the guest sets
  the time; the virtual clock travels with the VM, so the guest clock does too.
* Time registers (0x00-0x09, and the century byte at 0x32) read the current time in BCD
  or binary and in 12- or 24-hour form, as register B says.  While register B's SET bit is
  on they hold what the guest wrote; clearing SET starts the clock from there.  A time write
  with SET off takes effect at once.
* Register A bit 7 (UIP) is on during the last 244 us of each second.  Register C's flags
  (PF periodic, AF alarm, UF update-ended) are computed from the clock when C is read or
  a timer runs; reading C clears them and lowers IRQ 8.  IRQ 8 goes high when a flag is set
  whose enable bit (PIE/AIE/UIE) is on.  Periodic and update interrupts are deadlines.
  If the run loop falls behind, missed periodic ticks merge into one interrupt.
* Register D reads 0x80 (valid RAM and time).  Bytes 0x0e-0x7f are battery-backed RAM.
* The divider bits of register A are stored but do not stop the clock.
* A time set by the guest is clamped to a valid date in the years 1900-2199.
"""

from __future__ import annotations

import datetime
import time

from pyvm.devices.base import Device, DeviceContext
from pyvm.vmstate import Field, VMStateDescription

RTC_IRQ = 8
NS_PER_S = 1_000_000_000
UIP_NS = 244_000                    # update-in-progress window before each update

REG_SECONDS, REG_SECONDS_ALARM, REG_MINUTES, REG_MINUTES_ALARM = 0x00, 0x01, 0x02, 0x03
REG_HOURS, REG_HOURS_ALARM, REG_WEEKDAY, REG_DAY, REG_MONTH, REG_YEAR = 0x04, 0x05, 0x06, \
    0x07, 0x08, 0x09
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
REG_CENTURY = 0x32                  # IBM PC/AT convention
TIME_REGS = frozenset((REG_SECONDS, REG_MINUTES, REG_HOURS, REG_WEEKDAY, REG_DAY, REG_MONTH,
                       REG_YEAR, REG_CENTURY))

REG_A_UIP = 0x80
REG_B_SET, REG_B_PIE, REG_B_AIE, REG_B_UIE = 0x80, 0x40, 0x20, 0x10
REG_B_SQWE, REG_B_DM_BINARY, REG_B_24H, REG_B_DSE = 0x08, 0x04, 0x02, 0x01
REG_C_IRQF, REG_C_PF, REG_C_AF, REG_C_UF = 0x80, 0x40, 0x20, 0x10
REG_D_VRT = 0x80
ALARM_DONT_CARE = 0xC0              # alarm byte values 0xc0-0xff match any value

EPOCH = datetime.datetime(1970, 1, 1)
# Years a guest can set: what the century byte covers, and what keeps offset_ns in int64.
YEAR_MIN, YEAR_MAX = 1900, 2199

RTC_VMSD = VMStateDescription(
    name="mc146818rtc",
    version_id=1,
    minimum_version_id=1,
    fields=(
        Field("cmos_data", "buffer", size=128),
        Field("cmos_index", "uint8"),
        Field("nmi_masked", "uint8"),
        Field("offset_ns", "int64"),        # guest wall-clock ns = virtual ns + offset_ns
        Field("flags_checked_ns", "int64"),  # virtual ns up to which register C is current
    ),
)


def periodic_rate_hz(reg_a: int) -> int:
    """Periodic interrupt rate selected by register A bits 0-3 (datasheet table 5)."""
    rs = reg_a & 0x0F
    if rs == 0:
        return 0
    if rs <= 2:
        rs += 7                     # rates 1 and 2 repeat 8 and 9 with a 32.768 kHz base
    return 65536 >> rs


def _to_bcd(value: int) -> int:
    return ((value // 10) << 4) | (value % 10)


def _from_bcd(value: int) -> int:
    return (value >> 4) * 10 + (value & 0x0F)


class CmosRtc(Device):
    """MC146818 RTC plus 114 bytes of CMOS RAM."""

    idstr = "mc146818rtc"
    vmsd = RTC_VMSD

    cmos_data: bytes
    cmos_index: int
    nmi_masked: int
    offset_ns: int
    flags_checked_ns: int

    def __init__(self, host_time_ns: int | None = None) -> None:
        super().__init__()
        self._host_time_ns = time.time_ns() if host_time_ns is None else host_time_ns
        self._ram = bytearray(128)
        self._ram[REG_A] = 0x26             # 32.768 kHz time base, 1024 Hz periodic rate
        self._ram[REG_B] = REG_B_24H        # 24-hour, BCD
        self._ram[REG_D] = REG_D_VRT
        self.cmos_data = bytes(self._ram)
        self.cmos_index = 0
        self.nmi_masked = 0
        self.offset_ns = self._host_time_ns
        self.flags_checked_ns = 0
        self._irq_level = False

    # -- Device API -------------------------------------------------------------------
    def attach(self, ctx: DeviceContext) -> None:
        super().attach(ctx)
        now = ctx.clock.now_ns()
        self.offset_ns = self._host_time_ns - now
        self.flags_checked_ns = now

    def ports(self) -> list[tuple[int, int]]:
        return [(0x70, 2)]

    def reset(self) -> None:
        """The RESET pin: interrupt enables and flags clear; time and RAM are kept."""
        self._ram[REG_B] &= ~(REG_B_PIE | REG_B_AIE | REG_B_UIE | REG_B_SQWE) & 0xFF
        self._ram[REG_C] = 0
        if self.ctx is not None:
            self.flags_checked_ns = self._now()
        self._drive_irq()

    def pre_save(self) -> None:
        self.cmos_data = bytes(self._ram)

    def post_load(self) -> None:
        self._ram[:] = self.cmos_data
        self._irq_level = bool(self._ram[REG_C] & REG_C_IRQF)  # the PIC holds the line

    def deadline(self) -> int | None:
        if self._ram[REG_C] & REG_C_IRQF:
            return None             # the line is already high until register C is read
        b = self._ram[REG_B]
        wall = self.flags_checked_ns + self.offset_ns
        best: int | None = None
        rate = periodic_rate_hz(self._ram[REG_A])
        if b & REG_B_PIE and rate:
            tick = wall * rate // NS_PER_S + 1
            best = -(-tick * NS_PER_S // rate)
        if b & (REG_B_UIE | REG_B_AIE) and not b & REG_B_SET:
            second = (wall // NS_PER_S + 1) * NS_PER_S
            best = second if best is None else min(best, second)
        return None if best is None else best - self.offset_ns

    def run_timers(self, now_ns: int) -> None:
        self._update_flags(now_ns)

    def io_read(self, port: int, size: int) -> int:
        value = 0
        for i in range(size):
            value |= self._read_byte(port + i) << (8 * i)
        return value

    def io_write(self, port: int, size: int, value: int) -> None:
        for i in range(size):
            self._write_byte(port + i, (value >> (8 * i)) & 0xFF)

    # -- machine API ----------------------------------------------------------------------
    def write_nvram(self, offset: int, data: bytes) -> None:
        """Preset CMOS RAM bytes (0x0e-0x7f); the machine writes the RAM size there."""
        if offset < 0x0E or offset + len(data) > 128:
            raise ValueError("CMOS RAM spans bytes 0x0e-0x7f")
        self._ram[offset:offset + len(data)] = data

    def wall_time_ns(self, now_ns: int | None = None) -> int:
        """The guest's wall clock (ns since 1970, UTC) at virtual time ``now_ns``."""
        return (self._now() if now_ns is None else now_ns) + self.offset_ns

    # -- clock ----------------------------------------------------------------------------
    def _now(self) -> int:
        assert self.ctx is not None, "device not attached"
        return self.ctx.clock.now_ns()

    def _encode(self, value: int) -> int:
        return value if self._ram[REG_B] & REG_B_DM_BINARY else _to_bcd(value)

    def _decode(self, value: int) -> int:
        return value if self._ram[REG_B] & REG_B_DM_BINARY else _from_bcd(value)

    def _encode_hours(self, hour: int) -> int:
        if self._ram[REG_B] & REG_B_24H:
            return self._encode(hour)
        return self._encode(hour % 12 or 12) | (0x80 if hour >= 12 else 0)

    def _decode_hours(self, value: int) -> int:
        if self._ram[REG_B] & REG_B_24H:
            return self._decode(value)
        return self._decode(value & 0x7F) % 12 + (12 if value & 0x80 else 0)

    def _store_time(self, seconds: int) -> None:
        """Write the calendar for ``seconds`` since 1970 into the time registers."""
        t = EPOCH + datetime.timedelta(seconds=seconds)
        self._ram[REG_SECONDS] = self._encode(t.second)
        self._ram[REG_MINUTES] = self._encode(t.minute)
        self._ram[REG_HOURS] = self._encode_hours(t.hour)
        self._ram[REG_WEEKDAY] = self._encode((t.weekday() + 1) % 7 + 1)   # Sunday = 1
        self._ram[REG_DAY] = self._encode(t.day)
        self._ram[REG_MONTH] = self._encode(t.month)
        self._ram[REG_YEAR] = self._encode(t.year % 100)
        self._ram[REG_CENTURY] = self._encode(t.year // 100)

    def _registers_to_seconds(self) -> int:
        """The time held in the registers, clamped to a valid date."""
        year = self._decode(self._ram[REG_CENTURY]) * 100 + self._decode(self._ram[REG_YEAR])
        month = min(max(self._decode(self._ram[REG_MONTH]), 1), 12)
        day = min(max(self._decode(self._ram[REG_DAY]), 1), 31)
        hour = min(self._decode_hours(self._ram[REG_HOURS]), 23)
        minute = min(self._decode(self._ram[REG_MINUTES]), 59)
        second = min(self._decode(self._ram[REG_SECONDS]), 59)
        year = min(max(year, YEAR_MIN), YEAR_MAX)
        while True:
            try:
                t = datetime.datetime(year, month, day, hour, minute, second)
                break
            except ValueError:
                day -= 1            # e.g. 31 February: the last valid day of the month
        return (t - EPOCH) // datetime.timedelta(seconds=1)

    def _freeze_time(self) -> None:
        self._store_time(self.wall_time_ns() // NS_PER_S)

    def _restart_time(self) -> None:
        self.offset_ns = self._registers_to_seconds() * NS_PER_S - self._now()

    # -- register C ---------------------------------------------------------------------
    def _alarm_matches(self, seconds: int) -> bool:
        t = EPOCH + datetime.timedelta(seconds=seconds)
        for reg, actual in ((REG_SECONDS_ALARM, self._encode(t.second)),
                            (REG_MINUTES_ALARM, self._encode(t.minute)),
                            (REG_HOURS_ALARM, self._encode_hours(t.hour))):
            alarm = self._ram[reg]
            if alarm & ALARM_DONT_CARE != ALARM_DONT_CARE and alarm != actual:
                return False
        return True

    def _update_flags(self, now: int) -> None:
        """Set PF/UF/AF for what happened since the last check; raise IRQ 8 if enabled."""
        if now <= self.flags_checked_ns:
            return
        before = self.flags_checked_ns + self.offset_ns
        after = now + self.offset_ns
        self.flags_checked_ns = now
        flags = 0
        rate = periodic_rate_hz(self._ram[REG_A])
        if rate and after * rate // NS_PER_S > before * rate // NS_PER_S:
            flags |= REG_C_PF
        if not self._ram[REG_B] & REG_B_SET:
            first, last = before // NS_PER_S + 1, after // NS_PER_S
            if last >= first:
                flags |= REG_C_UF
                # a day covers every alarm setting; look no further back than that
                for second in range(max(first, last - 86399), last + 1):
                    if self._alarm_matches(second):
                        flags |= REG_C_AF
                        break
        self._ram[REG_C] |= flags
        self._update_irqf()

    def _update_irqf(self) -> None:
        b, c = self._ram[REG_B], self._ram[REG_C]
        enabled = (c & REG_C_PF and b & REG_B_PIE) or (c & REG_C_AF and b & REG_B_AIE) \
            or (c & REG_C_UF and b & REG_B_UIE)
        if enabled:
            self._ram[REG_C] |= REG_C_IRQF
        self._drive_irq()

    def _drive_irq(self) -> None:
        level = bool(self._ram[REG_C] & REG_C_IRQF)
        if level != self._irq_level:
            self._irq_level = level
            if self.ctx is not None:
                self.ctx.set_irq(RTC_IRQ, level)

    # -- ports ----------------------------------------------------------------------------
    def _read_byte(self, port: int) -> int:
        if port != 0x71:
            return 0xFF
        index = self.cmos_index
        b = self._ram[REG_B]
        if index in TIME_REGS and not b & REG_B_SET:
            self._freeze_time()             # refresh from the clock, then read as stored
        if index == REG_A:
            now_wall = self.wall_time_ns()
            uip = not b & REG_B_SET and now_wall % NS_PER_S >= NS_PER_S - UIP_NS
            return (self._ram[REG_A] & 0x7F) | (REG_A_UIP if uip else 0)
        if index == REG_C:
            self._update_flags(self._now())
            value = self._ram[REG_C]
            self._ram[REG_C] = 0
            self._drive_irq()
            return value
        if index == REG_D:
            return REG_D_VRT
        return self._ram[index]

    def _write_byte(self, port: int, value: int) -> None:
        if port == 0x70:
            self.cmos_index = value & 0x7F
            self.nmi_masked = value >> 7
            return
        if port != 0x71:
            return
        index = self.cmos_index
        b = self._ram[REG_B]
        if index in TIME_REGS:
            if b & REG_B_SET:
                self._ram[index] = value
            else:
                self._freeze_time()
                self._ram[index] = value
                self._restart_time()
        elif index == REG_A:
            self._update_flags(self._now())
            self._ram[REG_A] = value & 0x7F
        elif index == REG_B:
            self._write_register_b(value)
        elif index in (REG_C, REG_D):
            pass                            # read-only
        else:
            self._ram[index] = value        # alarms and CMOS RAM

    def _write_register_b(self, value: int) -> None:
        old = self._ram[REG_B]
        self._update_flags(self._now())     # account flags under the old settings
        if value & REG_B_SET:
            value &= ~REG_B_UIE & 0xFF      # SET clears UIE (datasheet, register B bit 7)
            if not old & REG_B_SET:
                self._freeze_time()
        self._ram[REG_B] = value
        if old & REG_B_SET and not value & REG_B_SET:
            self._restart_time()
        self._update_irqf()
