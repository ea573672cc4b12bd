"""16550A UART: registers, divisor latch, FIFO and trigger levels, interrupt priorities,
loopback, receive from another thread, save/load."""

from __future__ import annotations

import threading
from typing import Callable

import pytest

from pyvm.devices.uart16550 import UART_VMSD, Uart16550

BASE = 0x3F8
THR, IER, IIR, FCR, LCR, MCR, LSR, MSR, SCR = BASE, BASE + 1, BASE + 2, BASE + 2, BASE + 3, \
    BASE + 4, BASE + 5, BASE + 6, BASE + 7


class RecordingBackend:
    """The part of CharBackend the UART uses."""

    def __init__(self) -> None:
        self.output = bytearray()
        self.receiver: Callable[[bytes], None] | None = None
        self.can_receive: Callable[[], int] | None = None
        self.room_notices = 0
        self.closed = False
        self.room: int | None = None        # bytes the host takes now; None: all
        self.on_writable: Callable[[], None] | None = None
        self.writable_wanted = 0

    def write(self, data: bytes) -> None:
        self.output += data

    def write_some(self, data: bytes) -> int:
        taken = len(data) if self.room is None else min(self.room, len(data))
        if self.room is not None:
            self.room -= taken
        self.output += data[:taken]
        return taken

    def want_writable(self) -> None:
        self.writable_wanted += 1

    def set_on_writable(self, fn: Callable[[], None]) -> None:
        self.on_writable = fn

    def set_receiver(self, fn: Callable[[bytes], None]) -> None:
        self.receiver = fn

    def set_can_receive(self, fn: Callable[[], int]) -> None:
        self.can_receive = fn

    def accept_input(self) -> None:
        self.room_notices += 1

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def backend() -> RecordingBackend:
    return RecordingBackend()


@pytest.fixture
def uart(ctx, backend) -> Uart16550:
    u = Uart16550(backend)  # type: ignore[arg-type]
    u.attach(ctx)
    u.reset()
    return u


def deliver(uart: Uart16550, data: bytes, ctx) -> None:
    """Bytes arrive from the backend, then the run loop services the UART's deadline."""
    uart.receive(data)
    assert uart.deadline() == 0
    uart.run_timers(ctx.clock.now_ns())
    assert uart.deadline() is None


def test_reset_values(uart):
    assert uart.io_read(LSR, 1) == 0x60
    assert uart.io_read(IIR, 1) == 0x01
    assert uart.io_read(MSR, 1) == 0xB0
    assert uart.io_read(IER, 1) == 0x00
    assert uart.io_read(MCR, 1) == 0x00


def test_backend_is_wired_by_constructor(uart, backend):
    assert backend.receiver == uart.receive
    assert backend.can_receive == uart.can_receive


def test_divisor_latch(uart):
    uart.io_write(LCR, 1, 0x83)
    uart.io_write(BASE, 1, 0x01)
    uart.io_write(BASE + 1, 1, 0x00)
    assert uart.io_read(BASE, 1) == 0x01
    assert uart.io_read(BASE + 1, 1) == 0x00
    uart.io_write(BASE, 2, 0x0203)      # 16-bit write: DLL then DLM
    assert uart.divider == 0x0203
    uart.io_write(LCR, 1, 0x03)
    assert uart.io_read(LCR, 1) == 0x03
    uart.io_write(IER, 1, 0x01)         # DLAB off: port 1 is IER again
    assert uart.io_read(IER, 1) == 0x01
    assert uart.divider == 0x0203


def test_transmit_is_immediate_and_thr_stays_empty(uart, backend):
    for ch in b"hi\n":
        uart.io_write(THR, 1, ch)
        assert uart.io_read(LSR, 1) & 0x60 == 0x60
    assert bytes(backend.output) == b"hi\n"


def test_thre_interrupt_cycle(uart, ctx):
    uart.io_write(IER, 1, 0x02)         # enabling THRE with THR empty raises it
    assert ctx.levels[4] is True
    assert uart.io_read(IIR, 1) == 0x02
    assert ctx.levels[4] is False       # reading IIR cleared the THRE source
    assert uart.io_read(IIR, 1) == 0x01
    events = len(ctx.irq_events)
    uart.io_write(THR, 1, ord("x"))     # THR empties again at once: a fresh rising edge
    assert ctx.irq_events[events:] == [(4, True)]


def test_receive_without_fifo(uart, ctx):
    uart.io_write(IER, 1, 0x01)
    deliver(uart, b"a", ctx)
    assert ctx.levels[4] is True
    assert uart.io_read(IIR, 1) == 0x04
    assert uart.io_read(LSR, 1) & 0x01
    assert uart.io_read(BASE, 1) == ord("a")
    assert uart.io_read(LSR, 1) & 0x01 == 0
    assert ctx.levels[4] is False


def test_holding_register_overrun(uart, ctx):
    assert uart.can_receive() == 1
    deliver(uart, b"ab", ctx)
    assert uart.io_read(LSR, 1) & 0x03 == 0x03      # DR and OE
    assert uart.io_read(LSR, 1) & 0x02 == 0         # OE clears on read
    assert uart.io_read(BASE, 1) == ord("b")        # the newer character overwrote


def test_fifo_trigger_level_timeout_and_overrun(uart, ctx):
    uart.io_write(FCR, 1, 0xC7)         # enable, clear both, trigger 14
    uart.io_write(IER, 1, 0x05)         # RDI and RLSI
    assert uart.can_receive() == 16
    deliver(uart, bytes(range(10)), ctx)
    assert uart.io_read(IIR, 1) == 0xCC             # below trigger: timeout indication
    deliver(uart, bytes(range(10, 14)), ctx)
    assert uart.io_read(IIR, 1) == 0xC4             # at trigger: data available
    assert uart.can_receive() == 2
    deliver(uart, bytes(range(14, 20)), ctx)        # 16 fit, 4 are lost
    assert uart.io_read(IIR, 1) == 0xC6             # line status beats data
    assert uart.io_read(LSR, 1) & 0x03 == 0x03
    assert uart.io_read(IIR, 1) == 0xC4
    got = bytes(uart.io_read(BASE, 1) for _ in range(16))
    assert got == bytes(range(16))
    assert uart.io_read(LSR, 1) & 0x01 == 0
    assert uart.io_read(IIR, 1) == 0xC1
    assert ctx.levels[4] is False


@pytest.mark.parametrize("fcr,level", [(0x01, 1), (0x41, 4), (0x81, 8), (0xC1, 14)])
def test_trigger_levels(uart, ctx, fcr, level):
    uart.io_write(FCR, 1, fcr)
    uart.io_write(IER, 1, 0x01)
    if level > 1:
        deliver(uart, bytes(level - 1), ctx)
        assert uart.io_read(IIR, 1) == 0xCC
    deliver(uart, b"\0", ctx)
    assert uart.io_read(IIR, 1) == 0xC4


def test_fcr_clears_rx_fifo(uart, ctx):
    uart.io_write(FCR, 1, 0x01)
    deliver(uart, b"abc", ctx)
    uart.io_write(FCR, 1, 0x03)
    assert uart.io_read(LSR, 1) & 0x01 == 0
    assert uart.can_receive() == 16


def test_disabling_fifo_keeps_one_byte(uart, ctx):
    uart.io_write(FCR, 1, 0x01)
    deliver(uart, b"abc", ctx)
    uart.io_write(FCR, 1, 0x00)         # toggling FIFO mode clears the FIFOs
    assert uart.io_read(LSR, 1) & 0x01 == 0
    assert uart.can_receive() == 1


def test_loopback(uart, backend, ctx):
    uart.io_write(IER, 1, 0x09)         # RDI and modem status
    uart.io_write(MCR, 1, 0x1F)         # loop + DTR RTS OUT1 OUT2
    msr = uart.io_read(MSR, 1)
    assert msr & 0xF0 == 0xF0 and msr & 0x04 == 0   # RI rose: no trailing edge
    assert uart.io_read(MSR, 1) & 0x0F == 0         # deltas clear on read
    assert uart.can_receive() == 0
    uart.io_write(THR, 1, ord("L"))
    assert backend.output == b""
    assert uart.io_read(IIR, 1) == 0x04
    assert uart.io_read(BASE, 1) == ord("L")
    uart.io_write(MCR, 1, 0x10)         # drop RI (OUT1): trailing edge
    assert uart.io_read(IIR, 1) == 0x00             # modem status interrupt
    assert uart.io_read(MSR, 1) & 0x0F == 0x0F
    uart.receive(b"ignored in loopback")
    assert uart.io_read(LSR, 1) & 0x01 == 0


def test_scratch_register(uart):
    uart.io_write(SCR, 1, 0x5A)
    assert uart.io_read(SCR, 1) == 0x5A


def test_reading_rbr_tells_backend_there_is_room(uart, backend, ctx):
    deliver(uart, b"z", ctx)
    uart.io_read(BASE, 1)
    assert backend.room_notices == 1


def test_receive_from_other_thread_kicks_and_defers_irq(uart, ctx):
    uart.io_write(FCR, 1, 0x01)
    uart.io_write(IER, 1, 0x01)
    thread = threading.Thread(target=uart.receive, args=(b"xyz",))
    thread.start()
    thread.join()
    assert ctx.kicks == 1
    assert 4 not in ctx.levels          # no IRQ from the foreign thread
    assert uart.deadline() == 0
    uart.run_timers(0)
    assert ctx.levels[4] is True


def test_concurrent_receive_and_guest_reads_lose_nothing(uart, ctx):
    uart.io_write(FCR, 1, 0x01)
    payload = bytes(i % 251 for i in range(2000))

    def feed() -> None:
        for i in range(0, len(payload), 7):
            chunk = payload[i:i + 7]
            while uart.can_receive() < len(chunk):
                pass
            uart.receive(chunk)

    thread = threading.Thread(target=feed)
    thread.start()
    got = bytearray()
    while len(got) < len(payload):
        if uart.io_read(LSR, 1) & 0x01:
            got.append(uart.io_read(BASE, 1))
    thread.join()
    assert bytes(got) == payload
    assert uart.io_read(LSR, 1) & 0x02 == 0


def test_save_and_load_keep_fifo_and_registers(uart, ctx, backend, vmsd_fits, migrate):
    uart.io_write(LCR, 1, 0x80)
    uart.io_write(BASE, 1, 0x03)
    uart.io_write(LCR, 1, 0x03)
    uart.io_write(FCR, 1, 0x81)
    uart.io_write(IER, 1, 0x01)
    uart.io_write(SCR, 1, 0x77)
    deliver(uart, b"migrate", ctx)
    assert uart.io_read(BASE, 1) == ord("m")
    uart.pre_save()
    vmsd_fits(uart, UART_VMSD)
    assert uart.rx_count == 6
    other = Uart16550(RecordingBackend())  # type: ignore[arg-type]
    other.attach(ctx)
    other.reset()
    migrate(uart, other)
    assert other.rx_count == 6
    assert other.io_read(IIR, 1) == 0xCC
    assert bytes(other.io_read(BASE, 1) for _ in range(6)) == b"igrate"
    assert other.io_read(SCR, 1) == 0x77
    other.io_write(LCR, 1, 0x83)
    assert other.io_read(BASE, 1) == 0x03


def test_close_closes_backend(uart, backend):
    uart.close()
    assert backend.closed


def test_a_host_end_that_does_not_read_keeps_the_bytes_in_the_fifo(uart, backend, ctx):
    """The backend takes nothing: THR stays full (no THRE interrupt), nothing is lost or
    sent twice, and the vCPU is not held; once the backend can write again the run loop
    sends the rest and THRE interrupts (hw/char/serial.c serial_xmit/serial_watch_cb)."""
    uart.io_write(FCR, 1, 0x01)
    uart.io_write(IER, 1, 0x02)
    assert uart.io_read(IIR, 1) == 0xC2
    backend.room = 3
    for ch in b"0123456789":
        uart.io_write(THR, 1, ch)
    assert bytes(backend.output) == b"012"
    assert uart.io_read(LSR, 1) & 0x60 == 0
    assert uart.io_read(IIR, 1) == 0xC1         # no THRE interrupt while bytes wait
    assert ctx.levels[4] is False
    assert backend.writable_wanted > 0
    assert uart.deadline() is None              # nothing to do until the backend says so
    backend.room = 4
    backend.on_writable()
    assert uart.deadline() == 0
    assert ctx.kicks > 0
    uart.run_timers(ctx.clock.now_ns())
    assert bytes(backend.output) == b"0123456"
    assert uart.io_read(LSR, 1) & 0x60 == 0
    backend.room = None
    backend.on_writable()
    uart.run_timers(ctx.clock.now_ns())
    assert bytes(backend.output) == b"0123456789"
    assert uart.io_read(LSR, 1) & 0x60 == 0x60
    assert ctx.levels[4] is True
    assert uart.io_read(IIR, 1) == 0xC2


def test_a_full_transmit_fifo_drops_its_oldest_byte(uart, backend):
    backend.room = 0
    uart.io_write(FCR, 1, 0x01)
    payload = bytes(range(65, 65 + 20))
    for ch in payload:
        uart.io_write(THR, 1, ch)
    backend.room = None
    backend.on_writable()
    uart.run_timers(0)
    assert bytes(backend.output) == payload[-16:]


def test_clearing_the_transmit_fifo_empties_thr(uart, backend, ctx):
    backend.room = 0
    uart.io_write(FCR, 1, 0x01)
    uart.io_write(THR, 1, ord("x"))
    assert uart.io_read(LSR, 1) & 0x60 == 0
    uart.io_write(FCR, 1, 0x05)                 # clear the transmit FIFO
    assert uart.io_read(LSR, 1) & 0x60 == 0x60
    backend.room = None
    uart.io_write(THR, 1, ord("y"))
    assert bytes(backend.output) == b"y"


def test_migration_carries_the_bytes_the_host_had_not_taken(uart, ctx, backend, vmsd_fits,
                                                           migrate):
    """Bytes still in the transmit FIFO at the switchover are sent by the destination
    (once it runs), not by the source: each byte the guest wrote comes out exactly once."""
    uart.io_write(FCR, 1, 0x01)
    backend.room = 2
    for ch in b"switch":
        uart.io_write(THR, 1, ch)
    uart.pre_save()
    vmsd_fits(uart, UART_VMSD)
    assert uart.tx_count == 4
    dst_backend = RecordingBackend()
    other = Uart16550(dst_backend)  # type: ignore[arg-type]
    other.attach(ctx)
    other.reset()
    migrate(uart, other)
    assert other.io_read(LSR, 1) & 0x60 == 0
    assert other.deadline() == 0                # sent when the destination's loop runs
    other.run_timers(ctx.clock.now_ns())
    assert bytes(backend.output) + bytes(dst_backend.output) == b"switch"
    assert other.io_read(LSR, 1) & 0x60 == 0x60
