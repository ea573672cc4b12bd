"""The 8254 programmable interval timer (ports 0x40-0x43) and the gate/out bits of port 0x61.

Reference: Intel 82C54 datasheet (order no. 231244), "Modes" and "Read Operations".  The
input clock is 1 193 182 Hz.  Channel 0's OUT is wired to IRQ 0, channel 2's gate and OUT
appear in port 0x61 (bit 0 gate, bit 5 OUT; bit 1 speaker data and bits 2-3 are stored;
bit 4 is the DRAM refresh request, toggling every 15.085 us).

Nothing ticks.  A channel remembers the virtual time its count was loaded
(``count_load_time``) and its reload value (``count``); the current count and OUT level are
computed from the virtual clock when read.  Channel 0's next rising OUT edge is a deadline
(``irq_next_time``) and :meth:`Pit8254.run_timers` emits it as an edge on IRQ 0.  Both times
are virtual-clock nanoseconds, and the virtual clock travels with the VM, so the state saved
in the vmsd resumes exactly after a migration.

Modes:
* 0 (interrupt on terminal count), 2 (rate generator), 3 (square wave) as the datasheet says.
* 1 and 5 (hardware-triggered) start counting when the count is loaded, as if the gate had
  just been triggered, and otherwise behave like mode 0 (1) / mode 4 (5).
* 4 (software strobe) counts like mode 0; its OUT pulses low for one clock at terminal
  count, and IRQ 0 sees a single edge at terminal count, as in mode 0.
* A new count written while a channel counts in mode 2 or 3 takes effect at once (the
  datasheet waits for the end of the current period).
* BCD counting (control word bit 0) is honoured for loads and reads.

After reset no channel is programmed: nothing counts and IRQ 0 stays quiet until the
guest writes a control word and a count (pyvm has no BIOS to do that for it).
"""

from __future__ import annotations

import os
from typing import Any

from pyvm.devices.base import Device
from pyvm.native_modules import load_native
from pyvm.vmstate import Field, VMStateDescription

PIT_FREQ = 1_193_182            # Hz, the PC's 14.31818 MHz / 12
NS_PER_S = 1_000_000_000
REFRESH_NS = 15_085             # port 0x61 bit 4 period (DRAM refresh request, IBM PC/AT)
PIT_IRQ = 0

# Control word (port 0x43) fields
RW_LATCH, RW_LSB, RW_MSB, RW_WORD = 0, 1, 2, 3
READ_BACK = 3                   # channel field value of the read-back command

_CHANNEL_FIELDS = (
    Field("count", "uint32", count=3),          # reload value, 1..0x10000 (10000 in BCD)
    Field("latched_count", "uint16", count=3),
    Field("count_latched", "uint8", count=3),   # rw mode of the latched count, 0 = none
    Field("latch_flip", "uint8", count=3),      # next latched byte: 0 LSB, 1 MSB
    Field("status", "uint8", count=3),
    Field("status_latched", "uint8", count=3),
    Field("read_flip", "uint8", count=3),
    Field("write_flip", "uint8", count=3),
    Field("write_latch", "uint8", count=3),
    Field("rw_mode", "uint8", count=3),
    Field("mode", "uint8", count=3),
    Field("bcd", "uint8", count=3),
    Field("gate", "uint8", count=3),
    Field("armed", "uint8", count=3),           # a count was loaded since the control word
    Field("count_load_time", "int64", count=3),
    Field("paused_at", "int64", count=3),       # gate low since this time, -1 = counting
)

PIT_VMSD = VMStateDescription(
    name="i8254",
    version_id=1,
    minimum_version_id=1,
    fields=_CHANNEL_FIELDS + (
        Field("irq_next_time", "int64"),        # channel 0's next OUT rising edge, -1 = none
        Field("port61", "uint8"),               # port 0x61 bits 1-3 as written
    ),
)


_native: Any = load_native("pyvm._pit")


def ticks_between(start_ns: int, end_ns: int) -> int:
    """Whole input-clock periods elapsed from ``start_ns`` to ``end_ns``."""
    return (end_ns - start_ns) * PIT_FREQ // NS_PER_S


def tick_to_ns(tick: int) -> int:
    """The first nanosecond at which ``tick`` clock periods have elapsed (rounded up)."""
    return (tick * NS_PER_S + PIT_FREQ - 1) // PIT_FREQ


def _from_bcd(value: int) -> int:
    result = 0
    for shift in (12, 8, 4, 0):
        result = result * 10 + min((value >> shift) & 0xF, 9)
    return result


def _to_bcd(value: int) -> int:
    value %= 10000
    return (value // 1000 << 12) | (value // 100 % 10 << 8) | (value // 10 % 10 << 4) | value % 10


class Pit8254(Device):
    """Three 8254 counters; channel 0 drives IRQ 0, channel 2 is gated by port 0x61."""

    idstr = "i8254"
    vmsd = PIT_VMSD

    count: list[int]
    latched_count: list[int]
    count_latched: list[int]
    latch_flip: list[int]
    status: list[int]
    status_latched: list[int]
    read_flip: list[int]
    write_flip: list[int]
    write_latch: list[int]
    rw_mode: list[int]
    mode: list[int]
    bcd: list[int]
    gate: list[int]
    armed: list[int]
    count_load_time: list[int]
    paused_at: list[int]
    irq_next_time: int
    port61: int

    def __init__(self, native: bool | None = None) -> None:
        super().__init__()
        if native is None:      # read per device, as PYVM_DELIVERY is per vCPU (tests set it)
            native = os.environ.get("PYVM_DELIVERY", "") != "python"
        #: the C twin (pyvm._pit) runs the per-tick path
        self.native = bool(native) and _native is not None
        self.reset()

    # -- Device API -------------------------------------------------------------------
    def ports(self) -> list[tuple[int, int]]:
        return [(0x40, 4), (0x61, 1)]

    def reset(self) -> None:
        super().reset()
        for ch in range(3):
            self.rw_mode[ch] = RW_WORD
            self.gate[ch] = 0 if ch == 2 else 1     # channels 0 and 1 have their gate tied high
            self.paused_at[ch] = -1
        self.irq_next_time = -1

    def io_read(self, port: int, size: int) -> int:
        value = 0
        for i in range(size):
            value |= self._read_byte(port + i) << (8 * i)
        return value

    def io_write(self, port: int, size: int, value: int) -> None:
        for i in range(size):
            self._write_byte(port + i, (value >> (8 * i)) & 0xFF)

    def deadline(self) -> int | None:
        return self.irq_next_time if self.irq_next_time >= 0 else None

    def run_timers(self, now_ns: int) -> None:
        if self.native:
            _native.run_timers(self, now_ns)
            return
        if self.irq_next_time < 0 or now_ns < self.irq_next_time:
            return
        if self.ctx is not None:
            self.ctx.set_irq(PIT_IRQ, True)
            self.ctx.set_irq(PIT_IRQ, False)
        self._run_timers_python_tail(now_ns)

    def _run_timers_python_tail(self, now_ns: int) -> None:
        """After the edge: channel 0's next deadline (the C twin's fallback too)."""
        if self.mode[0] in (2, 3):
            # If the run loop was late by several periods, the edges in between are not
            # replayed: one edge was raised above and the next one is the first period
            # boundary after ``now`` (phase stays locked to the load time).
            n = self.count[0]
            done = ticks_between(self.count_load_time[0], now_ns) // n + 1
            self.irq_next_time = self.count_load_time[0] + tick_to_ns(done * n)
        else:
            self.irq_next_time = -1     # one-shot modes: a single edge at terminal count

    # -- introspection used by tests and the monitor ------------------------------------
    def current_count(self, ch: int, now_ns: int | None = None) -> int:
        """The value a latch command would capture now (16 bits, BCD-coded in BCD mode)."""
        if not self.armed[ch]:
            return self.count[ch] & 0xFFFF
        n = self.count[ch]
        d = self._elapsed_ticks(ch, self._now() if now_ns is None else now_ns)
        mode = self.mode[ch]
        if mode == 2:
            value = n - d % n
        elif mode == 3:
            value = self._square_wave_count(n, d % n)
        else:
            value = n - d
        if self.bcd[ch]:
            return _to_bcd(value % 10000)
        return value & 0xFFFF

    def out(self, ch: int, now_ns: int | None = None) -> int:
        """The OUT pin level of channel ``ch``."""
        mode = self.mode[ch]
        if not self.armed[ch]:
            return 0 if mode == 0 else 1
        n = self.count[ch]
        d = self._elapsed_ticks(ch, self._now() if now_ns is None else now_ns)
        if mode in (0, 1):
            return 1 if d >= n else 0
        if mode == 2:
            return 0 if d % n == n - 1 else 1
        if mode == 3:
            return 1 if d % n < (n + 1) // 2 else 0
        return 0 if d == n else 1      # modes 4 and 5: one low clock at terminal count

    # -- internals ----------------------------------------------------------------------
    def _now(self) -> int:
        assert self.ctx is not None, "device not attached"
        return self.ctx.clock.now_ns()

    def _elapsed_ticks(self, ch: int, now_ns: int) -> int:
        end = self.paused_at[ch] if self.paused_at[ch] >= 0 else now_ns
        return max(0, ticks_between(self.count_load_time[ch], end))

    @staticmethod
    def _square_wave_count(n: int, p: int) -> int:
        """Mode 3 count ``p`` clocks into a period of ``n`` (datasheet, mode 3 odd/even)."""
        if n % 2 == 0:
            return n - 2 * (p % (n // 2))
        high = (n + 1) // 2
        if p < high:                    # load, then -1, then -2 per clock
            return n if p == 0 else n + 1 - 2 * p
        j = p - high                    # reload, then -3, then -2 per clock
        return n if j == 0 else n - 1 - 2 * j

    def _load(self, ch: int, raw: int) -> None:
        if self.bcd[ch]:
            n = _from_bcd(raw) or 10000
        else:
            n = raw or 0x10000
        now = self._now()
        self.count[ch] = n
        self.count_load_time[ch] = now
        self.armed[ch] = 1
        # a channel whose gate is low does not count yet (modes 0, 2, 3, 4) or waits for
        # its trigger (1, 5); either way the gate's rising edge starts it
        self.paused_at[ch] = now if not self.gate[ch] else -1
        if ch == 0:
            self._schedule_irq(now)

    def _schedule_irq(self, now: int) -> None:
        if not self.armed[0] or self.paused_at[0] >= 0:
            self.irq_next_time = -1
            return
        n = self.count[0]
        d = ticks_between(self.count_load_time[0], now)
        if self.mode[0] in (2, 3):
            edge = (d // n + 1) * n
        elif d < n:
            edge = n
        else:
            self.irq_next_time = -1
            return
        self.irq_next_time = self.count_load_time[0] + tick_to_ns(edge)

    def _control_word(self, value: int) -> None:
        ch = value >> 6
        if ch == READ_BACK:
            self._read_back(value)
            return
        rw = (value >> 4) & 3
        if rw == RW_LATCH:
            self._latch_count(ch)
            return
        mode = (value >> 1) & 7
        self.mode[ch] = mode - 4 if mode >= 6 else mode     # modes 6/7 are 2/3
        self.rw_mode[ch] = rw
        self.bcd[ch] = value & 1
        self.read_flip[ch] = 0
        self.write_flip[ch] = 0
        self.count_latched[ch] = 0
        self.status_latched[ch] = 0
        self.armed[ch] = 0          # "null count" until the new count is written
        if ch == 0:
            self.irq_next_time = -1

    def _latch_count(self, ch: int) -> None:
        if not self.count_latched[ch]:
            self.latched_count[ch] = self.current_count(ch)
            self.count_latched[ch] = self.rw_mode[ch]
            self.latch_flip[ch] = 0

    def _read_back(self, value: int) -> None:
        for ch in range(3):
            if not value & (2 << ch):
                continue
            if not value & 0x20:
                self._latch_count(ch)
            if not value & 0x10 and not self.status_latched[ch]:
                self.status[ch] = ((self.out(ch) << 7) | ((0 if self.armed[ch] else 1) << 6)
                                   | (self.rw_mode[ch] << 4) | (self.mode[ch] << 1) | self.bcd[ch])
                self.status_latched[ch] = 1

    def _read_channel(self, ch: int) -> int:
        if self.status_latched[ch]:
            self.status_latched[ch] = 0
            return self.status[ch]
        if self.count_latched[ch]:
            value = self.latched_count[ch]
            rw = self.count_latched[ch]
            if rw == RW_WORD and self.latch_flip[ch] == 0:
                self.latch_flip[ch] = 1
                return value & 0xFF
            self.count_latched[ch] = 0
            return (value >> 8) & 0xFF if rw != RW_LSB else value & 0xFF
        value = self.current_count(ch)
        rw = self.rw_mode[ch]
        if rw == RW_LSB:
            return value & 0xFF
        if rw == RW_MSB:
            return (value >> 8) & 0xFF
        flip = self.read_flip[ch]
        self.read_flip[ch] ^= 1
        return (value >> 8) & 0xFF if flip else value & 0xFF

    def _write_channel(self, ch: int, value: int) -> None:
        rw = self.rw_mode[ch]
        if rw == RW_LSB:
            self._load(ch, value)
        elif rw == RW_MSB:
            self._load(ch, value << 8)
        elif self.write_flip[ch] == 0:
            self.write_latch[ch] = value
            self.write_flip[ch] = 1
        else:
            self.write_flip[ch] = 0
            self._load(ch, self.write_latch[ch] | (value << 8))

    def _set_gate2(self, level: int) -> None:
        old = self.gate[2]
        self.gate[2] = level
        if old == level or not self.armed[2]:
            return
        now = self._now()
        if level:
            if self.mode[2] in (1, 2, 3, 5) or self.paused_at[2] < 0:
                self.count_load_time[2] = now           # trigger: restart the count
            else:
                self.count_load_time[2] += now - self.paused_at[2]   # modes 0/4 resume
            self.paused_at[2] = -1
        elif self.mode[2] in (0, 2, 3, 4):
            self.paused_at[2] = now                     # gate low suspends counting

    def _read_byte(self, port: int) -> int:
        if 0x40 <= port <= 0x42:
            return self._read_channel(port - 0x40)
        if port == 0x61:
            now = self._now()
            refresh = (now // REFRESH_NS) & 1
            return (self.gate[2] | (self.port61 & 0x0E) | (refresh << 4)
                    | (self.out(2, now) << 5))
        return 0xFF         # 0x43 is write-only

    def _write_byte(self, port: int, value: int) -> None:
        if 0x40 <= port <= 0x42:
            self._write_channel(port - 0x40, value)
        elif port == 0x43:
            self._control_word(value)
        elif port == 0x61:
            self.port61 = value & 0x0E
            self._set_gate2(value & 1)
