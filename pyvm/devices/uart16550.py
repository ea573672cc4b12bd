"""A 16550A UART (COM1: ports 0x3f8-0x3ff, IRQ 4).

Reference: National Semiconductor PC16550D datasheet, "Registers" (table II, register
summary) and "FIFO Interrupt Mode Operation".

Transmit: a THR write puts the byte in the transmit FIFO (16 bytes with FIFOs on, the
1-byte holding register with them off) and hands the FIFO to the character backend at once
(in loopback mode the byte goes to the receiver instead).  The backend takes what the host
accepts without blocking (:meth:`CharBackend.write_some`); normally that is everything, so
THR is empty again before the guest's next instruction.  When the host end does not read
(a socket client that stops reading), the rest stays in the FIFO: LSR shows THRE and TEMT
clear, the THRE interrupt waits, and the backend's ``on_writable`` call lets the run loop
send it later, as QEMU's ``serial_xmit``/``serial_watch_cb`` (hw/char/serial.c) do.  A
write to a full FIFO drops its oldest byte (QEMU's ``serial_ioport_write``).  The FIFO is
part of the migrated state: a byte the guest wrote is sent exactly once, by the source
before the switchover or by the destination after it, and a vCPU never blocks on a slow
host end (it would hold the VM, and a migration, for as long as the client does not read).
Receive: the backend calls :meth:`receive` from
its own thread; bytes go into the RX FIFO under a lock (16 bytes with FIFOs on, a 1-byte
holding register with them off).  A full FIFO drops the new byte and sets the overrun bit; a
full holding register is overwritten and sets overrun, as the datasheet says.

Interrupts follow the datasheet's priorities (IIR): receiver line status, received data
available / character timeout, THR empty, modem status.  The character timeout is reported
at once when the FIFO holds fewer bytes than the trigger level (no four-character delay).
The IRQ line is driven by the interrupt condition alone; the PC's OUT2 gate (MCR bit 3) is
not modelled, as in QEMU.

Threads: :meth:`receive` never touches the interrupt line itself.  It marks the interrupt
state stale, makes :meth:`deadline` return 0 and calls ``ctx.kick()``; the run loop then
calls :meth:`run_timers`, which updates IRQ 4 on the machine's thread.  The backend's
``on_writable`` call does the same for the transmit FIFO: only the machine's thread (port
I/O and :meth:`run_timers`) transmits, and only while the VM runs.  Lock order: the UART
lock may be held while calling ``ctx.set_irq``; the backend is written without it.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from typing import TYPE_CHECKING, Any

from pyvm.devices.base import Device
from pyvm.native_modules import load_native
from pyvm.vmstate import Field, VMStateDescription

if TYPE_CHECKING:
    from pyvm.chardev import CharBackend

COM1_BASE = 0x3F8
COM1_IRQ = 4
FIFO_SIZE = 16

# register offsets
RBR_THR_DLL, IER_DLM, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)

IER_RDI, IER_THRI, IER_RLSI, IER_MSI = 0x01, 0x02, 0x04, 0x08
IIR_NO_INT, IIR_MSI, IIR_THRI, IIR_RDI, IIR_RLSI, IIR_CTI = 0x01, 0x00, 0x02, 0x04, 0x06, 0x0C
IIR_FIFO_ENABLED = 0xC0
FCR_ENABLE, FCR_CLEAR_RX, FCR_CLEAR_TX = 0x01, 0x02, 0x04
FCR_TRIGGER_LEVELS = (1, 4, 8, 14)      # FCR bits 7-6
LCR_DLAB = 0x80
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x04, 0x08, 0x10
LSR_DR, LSR_OE, LSR_PE, LSR_FE, LSR_BI, LSR_THRE, LSR_TEMT = 1, 2, 4, 8, 0x10, 0x20, 0x40
LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI
MSR_DCTS, MSR_DDSR, MSR_TERI, MSR_DDCD = 0x01, 0x02, 0x04, 0x08
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x10, 0x20, 0x40, 0x80
MSR_DELTAS = 0x0F
# With no loopback the far end looks connected: carrier, data set ready, clear to send.
MSR_LINES_IDLE = MSR_DCD | MSR_DSR | MSR_CTS

UART_VMSD = VMStateDescription(
    name="serial",
    version_id=2,
    minimum_version_id=1,
    fields=(
        Field("divider", "uint16"),
        Field("ier", "uint8"),
        Field("lcr", "uint8"),
        Field("mcr", "uint8"),
        Field("lsr", "uint8"),
        Field("msr", "uint8"),
        Field("scr", "uint8"),
        Field("fcr", "uint8"),
        Field("thr_ipending", "uint8"),
        Field("rx_count", "uint8"),
        Field("rx_fifo", "buffer", size=FIFO_SIZE),
        # version 2: bytes written to THR that the host end had not taken yet
        Field("tx_count", "uint8", version_id=2),
        Field("tx_fifo", "buffer", size=FIFO_SIZE, version_id=2),
    ),
)


_native: Any = load_native("pyvm._uart")


class Uart16550(Device):
    """COM1 16550A; ``backend`` receives what the guest transmits (None: output dropped)."""

    idstr = "serial"
    vmsd = UART_VMSD

    divider: int
    ier: int
    lcr: int
    mcr: int
    lsr: int
    msr: int
    scr: int
    fcr: int
    thr_ipending: int
    rx_count: int
    rx_fifo: bytes
    tx_count: int
    tx_fifo: bytes

    def __init__(self, backend: "CharBackend | None" = None, base: int = COM1_BASE,
                 irq: int = COM1_IRQ, native: bool | None = None) -> None:
        super().__init__()
        if native is None:      # read per device, as PYVM_DELIVERY is per vCPU (tests set it)
            native = os.environ.get("PYVM_DELIVERY", "") != "python"
        #: the C twin (pyvm._uart) reads LSR for the vCPUs' native IN hooks
        self.native = bool(native) and _native is not None
        self.base = base
        self.irq = irq
        self.backend = backend
        self._lock = threading.RLock()
        self._rx: deque[int] = deque()
        self._tx: deque[int] = deque()      # written to THR, not yet taken by the backend
        self._tx_stale = False              # the backend can take more: send on the loop
        self._irq_level = False
        self._irq_stale = False
        self.reset()
        if backend is not None:
            backend.set_receiver(self.receive)
            backend.set_can_receive(self.can_receive)
            backend.set_on_writable(self.writable)

    # -- Device API -------------------------------------------------------------------
    def ports(self) -> list[tuple[int, int]]:
        return [(self.base, 8)]

    def native_port_io(self) -> tuple[Any, Any] | None:
        """The C port path for the vCPUs' native IN/OUT hooks (pyvm/_portio.pyx): the LSR
        read in C, everything else through :meth:`io_read`/:meth:`io_write`."""
        return (_native.io_read, _native.io_write) if self.native else None

    def reset(self) -> None:
        with self._lock:
            super().reset()
            self.divider = 12           # 115200 / 12 = 9600 baud, a common power-on choice
            self.lsr = LSR_THRE | LSR_TEMT
            self.msr = MSR_LINES_IDLE
            self._rx.clear()
            self._tx.clear()
            self._tx_stale = False
            self._irq_stale = False
            self._drive_irq()

    def pre_save(self) -> None:
        with self._lock:
            data = bytes(self._rx)
            self.rx_count = len(data)
            self.rx_fifo = data.ljust(FIFO_SIZE, b"\0")
            pending = bytes(self._tx)
            self.tx_count = len(pending)
            self.tx_fifo = pending.ljust(FIFO_SIZE, b"\0")

    def post_load(self) -> None:
        with self._lock:
            count = min(self.rx_count, FIFO_SIZE)
            self._rx = deque(self.rx_fifo[:count])
            # a version-1 stream has no transmit FIFO: the fields keep their reset value, 0
            self._tx = deque(self.tx_fifo[:min(self.tx_count, FIFO_SIZE)])
            self.tx_count = len(self._tx)
            self._tx_stale = bool(self._tx)     # the destination sends it when it runs
            # the PIC's saved state already holds the line level; adopt it without driving
            self._irq_level = self._interrupt_id() != IIR_NO_INT
            self._irq_stale = False

    def deadline(self) -> int | None:
        return 0 if self._irq_stale or self._tx_stale else None

    def run_timers(self, now_ns: int) -> None:
        with self._lock:
            self._irq_stale = False
            send, self._tx_stale = self._tx_stale, False
            self._drive_irq()
        if send:
            self._flush_tx()

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()

    def io_read(self, port: int, size: int) -> int:
        value = 0
        for i in range(size):
            offset = port + i - self.base
            byte = self._read_register(offset) if 0 <= offset < 8 else 0xFF
            value |= byte << (8 * i)
        return value

    def io_write(self, port: int, size: int, value: int) -> None:
        for i in range(size):
            offset = port + i - self.base
            if not 0 <= offset < 8:
                continue
            with self._lock:
                send = self._write_register(offset, (value >> (8 * i)) & 0xFF)
            if send:
                self._flush_tx()

    def _flush_tx(self) -> None:
        """Hand the transmit FIFO to the backend (machine thread, lock not held): what it
        takes leaves the FIFO; once the FIFO is empty, THR is empty and THRE interrupts.
        Only the machine's thread changes ``_tx``, so it is read here without the lock."""
        tx = self._tx
        if not tx:
            return
        data = bytes(tx)
        taken = len(data) if self.backend is None else self.backend.write_some(data)
        with self._lock:
            if taken >= len(data):
                tx.clear()
                self.lsr |= LSR_THRE | LSR_TEMT
                self.thr_ipending = 1
                self._drive_irq()
                return
            for _ in range(taken):
                tx.popleft()
        if self.backend is not None:
            self.backend.want_writable()

    # -- backend side (any thread) --------------------------------------------------------
    def writable(self) -> None:
        """The backend can take output again (called from its thread): the run loop
        sends the rest of the transmit FIFO."""
        with self._lock:
            if not self._tx:
                return
            self._tx_stale = True
        if self.ctx is not None:
            self.ctx.kick()

    def can_receive(self) -> int:
        """How many bytes the receiver can take now (0 in loopback mode)."""
        with self._lock:
            if self.mcr & MCR_LOOP:
                return 0
            return self._rx_capacity() - len(self._rx)

    def receive(self, data: bytes) -> None:
        """Bytes arriving on the serial line (called by the backend's reader thread)."""
        if not data:
            return
        with self._lock:
            if self.mcr & MCR_LOOP:
                return                  # the line is disconnected from the pins in loopback
            for byte in data:
                self._push_rx(byte)
            self._irq_stale = True
        if self.ctx is not None:
            self.ctx.kick()

    # -- registers ----------------------------------------------------------------------
    def _rx_capacity(self) -> int:
        return FIFO_SIZE if self.fcr & FCR_ENABLE else 1

    def _push_rx(self, byte: int) -> None:
        if len(self._rx) < self._rx_capacity():
            self._rx.append(byte)
        elif self.fcr & FCR_ENABLE:
            self.lsr |= LSR_OE          # FIFO full: the new character is lost
        else:
            self._rx[0] = byte          # holding register overwritten
            self.lsr |= LSR_OE
        self.lsr |= LSR_DR

    def _trigger_level(self) -> int:
        return FCR_TRIGGER_LEVELS[self.fcr >> 6]

    def _interrupt_id(self) -> int:
        """The highest-priority pending interrupt (datasheet table IV)."""
        if self.ier & IER_RLSI and self.lsr & LSR_ERRORS:
            return IIR_RLSI
        if self.ier & IER_RDI and self._rx:
            if not self.fcr & FCR_ENABLE or len(self._rx) >= self._trigger_level():
                return IIR_RDI
            return IIR_CTI
        if self.ier & IER_THRI and self.thr_ipending:
            return IIR_THRI
        if self.ier & IER_MSI and self.msr & MSR_DELTAS:
            return IIR_MSI
        return IIR_NO_INT

    def _drive_irq(self) -> None:
        level = self._interrupt_id() != IIR_NO_INT
        if level != self._irq_level:
            self._irq_level = level
            if self.ctx is not None:
                self.ctx.set_irq(self.irq, level)

    def _read_register(self, offset: int) -> int:
        notify = False
        with self._lock:
            if offset == RBR_THR_DLL:
                if self.lcr & LCR_DLAB:
                    return self.divider & 0xFF
                value = self._rx.popleft() if self._rx else 0
                if not self._rx:
                    self.lsr &= ~(LSR_DR | LSR_BI) & 0xFF
                notify = True
            elif offset == IER_DLM:
                value = self.divider >> 8 if self.lcr & LCR_DLAB else self.ier
            elif offset == IIR_FCR:
                iid = self._interrupt_id()
                value = iid | (IIR_FIFO_ENABLED if self.fcr & FCR_ENABLE else 0)
                if iid == IIR_THRI:
                    self.thr_ipending = 0   # reading IIR with THRE as the source clears it
            elif offset == LCR:
                value = self.lcr
            elif offset == MCR:
                value = self.mcr
            elif offset == LSR:
                value = self.lsr
                self.lsr &= ~LSR_ERRORS & 0xFF
            elif offset == MSR:
                value = self.msr
                self.msr &= ~MSR_DELTAS & 0xFF
            else:
                value = self.scr
            self._drive_irq()
        if notify and self.backend is not None:
            self.backend.accept_input()
        return value

    def _write_register(self, offset: int, value: int) -> bool:
        """Write one register with the lock held; True: the transmit FIFO has a new byte
        for the backend."""
        if offset == RBR_THR_DLL:
            if self.lcr & LCR_DLAB:
                self.divider = (self.divider & 0xFF00) | value
            else:
                return self._transmit(value)    # drives the line itself
        elif offset == IER_DLM:
            if self.lcr & LCR_DLAB:
                self.divider = (self.divider & 0x00FF) | (value << 8)
            else:
                newly_enabled = value & ~self.ier & IER_THRI
                self.ier = value & 0x0F
                if newly_enabled and self.lsr & LSR_THRE:
                    self.thr_ipending = 1   # enabling THRE interrupts with THR empty raises one
        elif offset == IIR_FCR:
            self._write_fcr(value)
        elif offset == LCR:
            self.lcr = value
        elif offset == MCR:
            self._write_mcr(value & 0x1F)
        elif offset == SCR:
            self.scr = value
        # LSR and MSR are read-only
        self._drive_irq()
        return False

    def _transmit(self, value: int) -> bool:
        self.thr_ipending = 0
        self.lsr &= ~(LSR_THRE | LSR_TEMT) & 0xFF
        self._drive_irq()               # THR full: the THRE condition drops
        if self.mcr & MCR_LOOP:
            self._push_rx(value)
            if not self._tx:
                self.lsr |= LSR_THRE | LSR_TEMT
                self.thr_ipending = 1
            self._drive_irq()
            return False
        if len(self._tx) >= self._tx_capacity():
            self._tx.popleft()          # a full FIFO loses its oldest byte
        self._tx.append(value)
        return True

    def _tx_capacity(self) -> int:
        return FIFO_SIZE if self.fcr & FCR_ENABLE else 1

    def _write_fcr(self, value: int) -> None:
        if (value ^ self.fcr) & FCR_ENABLE:
            value |= FCR_CLEAR_RX | FCR_CLEAR_TX    # toggling FIFO mode clears both FIFOs
        if value & FCR_CLEAR_RX:
            self._rx.clear()
            self.lsr &= ~(LSR_DR | LSR_BI) & 0xFF
        if value & FCR_CLEAR_TX and self._tx:
            self._tx.clear()            # hw/char/serial.c: THR empty, THRE interrupt due
            self.lsr |= LSR_THRE | LSR_TEMT
            self.thr_ipending = 1
        self.fcr = value & 0xC9         # enable, DMA mode and trigger bits stick
        if not self.fcr & FCR_ENABLE:
            while len(self._rx) > 1:
                self._rx.popleft()
            while len(self._tx) > 1:
                self._tx.popleft()

    def _write_mcr(self, value: int) -> None:
        self.mcr = value
        if value & MCR_LOOP:
            # loopback: RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD (datasheet, MCR bit 4)
            lines = (((value & MCR_RTS) << 3) | ((value & MCR_DTR) << 5)
                     | ((value & MCR_OUT1) << 4) | ((value & MCR_OUT2) << 4))
        else:
            lines = MSR_LINES_IDLE
        old = self.msr & 0xF0
        changed = old ^ lines
        deltas = (changed >> 4) & (MSR_DCTS | MSR_DDSR | MSR_DDCD)
        if old & MSR_RI and not lines & MSR_RI:
            deltas |= MSR_TERI          # trailing edge of ring indicator only
        self.msr = lines | (self.msr & MSR_DELTAS) | deltas
