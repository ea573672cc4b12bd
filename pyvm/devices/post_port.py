"""Port 0x80, the POST diagnostic port: writes are accepted and ignored, reads give 0xff.

Firmware and operating systems write progress codes here (and use it as a short I/O
delay); without this device every such write would be logged as an unassigned port.
The last code written is kept in :attr:`PostPort.last_code` for debugging only.
"""

from __future__ import annotations

from pyvm.devices.base import Device
from pyvm.vmstate import VMStateDescription

POST_PORT = 0x80

POST_PORT_VMSD = VMStateDescription(name="ioport80", version_id=1, fields=())


class PostPort(Device):
    """Swallows writes to port 0x80."""

    idstr = "ioport80"
    vmsd = POST_PORT_VMSD

    def __init__(self) -> None:
        super().__init__()
        self.last_code = 0

    def ports(self) -> list[tuple[int, int]]:
        return [(POST_PORT, 1)]

    def io_read(self, port: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def io_write(self, port: int, size: int, value: int) -> None:
        self.last_code = value & 0xFF
