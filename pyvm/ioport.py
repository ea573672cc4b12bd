"""The port I/O bus: 64 K ports, each dispatched to the device that decodes it.

A table indexed by port number keeps dispatch O(1).  Ports nobody decodes read as all
ones and are logged once each under ``-d unimp``.
"""

from __future__ import annotations

from typing import Protocol

from pyvm.errors import ConfigError
from pyvm.log import Log


class PortDevice(Protocol):
    def io_read(self, port: int, size: int) -> int: ...

    def io_write(self, port: int, size: int, value: int) -> None: ...


class IoBus:
    def __init__(self, log: Log) -> None:
        self._table: list[PortDevice | None] = [None] * 0x10000
        self._log = log

    def register(self, dev: PortDevice, first: int, count: int, name: str = "") -> None:
        for port in range(first, first + count):
            if not 0 <= port <= 0xFFFF:
                raise ConfigError(f"{name}: I/O port {port:#x} out of range")
            if self._table[port] is not None and self._table[port] is not dev:
                raise ConfigError(f"{name}: I/O port {port:#x} is already in use")
            self._table[port] = dev

    def owner(self, port: int) -> PortDevice | None:
        return self._table[port & 0xFFFF]

    def read(self, port: int, size: int) -> int:
        dev = self._table[port & 0xFFFF]
        if dev is None:
            self._log.once("unimp", f"unassigned I/O port read {port:#06x} (size {size})")
            return (1 << (8 * size)) - 1
        value = dev.io_read(port, size)
        if self._log.on("ioport"):
            self._log.log("ioport", f"in  {port:#06x}/{size} -> {value:#x}")
        return value & ((1 << (8 * size)) - 1)

    def write(self, port: int, size: int, value: int) -> None:
        dev = self._table[port & 0xFFFF]
        if self._log.on("ioport"):
            self._log.log("ioport", f"out {port:#06x}/{size} <- {value:#x}")
        if dev is None:
            self._log.once("unimp", f"unassigned I/O port write {port:#06x} (size {size})")
            return
        dev.io_write(port, size, value & ((1 << (8 * size)) - 1))
