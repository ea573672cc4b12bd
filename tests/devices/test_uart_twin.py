"""The 16550A's LSR read in C (pyvm/_uart.pyx) against the Python method, its twin:
generated sequences of register writes, reads (through the native port path, which
reads LSR in C and hands everything else to the device), received bytes and timer runs,
on two UARTs; after every step the results, every field of the state table, the RX FIFO,
the IRQ line changes and what the backend got must be equal."""

from __future__ import annotations

from typing import Any, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvm.devices import uart16550
from pyvm.devices.uart16550 import UART_VMSD, Uart16550

pytestmark = pytest.mark.skipif(uart16550._native is None,
                                reason="pyvm._uart not built (or PYVM_PURE_PYTHON)")

BASE = 0x3F8


class Backend:
    def __init__(self) -> None:
        self.output = bytearray()
        self.notices = 0
        self.room: int | None = None        # bytes the host takes now; None: all
        self.wanted = 0

    def write(self, data: bytes) -> None:
        self.output += data

    def write_some(self, data: bytes) -> int:
        taken = len(data) if self.room is None else min(self.room, len(data))
        if self.room is not None:
            self.room -= taken
        self.output += data[:taken]
        return taken

    def want_writable(self) -> None:
        self.wanted += 1

    def set_on_writable(self, fn: Callable[[], None]) -> None:
        pass

    def set_receiver(self, fn: Callable[[bytes], None]) -> None:
        pass

    def set_can_receive(self, fn: Callable[[], int]) -> None:
        pass

    def accept_input(self) -> None:
        self.notices += 1


class Ctx:
    def __init__(self) -> None:
        self.irqs: list[tuple[int, bool]] = []
        self.kicks = 0

    def set_irq(self, line: int, level: bool) -> None:
        self.irqs.append((line, bool(level)))

    def kick(self) -> None:
        self.kicks += 1

    def log(self, topic: str, message: str) -> None:
        pass


OPS = st.one_of(
    st.tuples(st.just("out"), st.integers(0, 7), st.integers(0, 255)),
    st.tuples(st.just("in"), st.integers(0, 7), st.sampled_from([1, 1, 1, 2])),
    st.tuples(st.just("in"), st.just(5), st.just(1)),         # LSR, the native path
    st.tuples(st.just("rx"), st.binary(min_size=1, max_size=20)),
    st.tuples(st.just("timers")),
    # the host end takes N more bytes (None: all), then says it can write
    st.tuples(st.just("room"), st.one_of(st.none(), st.integers(0, 20))),
)


def _uart(native: bool) -> tuple[Uart16550, Ctx, Backend]:
    backend, ctx = Backend(), Ctx()
    u = Uart16550(backend, native=native)  # type: ignore[arg-type]
    u.attach(ctx)  # type: ignore[arg-type]
    u.reset()
    return u, ctx, backend


def _state(u: Uart16550, ctx: Ctx, backend: Backend) -> dict[str, Any]:
    u.pre_save()
    state: dict[str, Any] = {f.name: getattr(u, f.name) for f in UART_VMSD.fields}
    state.update(rx=list(u._rx), irq_level=u._irq_level, stale=u._irq_stale, irqs=list(ctx.irqs),
                 kicks=ctx.kicks, output=bytes(backend.output), notices=backend.notices,
                 tx=list(u._tx), tx_stale=u._tx_stale, wanted=backend.wanted)
    return state


def _step(u: Uart16550, op: tuple[Any, ...]) -> Any:
    paths = u.native_port_io() or (Uart16550.io_read, Uart16550.io_write)
    if op[0] == "out":
        paths[1](u, BASE + op[1], 1, op[2])
    elif op[0] == "in":
        return paths[0](u, BASE + op[1], op[2])
    elif op[0] == "rx":
        u.receive(op[1])
    elif op[0] == "room":
        u.backend.room = op[1]  # type: ignore[union-attr]
        u.writable()
    else:
        u.run_timers(0)
    return None


def test_native_is_used() -> None:
    assert _uart(True)[0].native_port_io() is not None
    assert _uart(False)[0].native_port_io() is None


@settings(max_examples=300, deadline=None)
@given(st.lists(OPS, max_size=60))
def test_lsr_read_matches_the_python_one(ops: list[tuple[Any, ...]]) -> None:
    a, b = _uart(True), _uart(False)
    # receive interrupts on, FIFOs on: the states where an LSR read changes the line
    for op in [("out", 1, 0x0F), ("out", 2, 0xC1)] + ops:
        assert _step(a[0], op) == _step(b[0], op), op
        assert _state(*a) == _state(*b), op


def test_reading_lsr_clears_errors_and_drops_the_line_status_interrupt() -> None:
    """An overrun raises the line status interrupt; the LSR read (in C) reports OE once
    and lowers the line, as the Python read does."""
    for native in (True, False):
        u, ctx, _ = _uart(native)
        read = (u.native_port_io() or (Uart16550.io_read, None))[0]
        u.io_write(BASE + 1, 1, 0x04)       # IER: line status interrupts only
        u.receive(bytes(20))                # more than the 1-byte holding register: overrun
        u.run_timers(0)
        assert ctx.irqs[-1] == (4, True)
        assert read(u, BASE + 5, 1) & 0x02  # OE
        assert not read(u, BASE + 5, 1) & 0x02
        assert ctx.irqs[-1] == (4, False)
