"""Modified UTF-8 as QEMU's JSON code reads it (util/unicode.c).

Modified UTF-8 is UTF-8 in which U+0000 is written ``C0 80``.  A sequence is invalid
when it is truncated, overlong (except ``C0 80``), a surrogate, beyond U+10FFFF, or one
of Unicode's 66 noncharacters.  The JSON parser rejects strings with an invalid
sequence; the JSON writer prints each invalid sequence as U+FFFD.
"""

from __future__ import annotations

import re

# util/unicode.c: smallest code point per sequence length 2..6 (anything below is overlong).
_MIN_CP = (0x80, 0x800, 0x10000, 0x200000, 0x4000000)
# U+FDD0..U+FDEF and U+xxFFFE/U+xxFFFF in every plane.
_NONCHAR = re.compile("[\ufdd0-\ufdef\ufffe\uffff\U0001fffe\U0001ffff\U0002fffe\U0002ffff"
                      "\U0003fffe\U0003ffff\U0004fffe\U0004ffff\U0005fffe\U0005ffff"
                      "\U0006fffe\U0006ffff\U0007fffe\U0007ffff\U0008fffe\U0008ffff"
                      "\U0009fffe\U0009ffff\U000afffe\U000affff\U000bfffe\U000bffff"
                      "\U000cfffe\U000cffff\U000dfffe\U000dffff\U000efffe\U000effff"
                      "\U000ffffe\U000fffff\U0010fffe\U0010ffff]")


def is_valid_codepoint(cp: int) -> bool:
    """False for surrogates, noncharacters and anything beyond U+10FFFF."""
    if cp < 0 or cp > 0x10FFFF:
        return False
    if 0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE:
        return False
    return not 0xD800 <= cp <= 0xDFFF


def codepoint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """Decode one sequence at ``data[pos:end]``: ``(code point or -1, next position)``.

    The next position follows util/unicode.c ``mod_utf8_codepoint``: an impossible byte
    or stray continuation byte advances by one; a truncated sequence advances past the
    continuation bytes that were there.
    """
    if pos >= end or data[pos] == 0:
        return -1, pos
    byte = data[pos]
    pos += 1
    if byte < 0x80:
        return byte, pos
    if byte >= 0xFE or not byte & 0x40:
        return -1, pos
    length = 0
    mask = 0x80
    while byte & mask:
        length += 1
        mask >>= 1
    cp = byte & (mask - 1)
    for _ in range(1, length):
        nxt = data[pos] if pos < end else 0
        if nxt & 0xC0 != 0x80:
            return -1, pos
        pos += 1
        cp = (cp << 6) | (nxt & 0x3F)
    if not is_valid_codepoint(cp):
        return -1, pos
    if cp < _MIN_CP[length - 2] and not (cp == 0 and length == 2):
        return -1, pos
    return cp, pos


def decode_strict(data: bytes) -> str | None:
    """``data`` as text, or None when it holds an invalid sequence (parser semantics)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        if _NONCHAR.search(text) is None:
            return text
    out: list[str] = []
    pos, end = 0, len(data)
    while pos < end:
        cp, pos = codepoint(data, pos, end)
        if cp < 0:
            return None
        out.append(chr(cp))
    return "".join(out)


def decode_lossy(data: bytes) -> str:
    """``data`` as QEMU's JSON writer prints a C string: stop at NUL, bad sequences -> U+FFFD."""
    nul = data.find(b"\x00")
    if nul >= 0:
        data = data[:nul]
    out: list[str] = []
    pos, end = 0, len(data)
    while pos < end:
        cp, pos = codepoint(data, pos, end)
        out.append("\ufffd" if cp < 0 else chr(cp))
    return "".join(out)
