"""vCPU throttling (pyvm.cpu_throttle) and the run loop obeying it."""

from __future__ import annotations

import time

from pyvm.cpu_throttle import TIMESLICE_NS, CpuThrottle, clamp, sleep_per_timeslice_ns


def test_sleep_follows_qemus_ratio() -> None:
    # pct / (1 - pct) x 10 ms, + 1 ns (system/cpu-throttle.c)
    assert sleep_per_timeslice_ns(0) == 0
    assert sleep_per_timeslice_ns(20) == 2_500_001
    assert sleep_per_timeslice_ns(50) == 10_000_001
    assert sleep_per_timeslice_ns(99) == 990_000_000   # 989999999.99.. + 1 in doubles, as in QEMU


def test_clamp_is_cpu_throttle_sets_range() -> None:
    assert [clamp(p) for p in (-5, 0, 1, 50, 99, 100, 250)] == [0, 0, 1, 50, 99, 99, 99]


def test_charge_per_whole_timeslice_and_carry() -> None:
    t = CpuThrottle(2)
    assert not t.active
    t.set_percentage(50)
    t.charge(0, 6_000_000, now_ns=1_000)
    assert t.wake_ns(0) == 0                       # less than a time slice run: no sleep yet
    t.charge(0, 6_000_000, now_ns=2_000)           # 12 ms in all: one slice, 2 ms carried
    assert t.wake_ns(0) == 2_000 + 10_000_001
    t.charge(0, 2 * TIMESLICE_NS + 8_000_000, now_ns=5_000)   # 2 + 28 = 30 ms: three slices
    assert t.wake_ns(0) == 5_000 + 3 * 10_000_001
    assert t.slept_ns[0] == 4 * 10_000_001
    assert t.wake_ns(1) == 0


def test_per_vcpu_throttle_and_the_larger_wins() -> None:
    t = CpuThrottle(2)
    t.set_vcpu_percentage(1, 80)
    assert t.active and t.effective(0) == 0 and t.effective(1) == 80
    t.set_percentage(90)
    assert t.effective(0) == 90 and t.effective(1) == 90
    t.set_percentage(0)
    assert t.effective(1) == 80 and t.active
    t.charge(1, TIMESLICE_NS, now_ns=0)
    assert t.wake_ns(1) == sleep_per_timeslice_ns(80)
    t.set_vcpu_percentage(1, 0)
    assert not t.active and t.wake_ns(1) == 0


def _passes(m, seconds: float) -> int:
    before = m.cpu_registers(0)["rax"]
    time.sleep(seconds)
    return (m.cpu_registers(0)["rax"] - before) & 0xFFFFFFFF


def test_a_throttled_guest_makes_that_much_less_progress() -> None:
    """store-loop counts its passes in EAX: at 75 % it makes about a quarter of them,
    the monitor still answers while it sleeps, and removing the throttle restores it."""
    from pyvm.config import MachineConfig
    from pyvm.guests import guest_path
    from pyvm.machine import Machine

    m = Machine(MachineConfig(ram_size=16 << 20, kernel=guest_path("store-loop.elf"),
                              append="start=2 size=1", serial=["null"]))
    try:
        m.start()
        deadline = time.monotonic() + 30
        while m.cpu_registers(0)["rax"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        free = [_passes(m, 1.0)]
        m.set_cpu_throttle(75)
        assert m.cpu_throttle == 75
        t0 = time.monotonic()
        throttled = _passes(m, 2.0) / 2
        assert time.monotonic() - t0 < 2.5              # the monitor was not held up
        m.set_cpu_throttle(0)
        assert m.cpu_throttle == 0
        free.append(_passes(m, 1.0))
        base = sum(free) / 2
        ratio = throttled / base
        # a loaded host makes both figures noisy; what matters is "far less, not stopped"
        assert 0.02 < ratio < 0.5, (free, throttled)
        assert m.throttle.slept_ns[0] > 1_000_000_000
    finally:
        m.request_exit(0)
        m.close()
        m.ram.close()
