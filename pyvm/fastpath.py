"""Selects the native kernels (:mod:`pyvm._fastpath`, :mod:`pyvm._pagestream`) or their
pure-Python twins (:mod:`pyvm.fastpath_py`, :mod:`pyvm.pagestream_py`).

``PYVM_PURE_PYTHON=1`` forces the twins.  Everything else in pyvm imports from here::

    from pyvm.fastpath import DirtyBitmap, find_zero_pages, track_writes
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

from pyvm import fastpath_py, pagestream_py
from pyvm.native_modules import load_native


_native: Any = load_native("pyvm._fastpath")
_native_stream: Any = load_native("pyvm._pagestream")

impl: Any = _native if _native is not None else fastpath_py
stream_impl: Any = _native_stream if _native_stream is not None else pagestream_py
IMPLEMENTATION: str = impl.IMPLEMENTATION
DirtyBitmap = impl.DirtyBitmap
find_zero_pages = impl.find_zero_pages
find_zero_pages_at = impl.find_zero_pages_at
load_page_run = stream_impl.load_page_run
RecordBatch = stream_impl.RecordBatch
bitmap_to_indices = impl.bitmap_to_indices
pages_equal = impl.pages_equal
PAGE_SIZE = 4096


def slice_stopper(uc: Any) -> Any:
    """A stopper for engine ``uc``: ``request()`` (any thread) ends the current run at the
    next translation block, exactly; ``stops`` counts the runs it ended."""
    if impl is fastpath_py:
        return fastpath_py.SliceStopper(uc)
    # Deferred (here and below): importing Unicorn loads libunicorn; the stream codec and
    # its tests use this module's page kernels without an engine.
    from unicorn.unicorn_py3 import unicorn as ucmod

    add, delete = _uc_functions()
    stop = ctypes.cast(ucmod.uclib.uc_emu_stop, ctypes.c_void_p).value
    return _native.SliceStopper(uc._uch.value, add, delete, stop)


def _uc_functions() -> tuple[int, int]:
    from unicorn.unicorn_py3 import unicorn as ucmod

    lib = ucmod.uclib
    add = ctypes.cast(lib.uc_hook_add, ctypes.c_void_p).value
    delete = ctypes.cast(lib.uc_hook_del, ctypes.c_void_p).value
    assert add and delete
    return add, delete


def track_writes(uc: Any, bitmap: Any, base: int, size: int, implementation: Any = None) -> Any:
    """Register a write hook on Unicorn engine ``uc`` marking ``bitmap`` for [base, base+size).

    The engine must not be running (call between time slices).  Returns an object with
    ``detach()``.  ``implementation`` (a module) overrides the automatic choice; the
    bitmap must come from the same module.
    """
    chosen = implementation or impl
    if chosen is fastpath_py:
        return fastpath_py.WriteTracker(uc, bitmap, base, size)
    add, delete = _uc_functions()
    return _native.WriteTracker(uc._uch.value, add, delete, bitmap, base, size)


def track_host_writes(bitmap: Any, host_address: int, size: int,
                      implementation: Any = None) -> Any:
    """Track every write to host memory [host_address, host_address+size) into ``bitmap``
    (one RAM block), with asynchronous userfaultfd write-protect; None when this kernel,
    this process's rights or this kind of memory do not allow it.

    While attached, ``bitmap.fetch_and_clear()`` also returns the pages written since the
    previous call; ``detach()`` ends it.  Guest stores keep TCG's fast path: only the
    first write to a page after each sync takes a (kernel-only) minor fault.
    """
    chosen = implementation or impl
    if os.environ.get("PYVM_DIRTY_TRACKING", "") == "hook":
        return None
    try:
        return chosen.HostWriteTracker(bitmap, host_address, size)
    except OSError:
        return None


def flush_tlb(uc: Any) -> None:
    """Drop every TLB entry and translation block of engine ``uc`` (uc_ctl UC_CTL_TLB_FLUSH).

    Needed after adding or removing a write hook: Unicorn decides at TLB fill time whether
    stores to a page take the fast path, which never calls hooks.
    """
    from unicorn import unicorn_const as uc_const     # deferred: see slice_stopper

    uc.ctl(uc_const.UC_CTL_TLB_FLUSH, uc_const.UC_CTL_IO_WRITE)
