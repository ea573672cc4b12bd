"""The errors of the migration stream codec.

Every failure the codec detects is a :class:`MigrationError`::

    PyvmError                               (pyvm.errors)
     +-- MigrationError                     root: carries QEMU's report lines and an errno
          +-- StreamFormatError             the bytes are not a valid stream (magic, section
          |    |                            type, footer, flags, bounds)
          |    +-- TruncatedStreamError     the input ended inside an item (errno EIO)
          +-- StreamMismatchError           a valid stream that does not fit this VM: machine
          |                                 type, capabilities, unknown device or RAM block,
          |                                 sizes, versions
          +-- UnsupportedFeatureError       a QEMU feature pyvm does not implement (commands,
          |                                 compressed pages)
          +-- EncodeError                   the encoder was given state it cannot write
          +-- DecoderStoppedError           input fed to a decoder that already failed

QEMU reports a failed load as a few ``error_report()`` lines, innermost first, and then
``load of migration failed: <strerror(-ret)>``.  A :class:`MigrationError` keeps those lines
(``lines``) and the errno (``errno``) so that the caller prints exactly what QEMU prints:
:meth:`MigrationError.report` returns all of them.  Each layer that catches an error on its
way up adds its own line with :meth:`MigrationError.add_context`, as QEMU's callers do.
"""

from __future__ import annotations

import errno as errno_codes
import os

from pyvm.errors import PyvmError


class MigrationError(PyvmError):
    """A migration stream could not be written or read.

    ``lines`` are QEMU's diagnostics in the order QEMU prints them; ``errno`` is the
    positive errno QEMU's load would return (``EINVAL`` for most checks, ``EIO`` when the
    input ends early).
    """

    def __init__(self, *lines: str, errno: int = errno_codes.EINVAL, detail: str = "") -> None:
        self.lines: list[str] = [line for line in lines if line]
        self.errno = errno
        self.detail = detail
        super().__init__(*self.lines)

    def __str__(self) -> str:
        if self.lines:
            return self.lines[0]
        return self.detail or os.strerror(self.errno)

    def add_context(self, line: str) -> None:
        """Append an outer diagnostic line (QEMU prints callers' lines after the cause)."""
        self.lines.append(line)

    def report(self) -> list[str]:
        """Every line QEMU would print for this failed load, ending with the summary."""
        return [*self.lines, f"load of migration failed: {os.strerror(self.errno)}"]


class StreamFormatError(MigrationError):
    """The bytes do not follow the stream format."""


class TruncatedStreamError(StreamFormatError):
    """The input ended in the middle of an item; ``what`` names the item.

    QEMU itself prints nothing for most truncations but the final line
    (``load of migration failed: Input/output error``); ``str()`` of this error says where
    the stream ended.
    """

    def __init__(self, *lines: str, what: str = "", offset: int = 0,
                 errno: int = errno_codes.EIO) -> None:
        super().__init__(*lines, errno=errno,
                         detail=f"migration stream ends inside {what} (offset {offset})")
        self.what = what
        self.offset = offset


class StreamMismatchError(MigrationError):
    """A well-formed stream that does not match this VM's configuration."""


class UnsupportedFeatureError(MigrationError):
    """The stream uses a QEMU feature that pyvm does not implement."""


class EncodeError(MigrationError):
    """The encoder was asked to write a value or name the format cannot carry."""


class DecoderStoppedError(MigrationError):
    """Input was fed to a decoder after it had failed; the first error is the cause."""
