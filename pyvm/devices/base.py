"""The device model: what every emulated device provides, and what the machine gives it.

A device owns a set of I/O ports (and later MMIO ranges), answers reads and writes on
them, may raise ISA interrupt lines, and may have timers.  Timers are *deadlines*: the
device says when it next needs attention (virtual-clock nanoseconds) and the machine runs
the vCPUs until the earliest deadline, then calls :meth:`Device.run_timers` — no ticking.

Saved state is declared as data in ``vmsd`` (see :mod:`pyvm.vmstate`) and lives in the
device's attributes of the same names.  A device with ``vmsd = None`` has no migratable
state and blocks migration in every mode.
"""

from __future__ import annotations

from typing import Callable, ClassVar, Iterable, Protocol

from pyvm.vmstate import VMStateDescription, default_value


class Clock(Protocol):
    """The virtual clock: nanoseconds that advance only while the VM runs."""

    def now_ns(self) -> int: ...


class DeviceContext(Protocol):
    """Services the machine gives a device when it is attached."""

    clock: Clock

    def set_irq(self, line: int, level: bool) -> None:
        """Drive ISA interrupt line ``line`` (0-15) to ``level``."""

    def kick(self) -> None:
        """Wake the run loop (from any thread) so that new deadlines or IRQs are seen."""

    def request_reset(self) -> None:
        """Reset the machine as a hardware reset line would (port 0x92 bit 0, triple fault)."""

    def request_exit(self, code: int) -> None:
        """End pyvm with process exit status ``code`` (isa-debug-exit)."""

    def log(self, topic: str, message: str) -> None:
        """Log ``message`` if ``-d topic`` is enabled."""


class Device:
    """Base class of all devices.  Subclasses set ``idstr`` and ``vmsd``."""

    #: migration section name (QEMU's idstr), unique per machine with ``instance_id``
    idstr: ClassVar[str] = ""
    instance_id: int = 0
    vmsd: ClassVar[VMStateDescription | None] = None

    def __init__(self) -> None:
        self.ctx: DeviceContext | None = None

    # -- wiring ---------------------------------------------------------------------
    def attach(self, ctx: DeviceContext) -> None:
        """Called once by the machine before the first reset."""
        self.ctx = ctx

    def ports(self) -> Iterable[tuple[int, int]]:
        """The ``(first_port, count)`` ranges this device decodes."""
        return ()

    # -- port I/O (called on the vCPU thread) ------------------------------------------
    def io_read(self, port: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def io_write(self, port: int, size: int, value: int) -> None:
        pass

    # -- life cycle -------------------------------------------------------------------
    def reset(self) -> None:
        """Put the device in its power-on state (also on ``system_reset``)."""
        if self.vmsd is not None:
            for f in self.vmsd.fields:
                setattr(self, f.name, default_value(f))

    def deadline(self) -> int | None:
        """Virtual time (ns) at which :meth:`run_timers` must be called, or None."""
        return None

    def run_timers(self, now_ns: int) -> None:
        """Handle every timer whose deadline is <= ``now_ns``."""

    def pre_save(self) -> None:
        """Bring the vmsd attributes up to date before they are saved."""

    def post_load(self) -> None:
        """Rebuild live state from the vmsd attributes after a load."""

    def close(self) -> None:
        """Flush and release host resources (files, sockets) at exit."""


IrqSetter = Callable[[int, bool], None]
