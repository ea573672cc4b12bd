"""The order in which QEMU prints the members of a JSON object.

QEMU keeps objects in a ``QDict``: a 512-bucket hash table whose iteration order is
bucket order, and within one bucket the most recently inserted key first
(qobject/qdict.c: ``tdb_hash``, ``QDICT_BUCKET_MAX``, ``QLIST_INSERT_HEAD``).  Clients
never depend on it, but byte-for-byte parity with QEMU's replies does, and the request
checker walks a request's members in this order too, which decides which error a
request with several faults gets.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Iterable

# qobject/qdict.c
QDICT_BUCKET_MAX = 512
_MASK32 = 0xFFFFFFFF


def mutf8_bytes(key: str) -> bytes:
    """``key`` as QEMU stores it: modified UTF-8 (U+0000 is ``C0 80``)."""
    return key.encode("utf-8", "surrogatepass").replace(b"\x00", b"\xc0\x80")


@lru_cache(maxsize=4096)
def bucket(key: str) -> int:
    """The QDict bucket of ``key`` (``tdb_hash(key) % QDICT_BUCKET_MAX``)."""
    raw = mutf8_bytes(key)
    value = (0x238F13AF * len(raw)) & _MASK32
    for i, byte in enumerate(raw):
        value = (value + (byte << (i * 5 % 24))) & _MASK32
    return ((1103515243 * value + 12345) & _MASK32) % QDICT_BUCKET_MAX


def qdict_order(keys: Iterable[str]) -> list[str]:
    """``keys`` (in insertion order) rearranged into QDict iteration order."""
    indexed = list(enumerate(keys))
    indexed.sort(key=lambda item: (bucket(item[1]), -item[0]))
    return [key for _, key in indexed]
