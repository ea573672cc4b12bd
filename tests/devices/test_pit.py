"""8254 PIT: counter values at given virtual times, IRQ 0 deadlines, access modes, save/load."""

from __future__ import annotations

import pytest

from pyvm.devices.pit8254 import PIT_FREQ, PIT_VMSD, Pit8254, tick_to_ns, ticks_between


@pytest.fixture
def pit(ctx) -> Pit8254:
    p = Pit8254()
    p.attach(ctx)
    p.reset()
    return p


def load(pit: Pit8254, ch: int, mode: int, count: int, bcd: int = 0) -> None:
    pit.io_write(0x43, 1, (ch << 6) | 0x30 | (mode << 1) | bcd)
    pit.io_write(0x40 + ch, 1, count & 0xFF)
    pit.io_write(0x40 + ch, 1, (count >> 8) & 0xFF)


def latch_read(pit: Pit8254, ch: int) -> int:
    pit.io_write(0x43, 1, ch << 6)      # counter latch command
    lo = pit.io_read(0x40 + ch, 1)
    hi = pit.io_read(0x40 + ch, 1)
    return lo | (hi << 8)


def at_tick(ctx, start: int, tick: int) -> None:
    ctx.clock.ns = start + tick_to_ns(tick)


def test_tick_conversion_round_trips():
    assert tick_to_ns(0) == 0
    for tick in (1, 2, 1193, 1193182, 10**9):
        assert ticks_between(0, tick_to_ns(tick)) == tick
        assert ticks_between(0, tick_to_ns(tick) - 1) == tick - 1


def test_nothing_counts_or_interrupts_after_reset(pit):
    assert pit.deadline() is None


def test_mode2_periodic_irq0_edges(pit, ctx):
    ctx.clock.ns = 5_000
    load(pit, 0, 2, 1193)
    first = 5_000 + tick_to_ns(1193)
    assert pit.deadline() == first
    ctx.clock.ns = first - 1
    pit.run_timers(first - 1)
    assert ctx.irq_events == []
    ctx.clock.ns = first
    pit.run_timers(first)
    assert ctx.irq_events == [(0, True), (0, False)]
    assert pit.deadline() == 5_000 + tick_to_ns(2 * 1193)


def test_missed_periods_give_one_edge_and_keep_phase(pit, ctx):
    load(pit, 0, 3, 1000)
    late = tick_to_ns(10_500)            # 10.5 periods later
    ctx.clock.ns = late
    pit.run_timers(late)
    assert ctx.rising_edges(0) == 1
    assert pit.deadline() == tick_to_ns(11_000)


def test_mode0_single_edge_at_terminal_count(pit, ctx):
    load(pit, 0, 0, 500)
    assert pit.out(0) == 0
    when = pit.deadline()
    assert when == tick_to_ns(500)
    ctx.clock.ns = when
    assert pit.out(0) == 1
    pit.run_timers(when)
    assert ctx.rising_edges(0) == 1
    assert pit.deadline() is None


@pytest.mark.parametrize("tick,expected", [(0, 1000), (1, 999), (250, 750), (999, 1), (1000, 0),
                                           (1001, 0xFFFF)])
def test_mode0_count_values(pit, ctx, tick, expected):
    load(pit, 0, 0, 1000)
    at_tick(ctx, 0, tick)
    assert latch_read(pit, 0) == expected


@pytest.mark.parametrize("tick,expected", [(0, 100), (1, 99), (99, 1), (100, 100), (150, 50)])
def test_mode2_count_values(pit, ctx, tick, expected):
    load(pit, 1, 2, 100)
    at_tick(ctx, 0, tick)
    assert latch_read(pit, 1) == expected


@pytest.mark.parametrize("tick,expected", [(0, 1000), (100, 800), (499, 2), (500, 1000),
                                           (600, 800), (1000, 1000)])
def test_mode3_even_count_values(pit, ctx, tick, expected):
    load(pit, 2, 3, 1000)
    pit.io_write(0x61, 1, 0x01)         # channel 2 gate high
    ctx.clock.ns = 0                    # gate opened at time 0 (restart)
    at_tick(ctx, 0, tick)
    assert latch_read(pit, 2) == expected


def test_mode3_odd_count_sequence_and_duty_cycle(pit, ctx):
    # 82C54 mode 3, N=5: load, -1, -2, reload (OUT low), -3, reload (OUT high)
    load(pit, 0, 3, 5)
    counts, outs = [], []
    for tick in range(10):
        at_tick(ctx, 0, tick)
        counts.append(latch_read(pit, 0))
        outs.append(pit.out(0))
    assert counts == [5, 4, 2, 5, 2] * 2
    assert outs == [1, 1, 1, 0, 0] * 2


def test_mode2_out_pulses_low_one_clock(pit, ctx):
    load(pit, 0, 2, 4)
    outs = []
    for tick in range(8):
        at_tick(ctx, 0, tick)
        outs.append(pit.out(0))
    assert outs == [1, 1, 1, 0, 1, 1, 1, 0]


def test_latch_freezes_value_until_read(pit, ctx):
    load(pit, 0, 2, 0x1234)
    at_tick(ctx, 0, 0x34)
    pit.io_write(0x43, 1, 0x00)
    at_tick(ctx, 0, 0x200)              # time moves on; the latch does not
    assert pit.io_read(0x40, 1) == 0x00
    assert pit.io_read(0x40, 1) == 0x12
    # latch consumed: the next reads are live again
    assert pit.io_read(0x40, 1) | (pit.io_read(0x40, 1) << 8) == 0x1234 - 0x200


def test_lsb_only_and_msb_only_access(pit, ctx):
    pit.io_write(0x43, 1, 0x54)         # ch1, LSB only, mode 2
    pit.io_write(0x41, 1, 0x80)
    at_tick(ctx, 0, 0x10)
    assert pit.io_read(0x41, 1) == 0x70
    pit.io_write(0x43, 1, 0x64)         # ch1, MSB only, mode 2
    ctx.clock.ns = 0
    pit.io_write(0x41, 1, 0x10)         # count 0x1000
    at_tick(ctx, 0, 0x100)
    assert pit.io_read(0x41, 1) == 0x0F


def test_count_zero_means_65536(pit, ctx):
    load(pit, 0, 2, 0)
    assert pit.deadline() == tick_to_ns(65536)
    at_tick(ctx, 0, 1)
    assert latch_read(pit, 0) == 0xFFFF


def test_read_back_status_and_null_count(pit, ctx):
    pit.io_write(0x43, 1, 0x34)         # ch0, lohi, mode 2, binary
    pit.io_write(0x43, 1, 0xE2)         # read-back status of ch0
    assert pit.io_read(0x40, 1) == 0x80 | 0x40 | 0x30 | 0x04   # OUT high, null count
    pit.io_write(0x40, 1, 0x00)
    pit.io_write(0x40, 1, 0x10)
    at_tick(ctx, 0, 0x0100)
    pit.io_write(0x43, 1, 0xC2)         # read-back count and status of ch0
    assert pit.io_read(0x40, 1) == 0x80 | 0x30 | 0x04          # status first, count loaded
    assert pit.io_read(0x40, 1) == 0x00
    assert pit.io_read(0x40, 1) == 0x0F


def test_bcd_counting(pit, ctx):
    load(pit, 0, 2, 0x1000, bcd=1)      # 1000 decimal
    assert pit.deadline() == tick_to_ns(1000)
    at_tick(ctx, 0, 1)
    assert latch_read(pit, 0) == 0x0999


def test_port61_gate_and_out2_for_calibration(pit, ctx):
    pit.io_write(0x61, 1, 0x01)         # gate 2 on, speaker off
    load(pit, 2, 0, 1000)
    assert pit.io_read(0x61, 1) & 0x21 == 0x01
    at_tick(ctx, 0, 1000)
    assert pit.io_read(0x61, 1) & 0x21 == 0x21


def test_gate_low_holds_mode0_count(pit, ctx):
    load(pit, 2, 0, 1000)               # gate is low after reset: not counting
    at_tick(ctx, 0, 300)
    assert latch_read(pit, 2) == 1000
    pit.io_write(0x61, 1, 0x01)         # counting starts now
    at_tick(ctx, 0, 400)
    assert latch_read(pit, 2) == 900


def test_port61_refresh_bit_toggles(pit, ctx):
    seen = set()
    for ns in range(0, 60_000, 5_000):
        ctx.clock.ns = ns
        seen.add(pit.io_read(0x61, 1) & 0x10)
    assert seen == {0, 0x10}


def test_control_word_stops_irq0_until_count_written(pit, ctx):
    load(pit, 0, 2, 100)
    assert pit.deadline() is not None
    pit.io_write(0x43, 1, 0x34)
    assert pit.deadline() is None


def test_save_and_load_resume_counting(pit, ctx, vmsd_fits, migrate):
    ctx.clock.ns = 1_000_000
    load(pit, 0, 2, 11932)              # ~100 Hz
    pit.io_write(0x43, 1, 0x00)         # a latch in progress is saved too
    pit.io_read(0x40, 1)
    pit.pre_save()
    vmsd_fits(pit, PIT_VMSD)
    other = Pit8254()
    other.attach(ctx)
    other.reset()
    migrate(pit, other)
    assert other.deadline() == pit.deadline()
    assert other.io_read(0x40, 1) == 11932 >> 8     # second byte of the latched count
    pit.io_read(0x40, 1)
    ctx.clock.ns += tick_to_ns(5000)
    assert latch_read(other, 0) == latch_read(pit, 0) == 11932 - 5000


def test_pit_frequency_constant():
    assert PIT_FREQ == 1_193_182
