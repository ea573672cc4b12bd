"""Sans-IO QMP input streamer: bytes in, parsed messages and parse errors out.

Mirrors qobject/json-streamer.c on top of :class:`~pyvm.qmp.json_lexer.JsonLexer`:
tokens are collected until braces and brackets balance (or go negative), then parsed.
A lexical error, or exceeding a limit, discards the collected tokens at once and
reports an error; parsing resumes with the next token, so a stray closing brace gets its
own ``expecting value``.  That is how the stream "recovers at the next balanced object".

Limits (all produce an error reply and leave the stream usable):

- total bytes of one message's tokens: ``JSON token size limit exceeded``
- number of tokens in one message: ``JSON token count limit exceeded``
- nesting depth: ``JSON nesting depth limit exceeded``

QEMU uses 64 MiB, 2 Mi tokens and 1024 levels.  pyvm keeps the nesting limit and uses
smaller size and count limits by default (a Python token costs far more memory than
QEMU's); :class:`JsonLimits` makes them configurable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from pyvm.qmp.json_lexer import JsonLexer, Tok, Token
from pyvm.qmp.json_parser import JsonSyntaxError, parse_tokens
from pyvm.qmp.mutf8 import decode_lossy

# qobject/json-streamer.c: MAX_TOKEN_SIZE, MAX_TOKEN_COUNT, MAX_NESTING
QEMU_MAX_TOKEN_SIZE = 64 << 20
QEMU_MAX_TOKEN_COUNT = 2 << 20
QEMU_MAX_NESTING = 1 << 10


@dataclass(frozen=True)
class JsonLimits:
    max_message_bytes: int = 8 << 20
    max_tokens: int = 512 << 10
    max_nesting: int = QEMU_MAX_NESTING


@dataclass(frozen=True)
class Parsed:
    """A complete JSON value from the stream."""

    value: Any


@dataclass(frozen=True)
class ParseError:
    """Malformed input; ``desc`` is QEMU's text, sent as a GenericError without ``id``."""

    desc: str


StreamItem = Union[Parsed, ParseError]


class JsonStreamer:
    """Feed bytes, get :data:`StreamItem` objects in input order."""

    def __init__(self, limits: JsonLimits | None = None) -> None:
        self.limits = limits or JsonLimits()
        self._lexer = JsonLexer(self.limits.max_message_bytes)
        self._tokens: list[Token] = []
        self._size = 0
        self._braces = 0
        self._brackets = 0

    def feed(self, data: bytes) -> list[StreamItem]:
        out: list[StreamItem] = []
        for token in self._lexer.feed(data):
            item = self._process(token)
            if item is not None:
                out.append(item)
        return out

    def _reset(self) -> None:
        self._tokens = []
        self._size = 0
        self._braces = 0
        self._brackets = 0

    def _process(self, token: Token) -> StreamItem | None:
        kind, raw = token
        if kind is Tok.LCURLY:
            self._braces += 1
        elif kind is Tok.RCURLY:
            self._braces -= 1
        elif kind is Tok.LSQUARE:
            self._brackets += 1
        elif kind is Tok.RSQUARE:
            self._brackets -= 1
        elif kind is Tok.ERROR:
            self._reset()
            return ParseError(f"JSON parse error, stray '{decode_lossy(raw)}'")
        limits = self.limits
        if self._size + len(raw) + 1 > limits.max_message_bytes:
            self._reset()
            return ParseError("JSON token size limit exceeded")
        if len(self._tokens) + 1 > limits.max_tokens:
            self._reset()
            return ParseError("JSON token count limit exceeded")
        if self._braces + self._brackets > limits.max_nesting:
            self._reset()
            return ParseError("JSON nesting depth limit exceeded")
        self._tokens.append(token)
        self._size += len(raw)
        if (self._braces > 0 or self._brackets > 0) and self._braces >= 0 \
                and self._brackets >= 0:
            return None
        tokens = self._tokens
        self._reset()
        try:
            return Parsed(parse_tokens(tokens))
        except JsonSyntaxError as err:
            return ParseError(str(err))
        except RecursionError:  # pragma: no cover - the parser is iterative
            return ParseError("JSON nesting depth limit exceeded")
