"""System control port A (0x92), the PS/2 "fast A20 and reset" port.

Bit 1 is the A20 gate and bit 0 a reset request: a 0 -> 1 transition of bit 0 resets the
machine (through ``ctx.request_reset()``).  The byte reads back as written.  pyvm's memory
does not wrap at 1 MiB, so the A20 bit is only stored, reported by :attr:`Port92.a20_enabled`
and logged under ``-d port92``.  Reference: IBM PS/2 Model 50/60 Technical Reference,
"System Control Port A".
"""

from __future__ import annotations

from pyvm.devices.base import Device
from pyvm.vmstate import Field, VMStateDescription

PORT92 = 0x92
A20_BIT = 0x02
RESET_BIT = 0x01

PORT92_VMSD = VMStateDescription(
    name="port92",
    version_id=1,
    minimum_version_id=1,
    fields=(Field("outport", "uint8"),),
)


class Port92(Device):
    """Port 0x92: A20 gate (stored) and fast reset."""

    idstr = "port92"
    vmsd = PORT92_VMSD

    outport: int

    def __init__(self) -> None:
        super().__init__()
        self.outport = 0

    @property
    def a20_enabled(self) -> bool:
        return bool(self.outport & A20_BIT)

    def ports(self) -> list[tuple[int, int]]:
        return [(PORT92, 1)]

    def reset(self) -> None:
        self.outport &= ~RESET_BIT & 0xFF   # the reset bit self-clears; A20 keeps its state

    def io_read(self, port: int, size: int) -> int:
        high = (1 << (8 * size)) - 1 & ~0xFF
        return high | self.outport

    def io_write(self, port: int, size: int, value: int) -> None:
        old = self.outport
        self.outport = value & 0xFF
        if self.ctx is None:
            return
        if (old ^ self.outport) & A20_BIT:
            state = "enabled" if self.a20_enabled else "disabled"
            self.ctx.log("port92", f"A20 gate {state}")
        if self.outport & RESET_BIT and not old & RESET_BIT:
            request_reset = getattr(self.ctx, "request_reset", None)
            if request_reset is not None:
                request_reset()
            else:
                self.ctx.log("unimp", "port92: fast reset requested but not available")
