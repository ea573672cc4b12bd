"""Builds the native interrupt and exception delivery (:mod:`pyvm._delivery`) for a vCPU.

``VCpu.deliver`` (pyvm/cpu.py) is the Python version and stays the reference; the native
one does the same steps in C through Unicorn's C API.  The native one is used when the
extension is built and ``PYVM_PURE_PYTHON`` is not set (as for :mod:`pyvm.fastpath`), and
``PYVM_DELIVERY=python`` selects the Python version alone.  Tests drive both over the
same generated cases and compare every register and the stack bytes.
"""

from __future__ import annotations

import ctypes
import importlib
import os
from typing import Any

from unicorn import x86_const as X
from unicorn.unicorn_py3 import unicorn as ucmod

from pyvm import fastpath
from pyvm.native_modules import load_native
from pyvm.unicorn_internals import NativeContext


# the dirty bitmaps it marks must be the native ones
_native: Any = load_native("pyvm._delivery") if fastpath.IMPLEMENTATION == "cython" else None
IMPLEMENTATION: str = "cython" if _native is not None else "python"


def _address(name: str) -> int:
    value = ctypes.cast(getattr(ucmod.uclib, name), ctypes.c_void_p).value
    assert value
    return int(value)


def native_delivery(cpu: Any) -> Any:
    """The native delivery for ``cpu`` (a :class:`pyvm.cpu.VCpu`, which imports this
    module), or None when the Python version is to be used.

    Its ``deliver(vector, error_code)`` returns (status, detail, message); its C
    exception hook (``UC_HOOK_INTR``) is registered on the engine, and ``take()`` returns
    what it saw; see :class:`pyvm._delivery.Delivery`."""
    if _native is None or len(cpu.ram.blocks) > _native.MAX_BLOCKS:
        return None
    if os.environ.get("PYVM_DELIVERY", "") == "python":     # read per vCPU (tests set it)
        return None
    ctx = NativeContext(cpu.uc)
    functions = (_address("uc_reg_read"), _address("uc_reg_write"),
                 _address("uc_vmem_translate"), ctx.save_fn, ctx.restore_fn)
    regs = tuple(int(getattr(X, "UC_X86_REG_" + n)) for n in _native.REGISTERS)
    blocks = [(b.gpa, b.size, b.host_address, int(b.dirty.words.ctypes.data)) for b in cpu.ram]
    hflags = cpu.internals.layout["hflags"]
    # keep: the context, and the bitmaps and RAM whose addresses the C side holds.
    keep = (ctx, [b.dirty for b in cpu.ram], list(cpu.ram))
    native = _native.Delivery(cpu.uc._uch.value, functions, ctx.address, hflags.offset,
                              cpu.wide, regs, blocks, keep)
    layout = cpu.internals.layout
    native.hook_exceptions(_address("uc_hook_add"), _address("uc_hook_del"),
                           _address("uc_emu_stop"), layout["error_code"].offset,
                           layout["exception_is_int"].offset, layout["old_exception"].offset)
    return native


STATUS_OK = 0
STATUS_FAULT = 1
STATUS_UNICORN_ERROR = 2


def native_port_hooks(cpu: Any, read: Any, write: Any) -> Any:
    """The native IN/OUT hooks (:class:`pyvm._portio.PortHooks`) for ``cpu``, calling
    ``read(port, size)`` and ``write(port, size, value)``; None where the native delivery
    is not used (then ``VCpu._on_in``/``_on_out``, their twins, are hooked instead)."""
    if cpu.native_delivery is None:
        return None
    try:
        portio = importlib.import_module("pyvm._portio")
    except ImportError:  # an older build without it: the Python hooks do the same
        return None
    return portio.PortHooks(cpu.uc._uch.value, _address("uc_hook_add"), _address("uc_hook_del"),
                            _address("uc_emu_stop"), X.UC_X86_INS_IN, X.UC_X86_INS_OUT,
                            read, write, cpu, cpu.uc)


def route_native_ports(cpus: Any, devices: Any, log_enabled: Any) -> None:
    """Let the native IN/OUT hooks of ``cpus`` call the native port path of every device
    that has one (``native_port_io()``, e.g. the 8259A pair) directly instead of through
    the port bus, while ``log_enabled`` (the log's topic set) has no ``ioport``."""
    for dev in devices:
        get = getattr(dev, "native_port_io", None)
        paths = get() if get is not None else None
        if paths is None:
            continue
        for cpu in cpus:
            if cpu.port_hooks is None:
                continue
            for first, count in dev.ports():
                cpu.port_hooks.direct(first, count, dev, paths[0], paths[1], log_enabled)
