"""Regression: a kick that ended a slice inside an interrupt handler (IF=0) was taken for
HLT; the vCPU was marked halted with interrupts off and the run loop spun at 100% CPU
with an IRQ pending that it could never deliver.

Left to chance that kick almost never lands inside timer-pm's three-instruction handler
(none in hundreds of slices), so the test makes it land there: every timer interrupt
delivered is followed by a stop request, which ends the next slice at its first block boundary,
inside the handler (as Machine.kick from another thread would).  It then checks that this happened for every tick before it checks
that the guest still finishes.  Both idle paths: the Python loop's, and the native idle
tick (pyvm/_idle.pyx), whose handler runs end the same way."""

from __future__ import annotations

import threading

import pytest

from pyvm.config import DebugExitConfig, MachineConfig
from pyvm.cpu import VCpu
from pyvm.guests import guest_path
from pyvm.machine import Machine

TIMER_VECTOR = 0x20          # timer-pm maps the master PIC to 0x20
TICKS = 50                   # timer-pm exits after 50 ticks (firmware/timer-pm.s)


@pytest.mark.parametrize("idle", ["python", "native"])
def test_timer_guest_finishes_when_kicks_end_slices_inside_its_handler(monkeypatch, idle) -> None:
    cfg = MachineConfig(ram_size=16 << 20, kernel=guest_path("timer-pm.elf"), serial=["null"],
                        debug_exit=[DebugExitConfig(0xF4, 4)])
    m = Machine(cfg)
    ended_with_if_off = [0]
    armed = [False]
    deliver, clear_stop, run_slice = VCpu.deliver, VCpu.clear_stop, Machine._run_slice
    idle_native = Machine._idle_native

    timer_deliveries = [0]

    def deliver_and_arm(cpu: VCpu, vector: int, error_code: int | None = None) -> None:
        deliver(cpu, vector, error_code)
        armed[0] = vector == TIMER_VECTOR
        timer_deliveries[0] += armed[0]

    def clear_then_kick(cpu: VCpu) -> None:
        # the slice that starts the handler: another thread's kick arrives as it begins
        # (what Machine.kick does to a running vCPU)
        clear_stop(cpu)
        if armed[0]:
            armed[0] = False
            cpu.request_stop()

    def counting_slice(machine: Machine, cpu: VCpu, slice_s: float, deadline: int | None) -> None:
        stops = cpu.stopper.stops
        run_slice(machine, cpu, slice_s, deadline)
        if cpu.stopper.stops != stops and not cpu.interrupts_enabled():
            ended_with_if_off[0] += 1

    def counting_idle(machine: Machine) -> bool:
        cpu = machine.cpus[0]
        stops = cpu.stopper.stops
        used = idle_native(machine)
        if cpu.stopper.stops != stops and not cpu.halted and not cpu.interrupts_enabled():
            ended_with_if_off[0] += 1
        return used

    if idle == "python":
        monkeypatch.setattr(Machine, "_idle_native", lambda machine: False)
    else:
        if m.cpus[0].native_delivery is None:
            pytest.skip("the native idle tick is not built")
        monkeypatch.setattr(Machine, "_idle_native", counting_idle)
    monkeypatch.setattr(VCpu, "deliver", deliver_and_arm)
    monkeypatch.setattr(VCpu, "clear_stop", clear_then_kick)
    monkeypatch.setattr(Machine, "_run_slice", counting_slice)
    status: list[int] = []
    waiter = threading.Thread(target=lambda: status.append(m.wait()))
    m.start()
    waiter.start()
    try:
        waiter.join(60)
        assert ended_with_if_off[0] >= 1, "no slice ended inside the handler"
        assert not waiter.is_alive(), "timer-pm did not finish: a vCPU stuck with IF=0?"
        assert status == [0x21]
        assert ended_with_if_off[0] >= TICKS, ended_with_if_off     # once per tick
        assert timer_deliveries[0] >= TICKS, timer_deliveries
        if idle == "native":
            # The ticks went through the native idle tick, each delivered once.  Every
            # handler here is kicked and finished by the Python loop; a tick whose
            # deadline passes meanwhile (a loaded machine) is fired by that loop, so
            # the split between the two paths depends on load (CI once saw 48 of 50
            # natively).  The native share on an unkicked guest is test_idle_tick's.
            assert m._idle_ticker is not None
            assert 0 < m._idle_ticker.ticks <= timer_deliveries[0], (
                m._idle_ticker.ticks, timer_deliveries)
    finally:
        m.request_exit(0)
        waiter.join(10)
        m.close()

