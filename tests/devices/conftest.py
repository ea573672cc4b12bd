"""A fake DeviceContext with a manual virtual clock, for device tests without a VM, and
device state carried through the real migration stream codec."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from pyvm.config import MACHINE_TYPE
from pyvm.migration import StreamDecoder, StreamEncoder
from pyvm.vmstate import SCALAR_SIZES, VMStateDescription
from tests.stream_in_memory import join_chunks


def assert_vmsd_fits(dev: object, vmsd: VMStateDescription) -> None:
    """Every vmsd attribute of ``dev`` holds a value its field type can carry."""
    for f in vmsd.fields:
        value = getattr(dev, f.name)
        items = list(value) if f.count > 1 else [value]
        assert len(items) == f.count, f.name
        for item in items:
            if f.type == "buffer":
                assert isinstance(item, bytes) and len(item) == f.size, f.name
            elif f.type == "bool":
                assert item in (0, 1), f.name
            else:
                bits = 8 * SCALAR_SIZES[f.type]
                low, high = ((-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
                             if f.type.startswith("int") else (0, (1 << bits) - 1))
                assert isinstance(item, int) and low <= item <= high, (f.name, item)


class _OneDevice:
    """A destination with one device and no RAM (pyvm.migration.stream.decoder.LoadTarget)."""

    def __init__(self, dev: Any) -> None:
        self.dev = dev

    def machine_type(self) -> str:
        return MACHINE_TYPE

    def capabilities(self) -> tuple[str, ...]:
        return ()

    def ram_block(self, name: str, length: int) -> None:
        return None

    def device(self, idstr: str, instance_id: int) -> Any:
        return self.dev if (idstr, instance_id) == (self.dev.idstr, self.dev.instance_id) else None

    def set_runstate(self, runstate: str) -> None:
        pass


def migrate_device(src: Any, dst: Any) -> bytes:
    """Save ``src`` and load it into ``dst`` as migration does: a whole stream (header,
    configuration, the device's FULL section, globalstate, EOF, vmdesc) written by
    :class:`StreamEncoder` and read by :class:`StreamDecoder`.  Returns the stream."""
    enc = StreamEncoder()
    data = join_chunks(enc.header() + enc.configuration(MACHINE_TYPE)
                       + enc.device_section(src.idstr, src.instance_id, src)
                       + enc.globalstate("running") + enc.eof_and_vmdesc())
    dec = StreamDecoder(_OneDevice(dst))
    dec.feed(data)
    dec.close()
    assert dec.finished and dec.state_complete and dec.runstate == "running"
    return data


@dataclass
class ManualClock:
    ns: int = 0

    def now_ns(self) -> int:
        return self.ns

    def advance(self, ns: int) -> None:
        self.ns += ns


@dataclass
class FakeContext:
    """Records what a device asks of the machine."""

    clock: ManualClock = field(default_factory=ManualClock)
    irq_events: list[tuple[int, bool]] = field(default_factory=list)
    levels: dict[int, bool] = field(default_factory=dict)
    kicks: int = 0
    resets: int = 0
    exits: list[int] = field(default_factory=list)
    logs: list[tuple[str, str]] = field(default_factory=list)

    def set_irq(self, line: int, level: bool) -> None:
        self.irq_events.append((line, level))
        self.levels[line] = level

    def kick(self) -> None:
        self.kicks += 1

    def request_reset(self) -> None:
        self.resets += 1

    def request_exit(self, code: int) -> None:
        self.exits.append(code)

    def log(self, topic: str, message: str) -> None:
        self.logs.append((topic, message))

    def rising_edges(self, line: int) -> int:
        return sum(1 for ln, lv in self.irq_events if ln == line and lv)


@pytest.fixture
def ctx() -> FakeContext:
    return FakeContext()


@pytest.fixture
def migrate():
    """The :func:`migrate_device` round trip, as a fixture."""
    return migrate_device


@pytest.fixture
def vmsd_fits():
    """The :func:`assert_vmsd_fits` check, as a fixture (no test imports conftest)."""
    return assert_vmsd_fits
