"""The machine's configuration, as parsed from the command line (see :mod:`pyvm.cli`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pyvm.ram import MemoryBackendConfig
from pyvm.tls import ObjectRegistry

DEFAULT_RAM = 128 << 20
MACHINE_TYPE = "pc-pyvm-1.0"       # sent in the migration configuration section
MACHINE_ALIASES = ("pc", "pyvm", MACHINE_TYPE)


@dataclass
class DriveConfig:
    file: str
    format: str = "raw"
    readonly: bool = False
    cache: str = "writethrough"
    snapshot: bool = False


@dataclass
class DebugExitConfig:
    iobase: int = 0x501
    iosize: int = 2


@dataclass
class MachineConfig:
    ram_size: int = DEFAULT_RAM
    ram_size_given: bool = False
    backends: dict[str, MemoryBackendConfig] = field(default_factory=dict)
    tls_objects: ObjectRegistry = field(default_factory=ObjectRegistry)   # -object tls-*/authz-*
    memory_backend: str | None = None
    smp: int = 1
    kernel: str | None = None
    append: str | None = None
    initrd: str | None = None
    bios: str | None = None
    drives: list[DriveConfig] = field(default_factory=list)
    serial: list[str] = field(default_factory=list)
    display_none: bool = False
    nographic: bool = False
    start_paused: bool = False
    name: str | None = None
    uuid: str = "00000000-0000-0000-0000-000000000000"
    no_reboot: bool = False
    no_shutdown: bool = False
    debug_exit: list[DebugExitConfig] = field(default_factory=list)
    log_items: str = ""
    log_file: str | None = None
    incoming: str | None = None
    slice_ms: float = 10.0
    default_guest: bool = False
