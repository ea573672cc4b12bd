"""isa-debug-exit, port 0x92 and the POST port: the small stateless-ish ports."""

from __future__ import annotations

import pytest

from pyvm.devices.debug_exit import DebugExit, IsaDebugExit
from pyvm.devices.port92 import Port92
from pyvm.devices.post_port import PostPort
from pyvm.errors import ConfigError


def test_write_requests_exit_with_shifted_status(ctx):
    dev = IsaDebugExit(iobase=0xF4, iosize=0x04)
    dev.attach(ctx)
    dev.reset()
    assert list(dev.ports()) == [(0xF4, 4)]
    dev.io_write(0xF4, 1, 0x21)
    dev.io_write(0xF5, 1, 0x00)
    dev.io_write(0xF4, 4, 0x10)
    assert ctx.exits == [0x43, 0x01, 0x21]


def test_qemu_defaults_and_reads(ctx):
    dev = DebugExit()
    dev.attach(ctx)
    assert list(dev.ports()) == [(0x501, 2)]
    assert dev.io_read(0x501, 1) == 0xFF
    assert dev.io_read(0x501, 2) == 0xFFFF
    assert ctx.exits == []


def test_stateless_device_still_has_a_vmsd():
    assert IsaDebugExit.vmsd is not None
    assert IsaDebugExit.vmsd.fields == ()
    assert PostPort.vmsd is not None and PostPort.vmsd.fields == ()


def test_ports_beyond_io_space_rejected():
    with pytest.raises(ConfigError):
        IsaDebugExit(iobase=0xFFFF, iosize=4)


def test_port92_a20_bit_is_stored_and_logged(ctx):
    dev = Port92()
    dev.attach(ctx)
    dev.reset()
    assert not dev.a20_enabled
    dev.io_write(0x92, 1, 0x02)
    assert dev.a20_enabled
    assert dev.io_read(0x92, 1) == 0x02
    assert ("port92", "A20 gate enabled") in ctx.logs
    assert ctx.resets == 0


def test_port92_fast_reset_on_rising_edge_only(ctx):
    dev = Port92()
    dev.attach(ctx)
    dev.io_write(0x92, 1, 0x03)
    assert ctx.resets == 1
    dev.io_write(0x92, 1, 0x03)         # still set: no new reset
    assert ctx.resets == 1
    dev.reset()                         # the machine resets: bit 0 clears, A20 stays
    assert dev.io_read(0x92, 1) == 0x02
    dev.io_write(0x92, 1, 0x03)
    assert ctx.resets == 2


def test_port92_without_reset_service_logs(ctx):
    class NoReset:
        def __init__(self) -> None:
            self.logs: list[tuple[str, str]] = []

        def log(self, topic: str, message: str) -> None:
            self.logs.append((topic, message))

    bare = NoReset()
    dev = Port92()
    dev.ctx = bare  # type: ignore[assignment]
    dev.io_write(0x92, 1, 0x01)
    assert bare.logs and bare.logs[-1][0] == "unimp"


def test_post_port_swallows_writes(ctx):
    dev = PostPort()
    dev.attach(ctx)
    assert list(dev.ports()) == [(0x80, 1)]
    dev.io_write(0x80, 1, 0x55)
    assert dev.last_code == 0x55
    assert dev.io_read(0x80, 1) == 0xFF
    assert ctx.logs == [] and ctx.exits == [] and ctx.irq_events == []
