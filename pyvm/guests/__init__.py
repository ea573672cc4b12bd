"""The guest images pyvm ships (built from ``firmware/`` by ``make -C firmware``).

Each image has a name (its file name without the extension) that the command line
accepts wherever a file is expected and no such file exists: ``-kernel memcheck`` boots
``memcheck.elf``, ``-hda boot-pm`` boots ``boot-pm.img`` (bundled disks are attached
read-only, so the installed copy never changes).  ``pyvm -kernel help`` prints
:data:`CATALOGUE`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pyvm.errors import ConfigError

GUESTS_DIR = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class Guest:
    name: str
    file: str
    boot: str           # "-kernel" (ELF) or "-hda" (boot sector)
    mode: str           # the CPU mode it runs in
    ram: str            # the smallest -m it works with
    params: str         # its -append parameters
    does: str


CATALOGUE: tuple[Guest, ...] = (
    Guest("hello", "hello.elf", "-kernel", "protected", "2M", "hz=N",
          "the default guest: prints, ticks once a second on PIT interrupts, echoes COM1"),
    Guest("ab", "ab.elf", "-kernel", "protected, SMP", "17M (default range)",
          "start=N size=N passes=N", "each vCPU increments the first byte of its pages; A/B marks"),
    Guest("memcheck", "memcheck.elf", "-kernel", "protected", "9M (default range)",
          "start=N size=N gens=N rate=N",
          "rewrites and checks a RAM range every generation; any torn page fails"),
    Guest("store-loop", "store-loop.elf", "-kernel", "protected", "9M (default range)",
          "start=N size=N iters=N", "stores the pass number into every word (no output)"),
    Guest("timer-pm", "timer-pm.elf", "-kernel", "protected", "2M", "-",
          "own GDT/IDT, PIC and PIT at 1000 Hz; 50 ticks then 'timer pm ok'"),
    Guest("timer-lm", "timer-lm.elf", "-kernel", "long (64-bit)", "2M", "-",
          "64-bit IDT, PIC and PIT at 1000 Hz; 50 ticks then 'timer lm ok'"),
    Guest("boot-pm", "boot-pm.img", "-hda", "real -> protected", "1M", "-",
          "boot sector: prints 'real', enables A20, enters protected mode, prints 'prot'"),
    Guest("timer-real", "timer-real.img", "-hda", "real", "1M", "-",
          "boot sector: IVT entry for the PIT at 1000 Hz; 50 ticks then 'timer real ok'"),
    Guest("disk-rw", "disk-rw.img", "-hda", "real -> protected", "1M", "-",
          "boot sector: ATA PIO read/write (needs a writable copy of the image)"),
    Guest("fault", "fault.img", "-hda", "real -> protected", "1M", "-",
          "boot sector: jumps beyond RAM so pyvm reports the fault"),
)


def guest_path(name: str) -> str:
    """Path of a packaged guest image, e.g. ``guest_path("hello.elf")``."""
    path = os.path.join(GUESTS_DIR, name)
    if not os.path.exists(path):
        raise ConfigError(f"guest image '{name}' is missing: run 'make -C firmware'")
    return path


def find_guest(value: str, boot: str) -> Guest | None:
    """The bundled guest ``value`` names for option ``boot`` ("-kernel" or "-hda"), when
    ``value`` is not an existing file: ``memcheck`` or ``memcheck.elf``."""
    if os.path.exists(value) or os.sep in value:
        return None
    for g in CATALOGUE:
        if value in (g.name, g.file) and g.boot == boot:
            return g
    return None


def catalogue_text() -> str:
    """``pyvm -kernel help``: every bundled guest with its boot option and parameters."""
    rows = [("Name", "Boot with", "CPU mode", "RAM", "Parameters (-append)", "What it does")]
    rows += [(g.name, f"{g.boot} {g.name}", g.mode, g.ram, g.params, g.does) for g in CATALOGUE]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["Bundled guests (a name works from any directory; a file of that name wins):"]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5])
    return "\n".join(lines)
