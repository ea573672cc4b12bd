"""Sans-IO JSON lexer with QEMU's token rules (qobject/json-lexer.c).

The lexer is fed bytes and returns tokens; it keeps a partial token across feeds, so a
request may arrive in any number of pieces.  Its rules follow QEMU's state table:

- tokens are ``{ } [ ] : ,``, strings in double *or single* quotes (``\\'`` is an escape
  in both), numbers, and keywords ``[a-z]+`` (the parser rejects unknown ones);
- a byte that cannot continue the current token is consumed into an ERROR token, after
  which input is skipped until a structural character ``[ ] { } : ,``, an ASCII control
  character other than TAB, or the impossible bytes 0xFE/0xFF;
- a token longer than ``max_token_size`` is cut and handed on as OVERSIZE (the streamer
  turns that into ``JSON token size limit exceeded``) and lexing restarts.

Hot loops use regular expressions over runs (string bodies, digits, whitespace) instead
of one Python step per byte; the result is the same as QEMU's byte-at-a-time table.
"""

from __future__ import annotations

import enum
import re


class Tok(enum.IntEnum):
    LCURLY = 1
    RCURLY = 2
    LSQUARE = 3
    RSQUARE = 4
    COLON = 5
    COMMA = 6
    INTEGER = 7
    FLOAT = 8
    KEYWORD = 9
    STRING = 10
    ERROR = 11      # a lexical error; the text is what was consumed
    OVERSIZE = 12   # a token cut at the size limit


Token = tuple[Tok, bytes]

_STRUCTURAL = {ord("{"): Tok.LCURLY, ord("}"): Tok.RCURLY, ord("["): Tok.LSQUARE,
               ord("]"): Tok.RSQUARE, ord(":"): Tok.COLON, ord(","): Tok.COMMA}
_STRUCT_BYTES = {tok: bytes([ch]) for ch, tok in _STRUCTURAL.items()}


class _S(enum.IntEnum):
    START = 0
    RECOVERY = 1
    DQ = 2
    DQ_ESC = 3
    SQ = 4
    SQ_ESC = 5
    ZERO = 6
    SIGN = 7
    DIGITS = 8
    MANTISSA = 9
    MANTISSA_DIGITS = 10
    EXP_E = 11
    EXP_SIGN = 12
    EXP_DIGITS = 13
    KEYWORD = 14


_WS = re.compile(rb"[ \t\r\n]+")
# String bodies: bytes 0x20..0xFD except the backslash and the closing quote.
_DQ_RUN = re.compile(rb'[\x20\x21\x23-\x5b\x5d-\xfd]+')
_SQ_RUN = re.compile(rb"[\x20-\x26\x28-\x5b\x5d-\xfd]+")
_DIGIT_RUN = re.compile(rb"[0-9]+")
_KEYWORD_RUN = re.compile(rb"[a-z]+")
# Recovery skips 0x20..0xFD and TAB except the structural characters.
_RECOVERY_RUN = re.compile(rb"[\t\x20-\x2b\x2d-\x39\x3b-\x5a\x5c\x5e-\x7a\x7c\x7e-\xfd]+")

_DIGITS = frozenset(b"0123456789")
_LOWER = frozenset(b"abcdefghijklmnopqrstuvwxyz")
_RUN_FOR = {_S.DQ: _DQ_RUN, _S.SQ: _SQ_RUN, _S.DIGITS: _DIGIT_RUN,
            _S.MANTISSA_DIGITS: _DIGIT_RUN, _S.EXP_DIGITS: _DIGIT_RUN,
            _S.KEYWORD: _KEYWORD_RUN}
# QEMU's MAX_TOKEN_SIZE (qobject/json-lexer.c) is 64 MiB.
QEMU_MAX_TOKEN_SIZE = 64 << 20


class JsonLexer:
    """Turns bytes into :data:`Token` tuples; see the module docstring for the rules."""

    def __init__(self, max_token_size: int = QEMU_MAX_TOKEN_SIZE) -> None:
        self.max_token_size = max_token_size
        self._state = _S.START
        self._token = bytearray()

    def feed(self, data: bytes) -> list[Token]:
        out: list[Token] = []
        state = self._state
        tok = self._token
        limit = self.max_token_size + 1
        i, n = 0, len(data)
        while i < n:
            if state is _S.START:
                ch = data[i]
                struct = _STRUCTURAL.get(ch)
                if struct is not None:
                    out.append((struct, _STRUCT_BYTES[struct]))
                    i += 1
                    continue
                if ch in b" \t\r\n":
                    m = _WS.match(data, i)
                    assert m is not None
                    i = m.end()
                    continue
                tok.append(ch)
                i += 1
                if ch == 0x22:
                    state = _S.DQ
                elif ch == 0x27:
                    state = _S.SQ
                elif ch == 0x30:
                    state = _S.ZERO
                elif ch in _DIGITS:
                    state = _S.DIGITS
                elif ch == 0x2D:
                    state = _S.SIGN
                elif ch in _LOWER:
                    state = _S.KEYWORD
                else:
                    state = self._error(out, tok)
                    continue
            elif state is _S.RECOVERY:
                m = _RECOVERY_RUN.match(data, i)
                if m is not None:
                    i = m.end()
                if i < n:
                    state = _S.START      # lookahead: the byte is lexed again from START
                continue
            else:
                run = _RUN_FOR.get(state)
                if run is not None:
                    m = run.match(data, i, min(n, i + limit - len(tok)))
                    if m is not None:
                        tok += data[i:m.end()]
                        i = m.end()
                        if len(tok) >= limit:
                            out.append((Tok.OVERSIZE, bytes(tok)))
                            tok.clear()
                            state = _S.START
                            continue
                        if i >= n:
                            break
                state, consumed = self._step(state, data[i], tok, out)
                if consumed:
                    i += 1
                    if len(tok) >= limit:
                        out.append((Tok.OVERSIZE, bytes(tok)))
                        tok.clear()
                        state = _S.START
        self._state = state
        return out

    @staticmethod
    def _error(out: list[Token], tok: bytearray) -> _S:
        out.append((Tok.ERROR, bytes(tok)))
        tok.clear()
        return _S.RECOVERY

    def _step(self, state: _S, ch: int, tok: bytearray, out: list[Token]) -> tuple[_S, bool]:
        """One table transition at byte ``ch``: ``(new state, byte consumed?)``."""
        if state is _S.DQ or state is _S.SQ:
            quote = 0x22 if state is _S.DQ else 0x27
            tok.append(ch)
            if ch == quote:
                out.append((Tok.STRING, bytes(tok)))
                tok.clear()
                return _S.START, True
            if ch == 0x5C:
                return (_S.DQ_ESC if state is _S.DQ else _S.SQ_ESC), True
            return self._error(out, tok), True
        if state is _S.DQ_ESC or state is _S.SQ_ESC:
            tok.append(ch)
            if 0x20 <= ch <= 0xFD:
                return (_S.DQ if state is _S.DQ_ESC else _S.SQ), True
            return self._error(out, tok), True
        if state is _S.ZERO:
            if ch == 0x2E:
                tok.append(ch)
                return _S.MANTISSA, True
            if ch in _DIGITS:
                tok.append(ch)
                return self._error(out, tok), True
            return self._emit(out, tok, Tok.INTEGER), False
        if state is _S.DIGITS:
            if ch == 0x2E:
                tok.append(ch)
                return _S.MANTISSA, True
            if ch in b"eE":
                tok.append(ch)
                return _S.EXP_E, True
            return self._emit(out, tok, Tok.INTEGER), False
        if state is _S.MANTISSA_DIGITS:
            if ch in b"eE":
                tok.append(ch)
                return _S.EXP_E, True
            return self._emit(out, tok, Tok.FLOAT), False
        if state is _S.EXP_DIGITS:
            return self._emit(out, tok, Tok.FLOAT), False
        if state is _S.KEYWORD:
            return self._emit(out, tok, Tok.KEYWORD), False
        tok.append(ch)
        if state is _S.SIGN:
            if ch == 0x30:
                return _S.ZERO, True
            if ch in _DIGITS:
                return _S.DIGITS, True
        elif state is _S.MANTISSA or state is _S.EXP_SIGN:
            if ch in _DIGITS:
                return (_S.MANTISSA_DIGITS if state is _S.MANTISSA else _S.EXP_DIGITS), True
        elif state is _S.EXP_E:
            if ch in b"+-":
                return _S.EXP_SIGN, True
            if ch in _DIGITS:
                return _S.EXP_DIGITS, True
        return self._error(out, tok), True

    @staticmethod
    def _emit(out: list[Token], tok: bytearray, kind: Tok) -> _S:
        out.append((kind, bytes(tok)))
        tok.clear()
        return _S.START
