"""QMP output: JSON text exactly as QEMU's writer produces it (qobject/json-writer.c).

- ASCII only: ``\\" \\\\ \\b \\f \\n \\r \\t``; other code points below 0x20 or from 0x7F up
  as ``\\uXXXX`` with uppercase hex, beyond U+FFFF as a surrogate pair, and surrogates or
  noncharacters as ``\\uFFFD``.
- Separators ``", "`` and ``": "``; integers in decimal; floats as C's ``%.17g``.
- Object members in QDict order (:mod:`pyvm.qmp.key_order`).
- Optional pretty form: four-space indentation, ``{`` + newline + ``}`` for empty containers.

A monitor line is the text plus ``\\n``, and every ``\\n`` goes out as ``\\r\\n``
(monitor_puts), see :func:`encode_line`.  The writer is iterative: a client can nest an
``id`` 1024 levels deep and it is echoed back.
"""

from __future__ import annotations

import re
from typing import Any

from pyvm.qmp.key_order import qdict_order
from pyvm.qmp.mutf8 import is_valid_codepoint

_SIMPLE = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r",
           "\t": "\\t"}
_NEEDS_ESCAPE = re.compile(r'[^\x20\x21\x23-\x5b\x5d-\x7e]')


def _escape_char(match: re.Match[str]) -> str:
    ch = match.group(0)
    simple = _SIMPLE.get(ch)
    if simple is not None:
        return simple
    cp = ord(ch)
    if not is_valid_codepoint(cp):
        cp = 0xFFFD
    if cp > 0xFFFF:
        cp -= 0x10000
        return "\\u%04X\\u%04X" % (0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF))
    return "\\u%04X" % cp


def quote(text: str) -> str:
    """``text`` as a JSON string literal in QEMU's escaping."""
    return '"' + _NEEDS_ESCAPE.sub(_escape_char, text) + '"'


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "%.17g" % value
    if isinstance(value, str):
        return quote(value)
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def to_json(value: Any, pretty: bool = False) -> str:
    """Serialise ``value`` (dict/list/tuple/str/int/float/bool/None) as QEMU does."""
    if not isinstance(value, (dict, list, tuple)):
        return _scalar(value)
    out: list[str] = []
    comma = ", " if not pretty else ","

    def newline(depth: int) -> None:
        if pretty:
            out.append("\n" + " " * (4 * depth))

    # Each stack entry: (iterator over (key|None, child), is_object, first?)
    stack: list[list[Any]] = []

    def open_container(container: Any) -> None:
        if isinstance(container, dict):
            out.append("{")
            items = [(k, container[k]) for k in qdict_order(container)]
            stack.append([iter(items), True, True])
        else:
            out.append("[")
            stack.append([iter([(None, v) for v in container]), False, True])

    open_container(value)
    while stack:
        frame = stack[-1]
        item = next(frame[0], None)
        if item is None:
            stack.pop()
            newline(len(stack))
            out.append("}" if frame[1] else "]")
            continue
        key, child = item
        if frame[2]:
            frame[2] = False
            newline(len(stack))
        else:
            out.append(comma)
            newline(len(stack))
        if frame[1]:
            out.append(quote(key))
            out.append(": ")
        if isinstance(child, (dict, list, tuple)):
            open_container(child)
        else:
            out.append(_scalar(child))
    return "".join(out)


def encode_line(value: Any, pretty: bool = False) -> bytes:
    """One monitor output line: JSON text, then newline, with every ``\\n`` sent as CRLF."""
    text = to_json(value, pretty)
    if pretty:
        text = text.replace("\n", "\r\n")
    return text.encode("ascii") + b"\r\n"
