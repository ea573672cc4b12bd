"""Builds the native idle tick (:mod:`pyvm._idle`) of a machine.

While every vCPU is halted, ``Machine._idle_native`` hands the run loop to
:meth:`pyvm._idle.IdleTicker.run`, which waits for the earliest deadline and handles the
PIT's timer interrupts (raise IRQ 0, acknowledge, deliver, run the handler to its HLT)
without returning to Python.  The Python loop (``Machine._idle`` and the passes around
it) is the twin: it runs alone when the extension is not built, with
``PYVM_PURE_PYTHON=1`` or ``PYVM_DELIVERY=python``, or when the native delivery, 8259A
or 8254 paths are not in use, and whenever ``-d int`` logs every interrupt;
``PYVM_IDLE=python`` selects it alone (with the rest of the tick path native).
"""

from __future__ import annotations

import ctypes
import os
from typing import Any, Sequence

from unicorn.unicorn_py3 import unicorn as ucmod

from pyvm.native_modules import load_native


_native: Any = load_native("pyvm._idle")
IMPLEMENTATION: str = "cython" if _native is not None else "python"

# IdleTicker.run's answers (pyvm/_idle.pyx)
KICKED, DEADLINE, NOT_IDLE, RAN = 0, 1, 2, 3


def wake_fd() -> int:
    """A new eventfd for waking the idle tick (non-blocking, closed on exec)."""
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def idle_ticker(machine: Any, timer_devices: Sequence[Any], fd: int, slice_ns: int) -> Any:
    """The :class:`pyvm._idle.IdleTicker` of ``machine`` (a :class:`pyvm.machine.Machine`,
    which imports this module), or None where the Python loop is to be used.
    ``timer_devices`` are the machine's devices with deadlines; ``fd`` the eventfd
    :meth:`Machine.kick` writes while the ticker runs."""
    if _native is None or os.environ.get("PYVM_DELIVERY", "") == "python" \
            or os.environ.get("PYVM_IDLE", "") == "python":
        return None
    cpu = machine.cpus[0]
    if cpu.native_delivery is None or not getattr(machine.pic, "native", False) \
            or not getattr(machine.pit, "native", False):
        return None
    emu_start = ctypes.cast(ucmod.uclib.uc_emu_start, ctypes.c_void_p).value
    assert emu_start
    others = [d for d in timer_devices if d is not machine.pit]
    return _native.IdleTicker(machine, others, fd, int(emu_start), slice_ns)
