"""QEMU-style size and number parsing (``256M``, ``4G``, ``0x1000``)."""

from __future__ import annotations

_SUFFIX = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40,
           "P": 1 << 50, "E": 1 << 60}


def parse_size(text: str, default_suffix: str = "") -> int:
    """Parse ``text`` as a size: decimal with an optional K/M/G/T suffix, or ``0x`` hex.

    A hex number takes no suffix (as in QEMU).  ``default_suffix`` applies to a bare
    number, e.g. ``-m 256`` means 256 MiB.  Raises ``ValueError`` with a clear message.
    """
    s = text.strip()
    if not s:
        raise ValueError("empty size")
    if s.lower().startswith("0x"):
        try:
            return int(s, 16)
        except ValueError:
            raise ValueError(f"invalid size '{text}'") from None
    suffix = ""
    if s[-1].upper() in _SUFFIX and not s[-1].isdigit():
        suffix = s[-1].upper()
        s = s[:-1]
    elif default_suffix:
        suffix = default_suffix
    try:
        value = float(s) if "." in s else int(s, 10)
    except ValueError:
        raise ValueError(f"invalid size '{text}'") from None
    if value < 0:
        raise ValueError(f"invalid size '{text}'")
    result = int(value * _SUFFIX[suffix])
    if result >= 1 << 64:
        raise ValueError(f"size '{text}' is too large")
    return result
