"""Which pages of this process's private anonymous memory were never populated.

Linux's ``/proc/self/pagemap`` (Documentation/admin-guide/mm/pagemap.rst) holds one
64-bit entry per virtual page: bit 63 "page present", bit 62 "page swapped".  A page of a
*private anonymous* mapping with neither bit set was never written (nor read: a read maps
the shared zero page, which is present), so it reads as zero.  Migration uses that to
skip the page faults that reading untouched guest RAM costs: the source sends such pages
as ZERO without reading them, and the destination knows which of its pages are still zero.

A page that was never populated but is write-protected with userfaultfd (dirty tracking,
:class:`pyvm.fastpath.HostWriteTracker`) holds a *pte marker* instead of nothing, and
pagemap shows it as "swapped" with bit 57 (uffd-wp) set and swap type 31 / offset 1
(``SWP_PTE_MARKER``, ``PTE_MARKER_UFFD_WP`` in include/linux/swapops.h): that exact entry
also means "never populated".

For any other mapping (shared, or backed by a file) an absent page may hold data, so
callers must only ask about private anonymous memory.  Where pagemap cannot be read
(not Linux, or /proc hidden), the answer is None and callers read the memory instead.
"""

from __future__ import annotations

import os
import threading

import numpy as np

PAGE_SHIFT = 12
_PRESENT_OR_SWAPPED = np.uint64(0b11 << 62)
# PM_SWAP | PM_UFFD_WP | swap type 31 (bits 0-4) | offset 1 (bits 5-54): a uffd-wp marker
_UFFD_WP_MARKER = np.uint64((1 << 62) | (1 << 57) | 31 | (1 << 5))
_MARKER_MASK = np.uint64((1 << 63) | (1 << 62) | (1 << 57) | ((1 << 55) - 1))

_lock = threading.Lock()
_fd: int | None = None
_unavailable = False


def _pagemap_fd() -> int | None:
    global _fd, _unavailable
    with _lock:
        if _fd is None and not _unavailable:
            try:
                _fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                _unavailable = True
        return _fd


def unpopulated_pages(address: int, npages: int) -> np.ndarray | None:
    """``mask[i]`` True when the page at ``address + i * 4096`` was never populated.

    ``address`` is page aligned.  Returns None when pagemap cannot be read.
    """
    if npages <= 0:
        return np.zeros(0, dtype=bool)
    fd = _pagemap_fd()
    if fd is None:
        return None
    want = npages * 8
    try:
        raw = os.pread(fd, want, (address >> PAGE_SHIFT) * 8)
    except OSError:
        return None
    if len(raw) != want:
        return None
    entries = np.frombuffer(raw, dtype=np.uint64)
    unpopulated: np.ndarray = ((entries & _PRESENT_OR_SWAPPED) == 0) | (
        (entries & _MARKER_MASK) == _UFFD_WP_MARKER)
    return unpopulated
