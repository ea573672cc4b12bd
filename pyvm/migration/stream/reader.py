"""Stream primitives, reading side: a buffer that is fed bytes and read by parse steps.

The decoder is push-style (sans-IO): the caller feeds whatever bytes arrived, and parsing
goes as far as they allow.  Parse steps are written as plain sequential code in generator
functions; a step that needs more bytes than are buffered waits with::

    value = yield from reader.read_be32("section id")

which suspends the generator until enough input has been fed.  When the input ends
(:meth:`StreamReader.close`) while a step is waiting, the wait raises
:class:`TruncatedStreamError` naming what was being read.

Nothing a peer sends is trusted: counted strings are at most 255 bytes by construction,
every other length is checked by the layer that reads it before it waits for that many
bytes.  Once an error was recorded (:meth:`StreamReader.fail`) the reader is dead: it
refuses more input with :class:`DecoderStoppedError` (QEMU's sticky ``QEMUFile`` error).

Hot paths (RAM page records) may parse straight from :attr:`StreamReader.buffer` between
:attr:`StreamReader.pos` and :attr:`StreamReader.end`, then move ``pos`` forward; they must
not keep a memoryview of the buffer across a ``yield``.  The buffer has room beyond ``end``
so that a transport can read straight into it (:meth:`StreamReader.fill`): page data is
copied once, from the buffer into guest RAM.
"""

from __future__ import annotations

import struct
from typing import Callable, Generator

from pyvm.migration.errors import DecoderStoppedError, MigrationError, TruncatedStreamError

#: A parse step: yields (nothing) while it waits for input, returns its result.
Step = Generator[None, None, "object"]

_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")

_INITIAL_CAPACITY = 1 << 16


class StreamReader:
    """Bytes fed by the caller, consumed in order by parse steps.

    ``buffer[pos:end]`` holds the bytes not consumed yet; ``buffer`` is longer than ``end``
    (spare room for the next input).
    """

    def __init__(self) -> None:
        self.buffer = bytearray(_INITIAL_CAPACITY)
        self.pos = 0
        self.end = 0
        self._base = 0               # stream offset of buffer[0]
        self.closed = False          # no more input will come
        self.error: MigrationError | None = None
        # A running digest over consumed bytes (section checksums, pyvm.migration.stream.integrity)
        self._digest: Callable[[int, memoryview], int] | None = None
        self._digest_pos = 0
        self._digest_value = 0

    # -- input ---------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.error is not None:
            raise DecoderStoppedError(f"migration stream decoder stopped after an error: {self.error}",
                                      errno=self.error.errno) from self.error
        if self.closed:
            raise DecoderStoppedError("migration stream input was already closed")

    def _make_room(self, n: int) -> None:
        """At least ``n`` bytes of room after ``end``: consumed bytes are dropped first
        (the unconsumed tail moves to the front), then the buffer grows if need be."""
        if len(self.buffer) - self.end >= n:
            return
        keep = self.end - self.pos
        if self.pos:
            if self._digest is not None:
                self._fold_digest()
                self._digest_pos = 0
            self.buffer[:keep] = self.buffer[self.pos:self.end]
            self._base += self.pos
            self.pos, self.end = 0, keep
        if len(self.buffer) - keep < n:
            self.buffer.extend(bytes(max(n + keep, 2 * len(self.buffer)) - len(self.buffer)))

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append input; refused once the reader has failed or was closed."""
        self._check_open()
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        self._make_room(n)
        self.buffer[self.end:self.end + n] = data
        self.end += n

    def fill(self, readinto: Callable[[memoryview], int], size: int) -> int:
        """Let ``readinto`` write up to ``size`` bytes of input straight into the buffer;
        returns what it read (0: end of input, as the transport says)."""
        self._check_open()
        self._make_room(size)
        view = memoryview(self.buffer)
        room = view[self.end:self.end + size]
        try:
            n = readinto(room)
        finally:            # the buffer must not stay exported: it may have to grow
            room.release()
            view.release()
        self.end += n
        return n

    def close(self) -> None:
        """Mark the end of input: a step still waiting will raise TruncatedStreamError."""
        self.closed = True

    def fail(self, error: MigrationError) -> None:
        """Record the first error; the reader refuses input from now on."""
        if self.error is None:
            self.error = error

    # -- digest of consumed bytes ------------------------------------------------------------
    def begin_digest(self, fold: Callable[[int, memoryview], int], initial: int = 0) -> None:
        """Start a digest of the bytes consumed from here on, from ``initial``;
        ``fold(value, bytes)`` extends it (e.g. a CRC).  Bytes are folded before the
        buffer drops them."""
        self._digest = fold
        self._digest_pos = self.pos
        self._digest_value = initial

    def end_digest(self) -> int:
        """The digest of the bytes consumed since :meth:`begin_digest`; stops it."""
        if self._digest is None:
            return 0
        self._fold_digest()
        self._digest = None
        return self._digest_value

    def _fold_digest(self) -> None:
        assert self._digest is not None
        if self.pos > self._digest_pos:
            with memoryview(self.buffer) as view:
                part = view[self._digest_pos:self.pos]
                self._digest_value = self._digest(self._digest_value, part)
                part.release()
        self._digest_pos = self.pos

    # -- position ------------------------------------------------------------------------
    @property
    def available(self) -> int:
        return self.end - self.pos

    @property
    def offset(self) -> int:
        """Stream offset of the next byte to read."""
        return self._base + self.pos

    # -- waiting -------------------------------------------------------------------------
    def wait(self, n: int, what: str) -> Generator[None, None, None]:
        """Suspend until ``n`` bytes are buffered; at end of input raise TruncatedStreamError."""
        while self.end - self.pos < n:
            if self.closed:
                raise TruncatedStreamError(what=what, offset=self.offset)
            yield

    def wait_or_end(self, n: int) -> Generator[None, None, bool]:
        """Like :meth:`wait`, but return False instead of raising at end of input (peeks)."""
        while self.end - self.pos < n:
            if self.closed:
                return False
            yield
        return True

    # -- reads of buffered bytes (the caller made sure they are there) ---------------------
    def u8(self) -> int:
        value = self.buffer[self.pos]
        self.pos += 1
        return value

    def be16(self) -> int:
        (value,) = _BE16.unpack_from(self.buffer, self.pos)
        self.pos += 2
        return int(value)

    def be32(self) -> int:
        (value,) = _BE32.unpack_from(self.buffer, self.pos)
        self.pos += 4
        return int(value)

    def be64(self) -> int:
        (value,) = _BE64.unpack_from(self.buffer, self.pos)
        self.pos += 8
        return int(value)

    def take(self, n: int) -> bytes:
        data = bytes(self.buffer[self.pos:self.pos + n])
        self.pos += n
        return data

    def peek(self, n: int, skip: int = 0) -> bytes:
        return bytes(self.buffer[self.pos + skip:self.pos + skip + n])

    def skip(self, n: int) -> None:
        self.pos += n

    # -- waiting reads (parse steps: ``x = yield from reader.read_be32(...)``) -------------
    def read_u8(self, what: str) -> Generator[None, None, int]:
        if self.end - self.pos < 1:
            yield from self.wait(1, what)
        return self.u8()

    def read_be16(self, what: str) -> Generator[None, None, int]:
        if self.end - self.pos < 2:
            yield from self.wait(2, what)
        return self.be16()

    def read_be32(self, what: str) -> Generator[None, None, int]:
        if self.end - self.pos < 4:
            yield from self.wait(4, what)
        return self.be32()

    def read_be64(self, what: str) -> Generator[None, None, int]:
        if self.end - self.pos < 8:
            yield from self.wait(8, what)
        return self.be64()

    def read_bytes(self, n: int, what: str) -> Generator[None, None, bytes]:
        """``n`` raw bytes; the caller bounds ``n`` before asking."""
        if self.end - self.pos < n:
            yield from self.wait(n, what)
        return self.take(n)

    def read_counted(self, what: str) -> Generator[None, None, bytes]:
        """A counted string: one length byte (so at most 255), then that many bytes."""
        if self.end - self.pos < 1:
            yield from self.wait(1, what)
        n = self.buffer[self.pos]
        if self.end - self.pos < 1 + n:
            yield from self.wait(1 + n, what)
        self.pos += 1
        return self.take(n)

    def skip_unread(self, n: int) -> int:
        """Consume ``n`` bytes of which only the buffered ones are here: returns how many
        the caller must skip in its input itself (a seek), counted in :attr:`offset`
        already.  Skipped input is not part of a running digest."""
        step = min(n, self.end - self.pos)
        self.pos += step
        rest = n - step
        self._base += rest          # (rest > 0 only when pos == end: nothing moves)
        return rest

    def skip_or_end(self, n: int) -> Generator[None, None, bool]:
        """Consume ``n`` bytes as they arrive, never buffering more than is fed; False when
        the input ends first (a trailer nothing depends on)."""
        while n:
            if self.end == self.pos:
                if self.closed:
                    return False
                yield
                continue
            step = min(n, self.end - self.pos)
            self.pos += step
            n -= step
        return True
