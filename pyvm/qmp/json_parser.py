"""Tokens of one complete message -> a Python value, with QEMU's parse errors.

Follows qobject/json-parser.c: the first error wins and its text is
``JSON parse error, <reason>``.  Values map to Python as: object -> dict, array -> list,
string -> str, integer -> int (QEMU keeps int64, else uint64, else double: an integer
beyond both ranges becomes a float), number with fraction/exponent -> float, and
true/false/null.  Objects reject duplicate keys.

The parser is iterative so that the 1024 nesting levels the streamer allows do not hit
Python's recursion limit.
"""

from __future__ import annotations

from typing import Any

from pyvm.qmp.json_lexer import Tok, Token
from pyvm.qmp.mutf8 import decode_strict, is_valid_codepoint

_INT64_MIN = -(1 << 63)
_UINT64_MAX = (1 << 64) - 1
_ESCAPES = {0x22: '"', 0x27: "'", 0x5C: "\\", 0x2F: "/", 0x62: "\b", 0x66: "\f",
            0x6E: "\n", 0x72: "\r", 0x74: "\t"}
_HEX = frozenset(b"0123456789abcdefABCDEF")


class JsonSyntaxError(Exception):
    """Internal signal of the parser; the streamer turns it into a reply."""

    def __init__(self, reason: str) -> None:
        super().__init__("JSON parse error, " + reason)


def _hex4(raw: bytes, pos: int) -> int:
    """QEMU's ``cvt4hex``: four hex digits at ``pos`` or -1."""
    chunk = raw[pos:pos + 4]
    if len(chunk) < 4 or any(b not in _HEX for b in chunk):
        return -1
    return int(chunk, 16)


def parse_string(raw: bytes) -> str:
    """Decode a string token (with its quotes) as ``parse_string`` does."""
    end = len(raw) - 1            # index of the closing quote
    body = raw[1:end]
    if b"\\" not in body:
        text = decode_strict(body)
        if text is None:
            raise JsonSyntaxError("invalid UTF-8 sequence in string")
        return text
    out: list[str] = []
    pos = 1
    while pos < end:
        nxt = raw.find(b"\\", pos, end)
        stop = end if nxt < 0 else nxt
        if stop > pos:
            text = decode_strict(raw[pos:stop])
            if text is None:
                raise JsonSyntaxError("invalid UTF-8 sequence in string")
            out.append(text)
            pos = stop
            continue
        beg = pos
        kind = raw[pos + 1]
        pos += 2
        simple = _ESCAPES.get(kind)
        if simple is not None:
            out.append(simple)
            continue
        if kind != 0x75:          # 'u'
            raise JsonSyntaxError("invalid escape sequence in string")
        cp = _hex4(raw, pos)
        pos += 4
        if 0xD800 <= cp <= 0xDBFF and raw[pos:pos + 2] == b"\\u":
            trailing = _hex4(raw, pos + 2)
            if 0xDC00 <= trailing <= 0xDFFF:
                cp = 0x10000 + ((cp & 0x3FF) << 10) + (trailing & 0x3FF)
                pos += 6
            else:
                cp = -1
        if not is_valid_codepoint(cp):
            # The message quotes the escape as C's "%.*s" would: cut at the token's end.
            shown = raw[beg:min(pos, len(raw))].decode("latin-1")
            raise JsonSyntaxError(f"{shown} is not a valid Unicode character")
        out.append(chr(cp))
    return "".join(out)


def _number(kind: Tok, raw: bytes) -> int | float:
    if kind is Tok.INTEGER:
        value = int(raw)
        if _INT64_MIN <= value <= _UINT64_MAX:
            return value
    return float(raw)


_OBJ_KEY, _OBJ_VALUE = 0, 1


def parse_tokens(tokens: list[Token]) -> Any:
    """Parse one message; raises :class:`JsonSyntaxError` with QEMU's text."""
    pos = 0
    n = len(tokens)
    # Frames: [container, is_object, stage, pending key]
    stack: list[list[Any]] = []
    value: Any = None
    want_value = True
    while True:
        if want_value:
            if pos >= n:
                raise JsonSyntaxError("premature EOI")
            kind, raw = tokens[pos]
            if kind is Tok.LCURLY or kind is Tok.LSQUARE:
                pos += 1
                if pos >= n:
                    raise JsonSyntaxError("premature EOI")
                closer = Tok.RCURLY if kind is Tok.LCURLY else Tok.RSQUARE
                if tokens[pos][0] is closer:
                    pos += 1
                    value = {} if kind is Tok.LCURLY else []
                    want_value = False
                else:
                    if kind is Tok.LCURLY:
                        stack.append([{}, True, _OBJ_KEY, None])
                    else:
                        stack.append([[], False, 0, None])
                continue
            pos += 1
            if kind is Tok.STRING:
                value = parse_string(raw)
            elif kind is Tok.INTEGER or kind is Tok.FLOAT:
                value = _number(kind, raw)
            elif kind is Tok.KEYWORD:
                if raw == b"true":
                    value = True
                elif raw == b"false":
                    value = False
                elif raw == b"null":
                    value = None
                else:
                    raise JsonSyntaxError(f"invalid keyword '{raw.decode('latin-1')}'")
            else:
                raise JsonSyntaxError("expecting value")
            want_value = False
            continue

        if not stack:
            return value
        frame = stack[-1]
        container = frame[0]
        if frame[1]:
            if frame[2] == _OBJ_KEY:
                if not isinstance(value, str):
                    raise JsonSyntaxError("key is not a string in object")
                frame[3] = value
                if pos >= n:
                    raise JsonSyntaxError("premature EOI")
                if tokens[pos][0] is not Tok.COLON:
                    raise JsonSyntaxError("missing : in object pair")
                pos += 1
                frame[2] = _OBJ_VALUE
                want_value = True
                continue
            if frame[3] in container:
                raise JsonSyntaxError("duplicate key")
            container[frame[3]] = value
            if pos >= n:
                raise JsonSyntaxError("premature EOI")
            sep = tokens[pos][0]
            pos += 1
            if sep is Tok.RCURLY:
                stack.pop()
                value = container
                continue
            if sep is not Tok.COMMA:
                raise JsonSyntaxError("expected separator in dict")
            if pos >= n:
                raise JsonSyntaxError("premature EOI")
            frame[2] = _OBJ_KEY
            want_value = True
            continue
        container.append(value)
        if pos >= n:
            raise JsonSyntaxError("premature EOI")
        sep = tokens[pos][0]
        pos += 1
        if sep is Tok.RSQUARE:
            stack.pop()
            value = container
            continue
        if sep is not Tok.COMMA:
            raise JsonSyntaxError("expected separator in list")
        want_value = True
