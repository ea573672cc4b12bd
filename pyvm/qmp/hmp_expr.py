"""Argument scanners of the human monitor (monitor/hmp.c): words, expressions, formats.

Expressions follow QEMU's grammar and precedence -- ``+ -`` bind loosest, then
``& | ^``, then ``* / %``, then unary ``+ - ~``, parentheses, ``'c'`` character constants,
``$reg`` CPU registers and C integer literals (``0x`` hex, leading ``0`` octal) -- and
compute in 64-bit two's complement.  Errors carry QEMU's texts.
"""

from __future__ import annotations

from typing import Callable

from pyvm.qmp.errors import HmpError
from pyvm.qmp.limits import MAX_EXPR_DEPTH, depth_error

RegisterLookup = Callable[[str], "int | None"]
_SPACE = " \t\n\r\f\v"
_REG_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.")


def _s64(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >> 63 else value


def skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _SPACE:
        pos += 1
    return pos


class _Expr:
    def __init__(self, text: str, pos: int, registers: RegisterLookup) -> None:
        self.text = text
        self.pos = pos
        self.registers = registers
        self.depth = 0               # nesting of unary operators and parentheses

    def ch(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def next(self) -> None:
        self.pos = skip_space(self.text, self.pos + 1)

    def unary(self) -> int:
        self.depth += 1
        if self.depth > MAX_EXPR_DEPTH:
            raise depth_error()
        try:
            return self._unary()
        finally:
            self.depth -= 1

    def _unary(self) -> int:
        c = self.ch()
        if c == "+":
            self.next()
            return self.unary()
        if c == "-":
            self.next()
            return _s64(-self.unary())
        if c == "~":
            self.next()
            return _s64(~self.unary())
        if c == "(":
            self.next()
            value = self.sum()
            if self.ch() != ")":
                raise HmpError("')' expected")
            self.next()
            return value
        if c == "'":
            self.pos += 1
            if not self.ch():
                raise HmpError("character constant expected")
            value = ord(self.ch())
            self.pos += 1
            if self.ch() != "'":
                raise HmpError("missing terminating ' character")
            self.next()
            return value
        if c == "$":
            self.pos += 1
            start = self.pos
            while self.ch() and self.ch() in _REG_CHARS:
                self.pos += 1
            name = self.text[start:self.pos]
            self.pos = skip_space(self.text, self.pos)
            reg = self.registers(name)
            if reg is None:
                raise HmpError("unknown register")
            return _s64(reg)
        if not c:
            raise HmpError("unexpected end of expression")
        return self.number()

    def number(self) -> int:
        """``strtoull(p, &end, 0)``."""
        text, pos = self.text, self.pos
        if text.startswith(("0x", "0X"), pos) and pos + 2 < len(text) \
                and text[pos + 2] in "0123456789abcdefABCDEF":
            base, start = 16, pos + 2
            digits = "0123456789abcdefABCDEF"
        elif text.startswith("0", pos):
            base, start, digits = 8, pos, "01234567"
        else:
            base, start, digits = 10, pos, "0123456789"
        end = start
        while end < len(text) and text[end] in digits:
            end += 1
        if end == pos:
            raise HmpError(f"invalid char '{self.ch()}' in expression")
        value = int(text[start:end], base)
        if value >= 1 << 64:
            raise HmpError("number too large")
        self.pos = skip_space(text, end)
        return _s64(value)

    def product(self) -> int:
        value = self.unary()
        while self.ch() and self.ch() in "*/%":
            op = self.ch()
            self.next()
            other = self.unary()
            if op == "*":
                value = _s64(value * other)
                continue
            if other == 0:
                raise HmpError("division by zero")
            quotient = abs(value) // abs(other)       # C truncates toward zero
            if (value < 0) != (other < 0):
                quotient = -quotient
            value = _s64(quotient) if op == "/" else _s64(value - quotient * other)
        return value

    def logic(self) -> int:
        value = self.product()
        while self.ch() and self.ch() in "&|^":
            op = self.ch()
            self.next()
            other = self.product()
            value = value & other if op == "&" else value | other if op == "|" \
                else value ^ other
        return value

    def sum(self) -> int:
        value = self.logic()
        while self.ch() and self.ch() in "+-":
            op = self.ch()
            self.next()
            other = self.logic()
            value = _s64(value + other if op == "+" else value - other)
        return value


def get_expr(text: str, pos: int, registers: RegisterLookup) -> tuple[int, int]:
    """Evaluate the expression at ``pos``: ``(value, position after it)``."""
    parser = _Expr(text, skip_space(text, pos), registers)
    return parser.sum(), parser.pos


def get_str(text: str, pos: int) -> tuple[str, int] | None:
    """A word or a double-quoted string (``\\n \\r \\\\ \\' \\"`` escapes); None if empty."""
    pos = skip_space(text, pos)
    if pos >= len(text):
        return None
    if text[pos] != '"':
        end = pos
        while end < len(text) and text[end] not in _SPACE:
            end += 1
        return text[pos:end], end
    out = []
    pos += 1
    while pos < len(text) and text[pos] != '"':
        c = text[pos]
        if c == "\\":
            pos += 1
            esc = text[pos] if pos < len(text) else ""
            mapped = {"n": "\n", "r": "\r", "\\": "\\", "'": "'", '"': '"'}.get(esc)
            if mapped is None:
                raise HmpError(f"unsupported escape code: '\\{esc}'")
            out.append(mapped)
        else:
            out.append(c)
        pos += 1
    if pos >= len(text):
        raise HmpError("unterminated string")
    return "".join(out), pos + 1


def get_format(text: str, pos: int, last_format: str, last_size: int
               ) -> tuple[int, str, int, int]:
    """A ``/fmt`` argument: ``(count, format, size, position)``; size -1 for ``i`` unsized."""
    pos = skip_space(text, pos)
    if not text.startswith("/", pos):
        return 1, last_format, (last_size if last_format != "i" else -1), pos
    pos += 1
    count = 1
    start = pos
    while pos < len(text) and text[pos].isdigit():
        pos += 1
    if pos > start:
        count = int(text[start:pos])
    fmt, size = "", -1
    sizes = {"b": 1, "h": 2, "w": 4, "g": 8, "L": 8}
    while pos < len(text):
        c = text[pos]
        if c in "oduxic":
            fmt = c
        elif c in sizes:
            size = sizes[c]
        else:
            break
        pos += 1
    if pos < len(text) and text[pos] not in _SPACE:
        raise HmpError(f"invalid char in format: '{text[pos]}'")
    fmt = fmt or last_format
    if fmt != "i" and size < 0:
        size = last_size
    return count, fmt, size, pos
