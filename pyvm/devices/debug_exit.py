"""``isa-debug-exit``: a port that ends pyvm with a status chosen by the guest.

A write of value ``v`` (any width, any port of the range) ends the process with exit
status ``(v << 1) | 1``, so a guest can report success or failure to a test harness
without being confused with a normal exit (status 0).  Reads return all ones.  As in QEMU
the defaults are ``iobase=0x501,iosize=2``; pyvm's tests use ``iobase=0xf4,iosize=0x04``.

The device has no state; its vmsd has no fields so that it never blocks migration.
"""

from __future__ import annotations

from pyvm.devices.base import Device
from pyvm.errors import ConfigError
from pyvm.vmstate import VMStateDescription

DEFAULT_IOBASE = 0x501
DEFAULT_IOSIZE = 0x02

DEBUG_EXIT_VMSD = VMStateDescription(name="isa-debug-exit", version_id=1, fields=())


class IsaDebugExit(Device):
    """Write ``v`` to any of its ports: pyvm exits with status ``(v << 1) | 1``."""

    idstr = "isa-debug-exit"
    vmsd = DEBUG_EXIT_VMSD

    def __init__(self, iobase: int = DEFAULT_IOBASE, iosize: int = DEFAULT_IOSIZE) -> None:
        super().__init__()
        if not 0 <= iobase <= 0xFFFF or iosize < 1 or iobase + iosize > 0x10000:
            raise ConfigError(f"isa-debug-exit: ports 0x{iobase:x}+0x{iosize:x} are outside "
                              "the 64 KiB I/O space")
        self.iobase = iobase
        self.iosize = iosize

    def ports(self) -> list[tuple[int, int]]:
        return [(self.iobase, self.iosize)]

    def io_read(self, port: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def io_write(self, port: int, size: int, value: int) -> None:
        if self.ctx is not None:
            self.ctx.request_exit((value << 1) | 1)


DebugExit = IsaDebugExit
"""The name the machine uses."""
