# cython: language_level=3, boundscheck=False, wraparound=False
"""The 16550A's line status read in C: the twin of
:meth:`pyvm.devices.uart16550.Uart16550.io_read` for a one-byte read of LSR.

A guest that polls its UART from the timer interrupt (pyvm's ``hello`` reads LSR at
every tick, to catch input whose interrupt it may have missed) pays the device's Python
path at every tick: the bus, ``io_read``, ``_read_register``, the IRQ line update.  This
does the same on the device's own state, under the device's own lock (the backend thread
receives under it): LSR's value, its error bits cleared by the read, and the interrupt
line driven again exactly as ``_drive_irq`` does.  Every other register and width goes to
the Python methods, which stay the reference; ``PYVM_DELIVERY=python`` or
``PYVM_PURE_PYTHON=1`` select them alone.  A test drives both over generated sequences
and compares the state and the IRQ line after every step.  References as in
pyvm/devices/uart16550.py: the 16550A datasheet, "Interrupt Identification Register".
"""

cdef enum:
    LSR = 5
    IER_RDI = 0x01
    IER_THRI = 0x02
    IER_RLSI = 0x04
    IER_MSI = 0x08
    LSR_ERRORS = 0x02 | 0x04 | 0x08 | 0x10      # OE PE FE BI
    FCR_ENABLE = 0x01
    MSR_DELTAS = 0x0F


cdef bint _pending(object u) except -1:
    """Uart16550._interrupt_id() != IIR_NO_INT."""
    cdef long ier = u.ier
    if ier & IER_RLSI and <long>u.lsr & LSR_ERRORS:
        return True
    if ier & IER_RDI and len(u._rx):
        return True         # RDI or CTI (the character timeout), either way pending
    if ier & IER_THRI and u.thr_ipending:
        return True
    if ier & IER_MSI and <long>u.msr & MSR_DELTAS:
        return True
    return False


def io_read(object u, int port, int size):
    """Uart16550.io_read."""
    cdef long value
    cdef bint level
    if size != 1 or port - <long>u.base != LSR:
        return u.io_read(port, size)
    lock = u._lock
    lock.acquire()
    try:
        value = u.lsr
        u.lsr = value & ~LSR_ERRORS & 0xFF
        level = _pending(u)                 # Uart16550._drive_irq
        if level != u._irq_level:
            u._irq_level = level
            if u.ctx is not None:
                u.ctx.set_irq(u.irq, level)
    finally:
        lock.release()
    return value


def io_write(object u, int port, int size, int value):
    """Uart16550.io_write (no native path: writes are not on any per-tick path)."""
    u.io_write(port, size, value)
