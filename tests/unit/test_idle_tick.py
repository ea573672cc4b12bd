"""The native idle tick (pyvm/_idle.pyx, ``Machine._idle_native``) on the ``hello`` guest:
its timer ticks are handled without the Python loop's slices, and work from another
thread (what a monitor command, serial input or a migration send through ``kick``)
still wakes its wait at once, even when no deadline is near.  On ``timer-pm``, both idle
paths deliver the PIT's interrupts after the edges that raise them."""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any, Iterator

import pytest

from pyvm import native_idle
from pyvm.config import MachineConfig
from pyvm.guests import guest_path
from pyvm.machine import Machine

pytestmark = pytest.mark.skipif(native_idle.IMPLEMENTATION != "cython",
                                reason="pyvm._idle not built (or PYVM_PURE_PYTHON)")


def _wait_for(cond: Any, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


@pytest.fixture
def hello(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Machine, list[int]]]:
    monkeypatch.delenv("PYVM_DELIVERY", raising=False)
    monkeypatch.delenv("PYVM_IDLE", raising=False)
    slices = [0]
    run_slice = Machine._run_slice

    def counting(m: Machine, *args: Any) -> None:
        slices[0] += 1
        run_slice(m, *args)

    monkeypatch.setattr(Machine, "_run_slice", counting)
    m = Machine(MachineConfig(ram_size=32 << 20, kernel=guest_path("hello.elf"),
                              append="hz=100", serial=["null"]))
    m.start()
    try:
        yield m, slices
    finally:
        m.request_exit(0)
        m.close()


def test_timer_ticks_are_handled_natively(hello: tuple[Machine, list[int]]) -> None:
    m, slices = hello
    _wait_for(lambda: m._idle_ticker is not None and m._idle_ticker.ticks >= 50)
    ticks0, slices0 = m._idle_ticker.ticks, slices[0]
    _wait_for(lambda: m._idle_ticker.ticks >= ticks0 + 50)
    ticks = m._idle_ticker.ticks - ticks0
    # every tick natively; the Python loop ran only the odd slice (a kick, the main
    # thread's work), not one per tick
    assert slices[0] - slices0 < ticks // 2, (slices[0] - slices0, ticks)
    # not stuck halted with IF=0; read on the loop, between runs (from this thread a read
    # can land inside the handler, where IF=0 is normal)
    cpu = m.cpus[0]
    assert not m.run_on_loop(lambda: cpu.halted and not cpu.interrupts_enabled(), timeout=10)


def test_work_from_another_thread_wakes_the_idle_wait(hello: tuple[Machine, list[int]]) -> None:
    m, _ = hello
    _wait_for(lambda: m._idle_ticker is not None and m._idle_ticker.ticks >= 5)

    def stop_the_timer() -> None:
        m.pit.irq_next_time = -1        # no deadline left: the wait is 0.5 s at a time

    m.run_on_loop(stop_the_timer, timeout=10)
    ticks = m._idle_ticker.ticks
    time.sleep(0.05)
    latencies = []
    for _ in range(7):
        t0 = time.monotonic()
        m.run_on_loop(lambda: None, timeout=10)
        latencies.append(time.monotonic() - t0)
        time.sleep(0.02)
    assert m._idle_ticker.ticks == ticks         # no tick ran: the loop was in its wait
    # a missed wake-up would leave each call waiting out the rest of a 0.5 s wait
    assert statistics.median(latencies) < 0.2, latencies


def test_exit_ends_the_idle_wait(hello: tuple[Machine, list[int]]) -> None:
    m, _ = hello
    _wait_for(lambda: m._idle_ticker is not None and m._idle_ticker.ticks >= 5)
    m.run_on_loop(lambda: setattr(m.pit, "irq_next_time", -1), timeout=10)
    done = threading.Event()

    def waiter() -> None:
        m.wait()
        done.set()

    threading.Thread(target=waiter, daemon=True).start()
    t0 = time.monotonic()
    m.request_exit(0)
    assert done.wait(10)
    assert m._loop_thread is not None
    m._loop_thread.join(5)
    assert not m._loop_thread.is_alive()
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("idle", ["python", "native"])
def test_timer_interrupts_arrive_on_the_pit_period(monkeypatch: pytest.MonkeyPatch,
                                                   idle: str) -> None:
    """Both idle paths deliver IRQ 0 at the same virtual times relative to the PIT: the
    PIT's next deadline at each delivery is a period boundary, and the delivery comes
    after the boundary before it, the edge that raised it (timer-pm: 50 ticks, then it
    exits).  How late a delivery may come is left out: a loaded machine decides that."""
    from pyvm.config import DebugExitConfig
    from pyvm.cpu import VCpu
    from pyvm.devices.pit8254 import tick_to_ns, ticks_between

    monkeypatch.delenv("PYVM_DELIVERY", raising=False)
    if idle == "python":
        monkeypatch.setenv("PYVM_IDLE", "python")
    else:
        monkeypatch.delenv("PYVM_IDLE", raising=False)
    m = Machine(MachineConfig(ram_size=16 << 20, kernel=guest_path("timer-pm.elf"),
                              serial=["null"], debug_exit=[DebugExitConfig(0xF4, 4)]))
    seen: list[tuple[int, int, int, int]] = []
    deliver = VCpu.deliver

    def recording(cpu: VCpu, vector: int, error_code: int | None = None) -> None:
        pit = m.pit
        seen.append((vector, m.clock.now_ns(), pit.irq_next_time, pit.count_load_time[0]))
        deliver(cpu, vector, error_code)

    monkeypatch.setattr(VCpu, "deliver", recording)
    m.start()
    try:
        assert m.wait() == 0x21
    finally:
        m.close()
    assert (m._idle_ticker is not None and m._idle_ticker.ticks >= 40) == (idle == "native")
    ticks = [s for s in seen if s[0] == 0x20]
    assert len(ticks) >= 50
    n = m.pit.count[0]
    for _, now, next_deadline, load in ticks:
        j = ticks_between(load, next_deadline) // n
        periods = [k for k in (j, j + 1) if load + tick_to_ns(k * n) == next_deadline]
        assert periods, (next_deadline, load, n)        # the deadline is a period boundary
        fired = load + tick_to_ns((periods[0] - 1) * n)
        assert fired <= now, (fired, now)               # never before the edge that raised it
