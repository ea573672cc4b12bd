"""Selects the native XBZRLE kernels (:mod:`pyvm._xbzrle`) or their pure-Python twin
(:mod:`pyvm.xbzrle_py`); ``PYVM_PURE_PYTHON=1`` forces the twin, as for
:mod:`pyvm.fastpath`.

``encode``/``decode`` are QEMU's page delta encoding (migration/xbzrle.c); ``pack_pages``
lays out a batch of a source's page records with the cache decision of migration/ram.c.
"""

from __future__ import annotations

from typing import Any

from pyvm import xbzrle_py
from pyvm.native_modules import load_native


_native: Any = load_native("pyvm._xbzrle")
impl: Any = _native if _native is not None else xbzrle_py
IMPLEMENTATION: str = impl.IMPLEMENTATION
encode = impl.encode
decode = impl.decode
pack_pages = impl.pack_pages

#: pack_pages counters, in order (indices into its int64 array)
COUNTERS = ("zero", "normal", "encoded", "hits", "bytes", "cache_miss", "overflow", "skipped")
#: ram.c ENCODING_FLAG_XBZRLE: the byte after an XBZRLE record's header
ENCODING_FLAG_XBZRLE = 0x01
#: room one record may take in pack_pages' output
RECORD_ROOM = xbzrle_py.RECORD_ROOM
