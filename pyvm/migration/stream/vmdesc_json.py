"""JSON text exactly as QEMU's JSONWriter writes it in non-pretty mode (qobject/json-writer.c).

The vmdesc trailer of a migration stream is written with this style: members separated by
``", "``, names followed by ``": "``, no space after ``{``/``[``, keys in insertion order.
Strings escape ``"`` ``\\`` ``\\b`` ``\\f`` ``\\n`` ``\\r`` ``\\t``; every other code point
below 0x20 or from 0x7F up is written as ``\\uXXXX`` with upper-case hex digits (a surrogate
pair above U+FFFF).  Python's ``json.dumps`` differs in the hex case and in 0x7F, so pyvm
writes its own.
"""

from __future__ import annotations

import json
import re
from typing import Any

# Printable ASCII except '"' and '\\': written as is (nearly every vmdesc string).
_PLAIN = re.compile(r'[ !#-\[\]-~]*')
_SIMPLE_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n",
                   "\r": "\\r", "\t": "\\t"}


def quote(text: str) -> str:
    """``text`` as a JSON string literal, escaped as QEMU escapes it."""
    if _PLAIN.fullmatch(text):
        return f'"{text}"'
    out = ['"']
    for ch in text:
        cp = ord(ch)
        if ch in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[ch])
        elif 0x20 <= cp < 0x7F:
            out.append(ch)
        elif cp > 0xFFFF:
            cp -= 0x10000
            out.append(f"\\u{0xD800 + (cp >> 10):04X}\\u{0xDC00 + (cp & 0x3FF):04X}")
        else:
            out.append(f"\\u{cp:04X}")
    out.append('"')
    return "".join(out)


def dumps(value: Any) -> str:
    """Serialize dicts (in insertion order), lists, str, int, bool and None."""
    # The C encoder of the json module writes the same text whenever no string needs a
    # \\u escape (it would use lower-case hex) and none holds 0x7F (it would not escape it).
    text = json.dumps(value, separators=(", ", ": "), check_circular=False)
    if "\\u" not in text and "\x7f" not in text:
        return text
    parts: list[str] = []
    _write(value, parts)
    return "".join(parts)


def _write(value: Any, out: list[str]) -> None:
    if isinstance(value, dict):
        out.append("{")
        for i, (key, item) in enumerate(value.items()):
            if i:
                out.append(", ")
            out.append(quote(str(key)))
            out.append(": ")
            _write(item, out)
        out.append("}")
    elif isinstance(value, (list, tuple)):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(", ")
            _write(item, out)
        out.append("]")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif value is None:
        out.append("null")
    elif isinstance(value, int):
        out.append(str(int(value)))
    elif isinstance(value, str):
        out.append(quote(value))
    else:
        raise TypeError(f"vmdesc JSON cannot hold {type(value).__name__}")
