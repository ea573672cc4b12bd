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


def _load() -> Any:
    if os.environ.get("PYVM_PURE_PYTHON", "") in ("1", "yes", "true"):
        return None
    if fastpath.IMPLEMENTATION != "cython":   # dirty bitmaps must be the native ones
        return None
    try:
        return importlib.import_module("pyvm._delivery")
    except ImportError:  # not built: the Python version gives the same results
        return None


_native: Any = _load()
IMPLEMENTATION: str = "cython" if _native is not None else "python"


class _Lib:
    """Our own function objects over Unicorn's library (argtypes set here cannot change
    how the binding calls the same functions)."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(ucmod.uclib._name, handle=ucmod.uclib._handle)
        lib.uc_context_alloc.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
        lib.uc_context_alloc.restype = ctypes.c_int
        lib.uc_context_free.argtypes = [ctypes.c_void_p]
        lib.uc_context_free.restype = ctypes.c_int
        self.lib = lib

    def address(self, name: str) -> int:
        value = ctypes.cast(getattr(self.lib, name), ctypes.c_void_p).value
        assert value
        return int(value)


_LIB: _Lib | None = None


class _Context:
    """A uc_context owned by one native delivery object (freed with it)."""

    def __init__(self, lib: _Lib, uch: Any) -> None:
        self._lib = lib
        ptr = ctypes.c_void_p()
        err = lib.lib.uc_context_alloc(uch, ctypes.byref(ptr))
        if err:
            import unicorn

            raise unicorn.UcError(err)
        self.address = int(ptr.value or 0)

    def __del__(self) -> None:
        if self.address:
            self._lib.lib.uc_context_free(ctypes.c_void_p(self.address))
            self.address = 0


def native_delivery(cpu: Any) -> Any:
    """The native delivery for ``cpu`` (a :class:`pyvm.cpu.VCpu`, which imports this
    module), or None when the Python version is to be used.

    Its ``deliver(vector, error_code)`` returns (status, detail, message); its C
    exception hook (``UC_HOOK_INTR``) is registered on the engine, and ``take()`` returns
    what it saw; see :class:`pyvm._delivery.Delivery`."""
    global _LIB
    if _native is None or len(cpu.ram.blocks) > _native.MAX_BLOCKS:
        return None
    if os.environ.get("PYVM_DELIVERY", "") == "python":     # read per vCPU (tests set it)
        return None
    if _LIB is None:
        _LIB = _Lib()
    lib = _LIB
    ctx = _Context(lib, cpu.uc._uch)
    functions = tuple(lib.address(n) for n in ("uc_reg_read", "uc_reg_write", "uc_vmem_translate",
                                               "uc_context_save", "uc_context_restore"))
    regs = tuple(int(getattr(X, "UC_X86_REG_" + n)) for n in _native.REGISTERS)
    blocks = [(b.gpa, b.size, b.host_address, int(b.dirty.words.ctypes.data)) for b in cpu.ram]
    hflags = cpu.internals.layout["hflags"]
    # keep: the context, and the bitmaps and RAM whose addresses the C side holds.
    keep = (ctx, [b.dirty for b in cpu.ram], list(cpu.ram))
    native = _native.Delivery(cpu.uc._uch.value, functions, ctx.address, hflags.offset,
                              cpu.wide, regs, blocks, keep)
    layout = cpu.internals.layout
    native.hook_exceptions(lib.address("uc_hook_add"), lib.address("uc_hook_del"),
                           lib.address("uc_emu_stop"), layout["error_code"].offset,
                           layout["exception_is_int"].offset, layout["old_exception"].offset)
    return native


STATUS_OK = 0
STATUS_FAULT = 1
STATUS_UNICORN_ERROR = 2
