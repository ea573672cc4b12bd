"""save_cpu reads the vCPU in one batch that keeps the interpreter lock: it gives exactly
what the register-by-register path gives (running guests of both widths, random states,
a 32-bit engine in long mode), and no other thread runs while it reads."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvm.config import MachineConfig
from pyvm.cpu import VCpu
from pyvm.cpu_state import CpuState, load_cpu, save_cpu, save_cpu_per_register
from pyvm.guests import guest_path
from pyvm.machine import Machine
from pyvm.ram import RamLayout
from tests.unit.test_cpu_state_roundtrip import _apply, cpu_states


def _both(cpu: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    batch, single = CpuState(cpu), CpuState(cpu)
    save_cpu(cpu, batch, with_tsc=False)
    save_cpu_per_register(cpu, single, with_tsc=False)
    return batch.values(), single.values()


@pytest.mark.parametrize("kernel,append,wide", [
    ("dirty.elf", "start=2 size=4 rate=100 pattern=1", False),
    ("timer-lm.elf", "", True),
], ids=["dirty-32bit", "timer-long-mode-64bit"])
def test_batch_save_equals_register_by_register_on_a_running_guest(
        kernel: str, append: str, wide: bool) -> None:
    m = Machine(MachineConfig(ram_size=32 << 20, kernel=guest_path(kernel), append=append,
                              serial=["null"]))
    m.start()
    try:
        cpu = m.cpus[0]
        assert cpu.wide is wide
        deadline = time.monotonic() + 10
        seen_rips = set()
        while time.monotonic() < deadline and len(seen_rips) < 3:
            batch, single = m.run_on_loop(lambda: _both(cpu), timeout=10)
            assert batch == single
            seen_rips.add(batch["rip"])
        assert batch["cr"][0] & 1                      # the guest left real mode
        tsc = m.run_on_loop(lambda: _tsc(cpu), timeout=10)
        assert tsc[0] <= tsc[1] <= tsc[2]
    finally:
        m.request_exit(0)
        m.close()


def _tsc(cpu: Any) -> tuple[int, int, int]:
    a, b = CpuState(cpu), CpuState(cpu)
    before = cpu.internals.read_tsc()
    save_cpu(cpu, a)
    save_cpu_per_register(cpu, b)
    return before, a.tsc, b.tsc


@pytest.fixture(scope="module")
def engines() -> Iterator[dict[bool, VCpu]]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UC_IGNORE_REG_BREAK", "1")
        yield {w: VCpu(0, RamLayout(), w, lambda p, s: 0, lambda p, s, v: None)
               for w in (False, True)}


@pytest.mark.parametrize("case", ["engine32", "engine64", "engine32-long-mode"])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_batch_save_equals_register_by_register_on_random_states(
        engines: dict[bool, VCpu], case: str, data: st.DataObject) -> None:
    cpu = engines[case == "engine64"]
    state = data.draw(cpu_states(cpu.wide))
    if case == "engine32-long-mode":
        state["mode"] = "long"
        state["cr0"] |= 0x80000011
    _apply(cpu, state)
    batch, single = _both(cpu)
    assert batch == single
    if case == "engine32-long-mode":
        assert batch["efer"] & (1 << 10)               # LMA: the engine does run long mode


def _other_thread_runs(work: Callable[[], None], repeats: int, stop_at: int = 0) -> int:
    """How many times a thread waiting for the interpreter lock got it during ``work``
    (called ``repeats`` times, or until that count reaches ``stop_at``), with the switch
    interval long enough that only ``work`` letting go hands it over."""
    ran = [0]
    stop = threading.Event()
    started = threading.Event()

    def other() -> None:
        started.set()
        while not stop.is_set():
            ran[0] += 1
            time.sleep(0)                    # back to waiting for the lock at once

    old = sys.getswitchinterval()
    t = threading.Thread(target=other, name="lock-waiter")
    t.start()
    started.wait(5)
    sys.setswitchinterval(2.0)
    try:
        count = 0
        for _ in range(repeats):
            time.sleep(0.001)                # let the other thread take its turn now
            before = ran[0]
            work()
            count += ran[0] - before
            if stop_at and count >= stop_at:
                break
        return count
    finally:
        sys.setswitchinterval(old)
        stop.set()
        t.join()


@pytest.mark.parametrize("wide", [False, True], ids=["engine32", "engine64"])
def test_save_cpu_keeps_the_interpreter_lock(engines: dict[bool, VCpu], wide: bool) -> None:
    cpu = engines[wide]
    st_ = CpuState(cpu)
    # The register-by-register path lets go of the lock at every register: the probe sees it.
    # (The waiting thread must wake within one short call to win: up to 500 saves.)
    assert _other_thread_runs(lambda: save_cpu_per_register(cpu, st_), 500, stop_at=1) > 0
    assert _other_thread_runs(lambda: save_cpu(cpu, st_), 50) == 0
    # Loading (its read-back included) keeps it too.
    assert _other_thread_runs(lambda: load_cpu(cpu, st_), 20) == 0


def test_the_first_save_makes_no_unicorn_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """The TSC's scratch engine is made with the vCPU, not at the first save (that was in
    a migration's downtime: 1 to 15 ms)."""
    import unicorn as U

    import pyvm.unicorn_internals as ui

    monkeypatch.setattr(ui, "_CLOCK", None)
    cpu = VCpu(0, RamLayout(), False, lambda p, s: 0, lambda p, s, v: None)
    made: list[Any] = []

    def no_engine(*args: Any) -> Any:
        made.append(args)
        raise AssertionError("a Unicorn engine made during a vCPU save")
    monkeypatch.setattr(U, "Uc", no_engine)
    st_ = CpuState(cpu)
    save_cpu(cpu, st_)
    assert not made and st_.tsc > 0
