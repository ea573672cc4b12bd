"""Native IN/OUT hooks (pyvm/_portio.pyx) against their Python twins (``VCpu._on_in`` /
``_on_out``, selected by ``PYVM_DELIVERY=python``): the same real-mode program on two real
Unicorn engines sees the same bus calls, the same values and the same final registers; an
exception raised by the bus ends the run and comes out of ``emu_start``; ``stop_in_hook``
ends the run at the end of the translation block (as Unicorn's ``uc_emu_stop`` from a
hook does)."""

from __future__ import annotations

from typing import Any

import pytest

from pyvm import native_delivery
from pyvm.cpu import VCpu
from pyvm.ram import MemoryBackend, MemoryBackendConfig, RamBlock, RamLayout

pytestmark = pytest.mark.skipif(native_delivery.IMPLEMENTATION != "cython",
                                reason="native delivery not built (or PYVM_PURE_PYTHON)")

CODE = 0x1000
PROGRAM = bytes.fromhex(
    "baf803"        # mov dx, 0x3f8
    "ec"            # in al, dx
    "88c3"          # mov bl, al
    "ed"            # in ax, dx
    "89c1"          # mov cx, ax
    "66ed"          # in eax, dx
    "6689c6"        # mov esi, eax
    "b05a"          # mov al, 0x5a
    "ee"            # out dx, al
    "eb00"          # jmp $+2 (a stop asked in a hook takes effect at the next block)
    "b83412"        # mov ax, 0x1234
    "ef"            # out dx, ax
    "66b8efbeadde"  # mov eax, 0xdeadbeef
    "66ef"          # out dx, eax
    "e421"          # in al, 0x21
    "e680"          # out 0x80, al
    "f4"            # hlt
)
REGS = ("eax", "ebx", "ecx", "edx", "esi", "eip")


def _value(port: int, size: int) -> int:
    return (0x9ABCDEF0 + port * 3 + size) & ((1 << (8 * size)) - 1)


class Bus:
    def __init__(self, fail_on: int | None = None) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.fail_on = fail_on

    def read(self, port: int, size: int) -> int:
        self.calls.append(("in", port, size))
        if len(self.calls) == self.fail_on:
            raise RuntimeError("bus read failed")
        return _value(port, size)

    def write(self, port: int, size: int, value: int) -> None:
        self.calls.append(("out", port, size, value))
        if len(self.calls) == self.fail_on:
            raise RuntimeError("bus write failed")


def _cpu(monkeypatch: pytest.MonkeyPatch, python: bool, bus: Bus) -> VCpu:
    if python:
        monkeypatch.setenv("PYVM_DELIVERY", "python")
    else:
        monkeypatch.delenv("PYVM_DELIVERY", raising=False)
    ram = RamLayout()
    ram.add(RamBlock("pc.ram", 0, MemoryBackend(
        MemoryBackendConfig("memory-backend-ram", "pc.ram", 1 << 20, implicit=True))))
    cpu = VCpu(0, ram, False, bus.read, bus.write)
    assert (cpu.port_hooks is None) == python
    ram.blocks[0].write(CODE, PROGRAM)
    cpu.enter("real", {"eip": CODE, "esp": 0x8000})
    return cpu


def _run(monkeypatch: pytest.MonkeyPatch, python: bool, fail_on: int | None = None,
         stop_in_hook: bool = False) -> tuple[list[tuple[Any, ...]], dict[str, int], str]:
    bus = Bus(fail_on)
    cpu = _cpu(monkeypatch, python, bus)
    cpu.stop_in_hook = stop_in_hook
    outcome = "returned"
    try:
        cpu.emu_start()
    except RuntimeError as err:
        outcome = str(err)
    finally:
        regs = {r: cpu.get(r) for r in REGS}
        cpu.close()
    return bus.calls, regs, outcome


def test_native_port_hooks_match_the_python_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    native = _run(monkeypatch, False)
    python = _run(monkeypatch, True)
    assert native == python
    calls, regs, outcome = native
    assert outcome == "returned" and regs["eip"] == CODE + len(PROGRAM)   # stopped after HLT
    assert calls == [("in", 0x3F8, 1), ("in", 0x3F8, 2), ("in", 0x3F8, 4),
                     ("out", 0x3F8, 1, 0x5A), ("out", 0x3F8, 2, 0x1234),
                     ("out", 0x3F8, 4, 0xDEADBEEF), ("in", 0x21, 1), ("out", 0x80, 1, _value(0x21, 1))]
    assert regs["ebx"] & 0xFF == _value(0x3F8, 1)
    assert regs["ecx"] & 0xFFFF == _value(0x3F8, 2)
    assert regs["esi"] == _value(0x3F8, 4)


@pytest.mark.parametrize("fail_on", [1, 4, 8])
def test_a_failing_bus_call_ends_the_run_and_is_raised(monkeypatch: pytest.MonkeyPatch,
                                                       fail_on: int) -> None:
    native = _run(monkeypatch, False, fail_on)
    python = _run(monkeypatch, True, fail_on)
    assert native == python
    calls, regs, outcome = native
    # like a stop request, the stop takes effect at the end of the translation block
    assert outcome == ("bus read failed" if calls[fail_on - 1][0] == "in" else "bus write failed")
    assert regs["eip"] == CODE + PROGRAM.index(bytes.fromhex("b83412") if fail_on < 5 else b"\xf4") + (
        1 if fail_on >= 5 else 0)


def test_stop_in_hook_ends_the_run_after_an_out(monkeypatch: pytest.MonkeyPatch) -> None:
    native = _run(monkeypatch, False, stop_in_hook=True)
    python = _run(monkeypatch, True, stop_in_hook=True)
    assert native == python
    calls, regs, outcome = native
    assert outcome == "returned" and calls[-1] == ("out", 0x3F8, 1, 0x5A)
    assert regs["eip"] == CODE + PROGRAM.index(bytes.fromhex("b83412"))


class Dev:
    """A device with a "native" port path: records what the hooks call directly."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    @staticmethod
    def read(dev: "Dev", port: int, size: int) -> int:
        dev.calls.append(("in", port, size))
        return 0x1FF00 | port      # wider than the access: the hook masks as the bus does

    @staticmethod
    def write(dev: "Dev", port: int, size: int, value: int) -> None:
        dev.calls.append(("out", port, size, value))


@pytest.mark.parametrize("logged", [False, True])
def test_direct_ports_skip_the_bus_unless_ioport_is_logged(monkeypatch: pytest.MonkeyPatch,
                                                           logged: bool) -> None:
    """Ports routed to a device's native path (PortHooks.direct, as the 8259A's are)
    are called without the bus, with the bus's masking; with ``-d ioport`` on, the bus
    (which logs) gets them as before."""
    bus, dev = Bus(), Dev()
    cpu = _cpu(monkeypatch, False, bus)
    assert cpu.port_hooks is not None
    log_enabled = {"ioport"} if logged else set()
    cpu.port_hooks.direct(0x20, 2, dev, Dev.read, Dev.write, log_enabled)
    try:
        cpu.emu_start()
        regs = {r: cpu.get(r) for r in REGS}
    finally:
        cpu.close()
    assert regs["eip"] == CODE + len(PROGRAM)
    serial = [("in", 0x3F8, 1), ("in", 0x3F8, 2), ("in", 0x3F8, 4), ("out", 0x3F8, 1, 0x5A),
              ("out", 0x3F8, 2, 0x1234), ("out", 0x3F8, 4, 0xDEADBEEF)]
    if logged:
        assert dev.calls == []
        assert bus.calls == serial + [("in", 0x21, 1), ("out", 0x80, 1, _value(0x21, 1))]
    else:
        assert dev.calls == [("in", 0x21, 1)]
        assert bus.calls == serial + [("out", 0x80, 1, 0x21)]     # 0x1FF21 masked to a byte
