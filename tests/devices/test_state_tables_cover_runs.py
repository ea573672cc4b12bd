"""Every device attribute that changes while real guests run is in the device's state
table (its vmsd, subsections included), or is listed below with the reason it need not
migrate; and after a run, each device carried through the real stream codec into a fresh
machine's device ends up with the same state.

Each scenario runs a packaged guest in a Machine (in this process), snapshots every
device's ``__dict__`` before the start and repeatedly on the run loop while the guest
works, and checks the attributes that ever differed from the first snapshot.
"""

from __future__ import annotations

import collections
import socket
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from pyvm.config import DriveConfig, MachineConfig
from pyvm.devices.base import Device
from pyvm.guests import guest_path
from pyvm.machine import Machine
from pyvm.vmstate import VMStateDescription
from tests.waiting import wait_until

# Attributes that change during a run but are not guest-visible state of their own.
NOT_MIGRATED: dict[str, dict[str, str]] = {
    "AtaDisk": {
        "_buf": "the live sector buffer: pre_save copies it into io_buffer, post_load back",
    },
    "Uart16550": {
        "_rx": "the live receive FIFO: pre_save copies it into rx_fifo/rx_count, post_load back",
        "_irq_level": "the level last driven on IRQ 4, recomputed from the registers",
        "_irq_stale": "asks the run loop to recompute the IRQ level; post_load sets it",
    },
    "PicPair": {
        "_int_out": "the INT line last signalled, recomputed from irr/isr/imr",
        "irq_count": "rising edges per line for info irq: statistics, as in QEMU's i8259 "
                     "(hw/intc/i8259.c), neither reset nor migrated",
        "_irq_level": "the level last seen per line, only to count rising edges for irq_count",
    },
    "CmosRtc": {
        "_ram": "the live CMOS RAM: pre_save copies it into cmos_data, post_load back",
        "_irq_level": "the level last driven on IRQ 8, recomputed from register C",
        "_host_time_ns": "the host's clock when this process built the RTC, read only by "
                         "attach: the saved offset_ns carries the guest's clock",
    },
    "PostPort": {
        "last_code": "a debugging aid: port 0x80 reads 0xff whatever was written",
    },
}
#: wiring every device has (set by attach, or the host resources it was built with)
WIRING = {"ctx", "backend", "image", "_lock", "_logged"}


def _plain(value: Any) -> Any:
    """A comparable copy of an attribute's value; other objects by identity."""
    if isinstance(value, (int, float, str, bytes, bool, type(None))):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (list, tuple, collections.deque)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, dict):
        return tuple((k, _plain(v)) for k, v in value.items())
    if isinstance(value, np.ndarray):
        return value.tobytes()
    return ("object", id(value))


def _snapshot(m: Machine) -> list[dict[str, Any]]:
    return [{k: _plain(v) for k, v in vars(dev).items()} for dev in m.devices]


def _vmsd_names(vmsd: VMStateDescription | None) -> set[str]:
    if vmsd is None:
        return set()
    names = {f.name for f in vmsd.fields}
    for sub in vmsd.subsections:
        names |= _vmsd_names(sub.vmsd)
    return names


@dataclass
class Scenario:
    name: str
    config: Callable[[Path], MachineConfig]
    drive: Callable[[Machine, Path], Callable[[], bool]]     # starts the work; returns "done?"
    exercises: tuple[str, ...]                               # device classes whose state changes


def _serial_text(path: Path) -> Callable[[str], bool]:
    return lambda text: path.exists() and text in path.read_bytes().decode(errors="replace")


def _hello_config(tmp: Path) -> MachineConfig:
    return MachineConfig(ram_size=16 << 20, kernel=guest_path("hello.elf"),
                         serial=[f"unix:{tmp / 'serial.sock'},server=on,wait=off"])


def _hello_drive(m: Machine, tmp: Path) -> Callable[[], bool]:
    client = socket.socket(socket.AF_UNIX)
    client.connect(str(tmp / "serial.sock"))
    got = bytearray()

    def done() -> bool:
        client.setblocking(False)
        try:
            got.extend(client.recv(65536))
        except BlockingIOError:
            pass
        if b"tick 1" in got and b"typed" not in got:
            client.sendall(b"typed\r")          # the UART receives, the guest echoes
        return b"typed\r\n" in got and b"tick 2" in got
    return done


def _disk_config(tmp: Path) -> MachineConfig:
    img = tmp / "disk.img"
    boot = Path(guest_path("disk-rw.img")).read_bytes()
    img.write_bytes(boot.ljust(512, b"\0")[:512] + b"pyvm disk sector".ljust(512, b"\0") + bytes(1024))
    return MachineConfig(ram_size=16 << 20, drives=[DriveConfig(str(img))],
                         serial=[f"file:{tmp / 'serial'}"])


def _serial_drive(text: str) -> Callable[[Machine, Path], Callable[[], bool]]:
    def drive(m: Machine, tmp: Path) -> Callable[[], bool]:
        seen = _serial_text(tmp / "serial")
        return lambda: seen(text)
    return drive


def _kernel_config(name: str, image: str = "") -> Callable[[Path], MachineConfig]:
    def config(tmp: Path) -> MachineConfig:
        cfg = MachineConfig(ram_size=16 << 20, serial=[f"file:{tmp / 'serial'}"])
        if image:
            return replace(cfg, drives=[DriveConfig(guest_path(image), readonly=True)])
        return replace(cfg, kernel=guest_path(name))
    return config


def _cmos_drive(m: Machine, tmp: Path) -> Callable[[], bool]:
    """No packaged guest uses the RTC or port 0x80: program the RTC through its ports on the
    run loop, as a guest's port I/O would (NVRAM byte, 24 h binary mode, periodic
    interrupt), write a POST code, and read the clock until register C flagged interrupts."""
    def program() -> None:
        for index, value in ((0x40, 0x5A), (0x0A, 0x26), (0x0B, 0x46)):
            m.iobus.write(0x70, 1, index)
            m.iobus.write(0x71, 1, value)
        m.iobus.write(0x80, 1, 0x42)

    def poll() -> int:
        m.iobus.write(0x70, 1, 0x00)
        m.iobus.read(0x71, 1)
        m.iobus.write(0x70, 1, 0x0C)
        return int(m.iobus.read(0x71, 1))
    m.run_on_loop(program)
    flags = [0]

    def done() -> bool:
        flags[0] |= m.run_on_loop(poll)
        return bool(flags[0] & 0x40)
    return done


SCENARIOS = [
    Scenario("hello-uart-pic-pit", _hello_config, _hello_drive, ("PicPair", "Pit8254", "Uart16550")),
    Scenario("disk-rw-ata", _disk_config, _serial_drive("disk ok"), ("AtaDisk", "Uart16550")),
    Scenario("boot-pm-port92", _kernel_config("", "boot-pm.img"), _serial_drive("prot"), ("Port92",)),
    Scenario("timer-real", _kernel_config("", "timer-real.img"), _serial_drive("timer real ok"),
             ("PicPair", "Pit8254")),
    Scenario("timer-lm", _kernel_config("timer-lm.elf"), _serial_drive("timer lm ok"),
             ("PicPair", "Pit8254")),
    Scenario("cmos-post", _kernel_config("hello.elf"), _cmos_drive, ("CmosRtc", "PostPort")),
]


def _run(scenario: Scenario, tmp: Path) -> tuple[Machine, dict[str, set[str]]]:
    """Run the scenario; the attributes of each device (by class name) that changed."""
    m = Machine(scenario.config(tmp))
    first = _snapshot(m)
    changed: dict[str, set[str]] = {type(dev).__name__: set() for dev in m.devices}

    def look() -> None:
        for dev, before, now in zip(m.devices, first, _snapshot(m)):
            changed[type(dev).__name__] |= {k for k in now if before.get(k, ()) != now[k]}
    m.start()
    done = scenario.drive(m, tmp)

    def finished() -> bool:
        m.run_on_loop(look)
        return done()
    wait_until(finished, 60, scenario.name, interval=0.02)
    m.stop()
    look()
    return m, changed


@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_changed_attributes_are_in_the_state_table(scenario: Scenario, tmp_path: Path,
                                                   migrate: Callable[[Any, Any], bytes]) -> None:
    m, changed = _run(scenario, tmp_path)
    try:
        for dev in m.devices:
            cls = type(dev).__name__
            allowed = set(NOT_MIGRATED.get(cls, {})) | WIRING
            missing = changed[cls] - _vmsd_names(dev.vmsd) - allowed
            assert not missing, f"{cls}: changed during the run but not in its vmsd: {sorted(missing)}"
        # the run did exercise the devices it is meant to
        for dev in m.devices:
            cls = type(dev).__name__
            if cls in scenario.exercises:
                assert changed[cls] - WIRING, f"{cls}: no state changed during {scenario.name}"
        _check_migrated_copies(m, scenario, tmp_path, migrate)
    finally:
        m.request_exit(0)
        m.close()


def _check_migrated_copies(m: Machine, scenario: Scenario, tmp: Path,
                           migrate_device: Callable[[Any, Any], bytes]) -> None:
    """Each device, saved and loaded into a fresh machine's device through the codec,
    ends with the source's state (allow-listed and wiring attributes aside)."""
    cfg = scenario.config(tmp)
    fresh = Machine(replace(cfg, serial=["null"] if "unix:" in cfg.serial[0] else cfg.serial,
                            incoming="defer"))
    try:
        by_key = {(d.idstr, d.instance_id): d for d in fresh.devices}
        for dev in m.devices:
            other = by_key[(dev.idstr, dev.instance_id)]
            migrate_device(dev, other)
            cls = type(dev).__name__
            skip = set(NOT_MIGRATED.get(cls, {})) | WIRING
            src = {k: v for k, v in _snapshot_one(dev).items() if k not in skip}
            dst = {k: v for k, v in _snapshot_one(other).items() if k not in skip}
            differ = sorted(k for k in src if src[k] != dst.get(k) and not _is_object(src[k]))
            assert not differ, f"{cls}: not restored by a migration: {differ}"
    finally:
        fresh.close()


def _snapshot_one(dev: Device) -> dict[str, Any]:
    return {k: _plain(v) for k, v in vars(dev).items()}


def _is_object(value: Any) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and value[0] == "object"


#: the device classes the scenarios drive
EXERCISED = {cls for scenario in SCENARIOS for cls in scenario.exercises}


def test_every_device_class_is_exercised() -> None:
    """A new device class in pyvm/devices fails this until a scenario drives it
    (isa-debug-exit aside: writing it ends the run; it has no state, see test_debug_exit)."""
    import importlib
    import pkgutil

    import pyvm.devices
    classes = set()
    for mod in pkgutil.iter_modules(pyvm.devices.__path__):
        module = importlib.import_module(f"pyvm.devices.{mod.name}")
        classes |= {obj.__name__ for obj in vars(module).values()
                    if isinstance(obj, type) and issubclass(obj, Device) and obj is not Device
                    and obj.__module__ == module.__name__}
    assert classes - {"IsaDebugExit"} == EXERCISED
