"""File transport: ``file:PATH[,offset=N]`` and the ``file`` channel ``{filename, offset}``.

What QEMU 8.2 does (``migration/file.c``), and so pyvm:

- Outgoing opens ``O_CREAT|O_WRONLY|O_TRUNC`` with mode 0600, seeks to ``offset`` (only when
  it is not 0) and writes the stream from there.  ``O_TRUNC`` empties the file first, so
  whatever was in front of the offset reads back as zeros (a hole): the offset reserves room
  for a header that its owner writes *after* the migration.  ``preserve_prefix=True`` is a
  pyvm extension that keeps the first ``offset`` bytes instead (no ``O_TRUNC``, then
  ``ftruncate(offset)`` to drop an older stream behind them).
- Incoming opens ``O_RDONLY`` and seeks to ``offset``.
- Texts: ``Could not create '%s': %s`` / ``Could not open '%s': %s`` (``qemu_open``),
  ``Unable to seek to offset %lld whence %d in file: %s``, ``Unable to write to file: %s``.

pyvm also ``fsync``\\ s the file when a completed outgoing channel is closed, so that a
cpr-reboot state file survives a host reboot.
"""

from __future__ import annotations

import errno as errno_codes
import os
import select
import stat
import time

from pyvm.migration.transports.base import (AbortSignal, FdIncoming, FdOutgoing, TransportError,
                                            cancelled_error, detached, fresh, os_error, wait_ready)

# fsync errors that only mean "this kind of file cannot be synced" (pipes, /dev/null, ...).
_FSYNC_NOT_APPLICABLE = (errno_codes.EINVAL, errno_codes.EROFS, errno_codes.ENOTSUP)

# QEMU prints the offset as a signed long long (``%lld``).
_INT64_MAX = (1 << 63) - 1

# A FIFO that nobody reads yet: open(O_WRONLY|O_NONBLOCK) fails with ENXIO (fifo(7)); it is
# retried at this interval while the abort signal (migrate_cancel) is watched.
FIFO_RETRY_SECONDS = 0.05


class FileOutgoing(FdOutgoing):
    """The source end of ``file:``; ``close()`` fsyncs unless the migration was aborted."""

    kind = "file"

    def __init__(self, fd: int, *, filename: str, offset: int) -> None:
        super().__init__(fd, description=_describe(filename, offset))
        self.filename = filename
        self.offset = offset

    def _release(self) -> None:
        failure: TransportError | None = None
        if self.error is None and not self.cancelled:
            try:
                os.fsync(self._fd)
            except OSError as err:
                if err.errno not in _FSYNC_NOT_APPLICABLE:
                    failure = detached(os_error("Unable to sync file", err), err)
        try:
            os.close(self._fd)
        except OSError as err:
            failure = failure or detached(os_error("Unable to close file", err), err)
        if failure is not None and self.error is None:
            raise fresh(self._fail(failure))


class FileIncoming(FdIncoming):
    """The destination end of ``file:``."""

    kind = "file"

    def __init__(self, fd: int, *, filename: str, offset: int) -> None:
        super().__init__(fd, description=_describe(filename, offset))
        self.filename = filename
        self.offset = offset


def _describe(filename: str, offset: int) -> str:
    return f"file:{filename},offset={offset}" if offset else f"file:{filename}"


def _open(filename: str, flags: int, mode: int = 0) -> int:
    try:
        return os.open(filename, flags | os.O_CLOEXEC, mode)
    except OSError as err:
        action = "create" if flags & os.O_CREAT else "open"
        raise os_error(f"Could not {action} '{filename}'", err) from err
    except ValueError as err:                # a NUL byte in the name
        raise TransportError(f"Could not open '{filename}': {err}",
                             errno=errno_codes.EINVAL) from err


def _seek(fd: int, offset: int) -> None:
    if offset < 0 or offset > _INT64_MAX:
        os.close(fd)
        signed = offset - (1 << 64) if offset > _INT64_MAX else offset
        raise TransportError(f"Unable to seek to offset {signed} whence {os.SEEK_SET} in file: "
                             f"{os.strerror(errno_codes.EINVAL)}", errno=errno_codes.EINVAL)
    try:
        os.lseek(fd, offset, os.SEEK_SET)
    except OSError as err:
        os.close(fd)
        raise os_error(f"Unable to seek to offset {offset} whence {os.SEEK_SET} in file",
                       err) from err


def _open_for_writing(filename: str, flags: int, abort: AbortSignal | None) -> int:
    """``open(2)`` that a cancel interrupts: a FIFO without a reader would block the
    open for ever, so the open is non-blocking and retried until a reader comes or
    ``abort`` fires (the channel sets its own blocking mode afterwards)."""
    while True:
        try:
            return os.open(filename, flags | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
        except OSError as err:
            if err.errno != errno_codes.ENXIO:
                raise os_error(f"Could not create '{filename}'", err) from err
        except ValueError as err:                # a NUL byte in the name
            raise TransportError(f"Could not open '{filename}': {err}",
                                 errno=errno_codes.EINVAL) from err
        if abort is None:
            time.sleep(FIFO_RETRY_SECONDS)
            continue
        wait_ready(abort.fileno(), select.POLLIN, None, FIFO_RETRY_SECONDS)
        if abort.triggered:
            raise cancelled_error(f"Could not create '{filename}'")


def file_outgoing(filename: str, offset: int = 0, *,
                  preserve_prefix: bool = False, abort: AbortSignal | None = None) -> FileOutgoing:
    """Create or truncate ``filename`` and return a channel writing from ``offset`` on.

    ``abort`` (optional) interrupts the wait for a reader of a FIFO."""
    if preserve_prefix:
        fd = _open_for_writing(filename, os.O_CREAT | os.O_WRONLY, abort)
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode) and 0 <= offset <= _INT64_MAX:
                os.ftruncate(fd, offset)
        except OSError as err:
            os.close(fd)
            raise os_error(f"Unable to truncate '{filename}' to offset {offset}", err) from err
    else:
        fd = _open_for_writing(filename, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, abort)
    if offset:
        _seek(fd, offset)
    return FileOutgoing(fd, filename=filename, offset=offset)


def file_incoming(filename: str, offset: int = 0) -> FileIncoming:
    """Open ``filename`` read-only and return a channel reading from ``offset`` on."""
    fd = _open(filename, os.O_RDONLY)
    if offset:
        _seek(fd, offset)
    return FileIncoming(fd, filename=filename, offset=offset)
