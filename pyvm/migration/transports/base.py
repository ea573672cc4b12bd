"""Byte channels for migration: the two interfaces every transport implements, and their fd core.

A transport turns an address into a byte channel and knows nothing of the stream format.  The
source writes the stream into an :class:`OutgoingChannel`; the destination reads it from an
:class:`IncomingChannel`.  Channels do not buffer: ``write``/``writev`` return once the kernel
has taken every byte, so guest RAM passed as memoryviews of its mmap goes to ``sendmsg`` or
``writev`` without a copy.

Errors::

    PyvmError                         (pyvm.errors)
     +-- TransportError               a channel could not be opened, written, read or closed;
          |                           the text is QEMU's (``Unable to write to socket: Broken
          |                           pipe``) and ``errno`` the OS error, if any
          +-- TransportCancelled      the operation was aborted by ``shutdown()`` or an
          |                           :class:`AbortSignal` (``migrate_cancel``)
          +-- TransportTimeout        an ``accept`` with a timeout saw no connection

Threads: one thread does the I/O of a channel; any other thread may call ``shutdown()`` to make
a blocked ``write``/``read``/``accept`` raise :class:`TransportCancelled` promptly.  Only the
owning thread calls ``close()``, after its I/O has returned.  Sockets block in the kernel
(a large ``sendmsg`` runs without the GIL) and ``shutdown()`` wakes them with the socket's own
``shutdown(2)``; pipes and files are non-blocking and wait in ``poll`` on the descriptor and the
channel's :class:`AbortSignal`, so a cancel never depends on a child process closing its end.
"""

from __future__ import annotations

import errno as errno_codes
import functools
import os
import select
import threading
import time
from typing import Callable, Protocol, Sequence, Union, runtime_checkable

from pyvm.errors import PyvmError

#: What a channel accepts for writing: bytes-like objects; memoryviews are never copied.
Chunk = Union[bytes, bytearray, memoryview]

# Linux refuses writev/sendmsg with more than IOV_MAX (1024, <limits.h>) buffers.
try:
    IOV_MAX = max(16, min(1024, os.sysconf("SC_IOV_MAX")))
except (ValueError, OSError):
    IOV_MAX = 1024

_POLL_IN = select.POLLIN
_POLL_OUT = select.POLLOUT


class TransportError(PyvmError):
    """A migration channel failed; ``str()`` is the text QEMU reports in ``error-desc``."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class TransportCancelled(TransportError):
    """The operation was aborted from another thread (``shutdown()``, ``migrate_cancel``)."""


class TransportTimeout(TransportError):
    """An accept with a timeout expired."""


def os_error(message: str, err: OSError) -> TransportError:
    """``message: strerror`` as QEMU's ``error_setg_errno`` words it."""
    code = err.errno if err.errno is not None else errno_codes.EIO
    return TransportError(f"{message}: {os.strerror(code)}", errno=code)


def cancelled_error(message: str) -> TransportCancelled:
    return TransportCancelled(f"{message}: {os.strerror(errno_codes.ECANCELED)}",
                              errno=errno_codes.ECANCELED)


class RecordSource(Protocol):
    """A batch of bytes that sends itself on a descriptor (``pyvm.fastpath.RecordBatch``)."""

    @property
    def remaining(self) -> int:
        """Bytes not sent yet."""

    def send(self, fd: int, socket: bool = False) -> int:
        """One system call's worth; BlockingIOError when nothing could be written."""

    def clear(self) -> None:
        """Drop what is left (and the memory it points into)."""


@runtime_checkable
class OutgoingChannel(Protocol):
    """Where the source writes the migration stream."""

    def write(self, data: Chunk) -> None:
        """Write all of ``data`` (blocking); :class:`TransportError` on failure."""

    def writev(self, chunks: Sequence[Chunk]) -> None:
        """Write every chunk in order without copying memoryviews (``sendmsg``/``writev``)."""

    def flush(self) -> None:
        """Nothing is buffered in pyvm; present for symmetry with buffered writers."""

    def close(self) -> None:
        """Release the channel; may report a late failure (exit status, fsync)."""

    def shutdown(self) -> None:
        """Abort a blocked or future write from any thread."""

    @property
    def bytes_written(self) -> int:
        """Bytes the kernel accepted so far."""


@runtime_checkable
class RecordChannel(OutgoingChannel, Protocol):
    """An :class:`OutgoingChannel` that also writes page-record batches straight from guest
    RAM: what precopy needs of every channel but rdma's (which moves pages by RDMA)."""

    def write_records(self, batch: RecordSource) -> None:
        """Write the whole batch (``pyvm.fastpath.RecordBatch``); it is empty afterwards."""


@runtime_checkable
class IncomingChannel(Protocol):
    """Where the destination reads the migration stream from."""

    def read(self, n: int) -> bytes:
        """At most ``n`` bytes, at least one; ``b""`` at end of input."""

    def readinto(self, buf: memoryview | bytearray) -> int:
        """Fill ``buf`` with at most ``len(buf)`` bytes; 0 at end of input."""

    def close(self) -> None:
        """Release the channel."""

    def shutdown(self) -> None:
        """Abort a blocked or future read from any thread."""


class AbortSignal:
    """A one-shot flag that wakes threads blocked in a channel (an eventfd under the hood).

    Every channel has its own (``shutdown()`` triggers it); the orchestration may pass one to
    :func:`~pyvm.migration.transports.socket_transport.connect_inet` to abort a slow connect.
    Whoever created a signal closes it, and joins the helper threads a cancelled wait
    left to finish (:meth:`adopt`, :meth:`join_adopted`).
    """

    def __init__(self) -> None:
        self._fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._lock = threading.Lock()
        self._triggered = False
        self._closed = False
        self._adopted: list[threading.Thread] = []

    def adopt(self, thread: threading.Thread) -> None:
        """A helper thread that a cancel could not stop (it is inside a call that cannot
        be interrupted, such as ``fi_getinfo``): the signal's owner joins it later."""
        with self._lock:
            self._adopted.append(thread)

    def join_adopted(self, timeout: float | None = None) -> bool:
        """Join the adopted helper threads; True when none is left running."""
        with self._lock:
            threads, self._adopted = self._adopted, []
        deadline = None if timeout is None else time.monotonic() + timeout
        left = []
        for thread in threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                left.append(thread)
        with self._lock:
            self._adopted.extend(left)
        return not left

    @property
    def triggered(self) -> bool:
        return self._triggered

    def fileno(self) -> int:
        return self._fd

    def trigger(self) -> None:
        """Wake every waiter; later waits return at once.  Safe from any thread."""
        with self._lock:
            if self._triggered or self._closed:
                self._triggered = True
                return
            self._triggered = True
            os.eventfd_write(self._fd, 1)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._fd)


def wait_ready(fd: int, events: int, abort: AbortSignal | None,
               timeout: float | None = None) -> bool:
    """Block until ``fd`` has one of ``events`` (or an error/hang-up): True; False on timeout.

    Raises nothing itself; the caller checks ``abort.triggered`` afterwards.
    """
    poller = select.poll()
    poller.register(fd, events)
    if abort is not None:
        if abort.triggered:
            return True
        poller.register(abort.fileno(), _POLL_IN)
    ready = poller.poll(None if timeout is None else max(0, int(timeout * 1000)))
    return bool(ready)


def as_views(chunks: Sequence[Chunk]) -> list[memoryview]:
    """The chunks as flat byte memoryviews (no copy); empty chunks are dropped."""
    views = []
    for chunk in chunks:
        view = chunk if isinstance(chunk, memoryview) else memoryview(chunk)
        if view.ndim != 1 or view.format not in ("B", "b", "c"):
            view = view.cast("B")
        if view.nbytes:
            views.append(view)
    return views


def detached(error: TransportError, cause: OSError | None = None) -> TransportError:
    """``error`` with its cause but without frames that could pin the caller's buffers.

    A traceback keeps every frame's locals alive; a channel's frames hold memoryviews of
    guest RAM, and an error kept for ``query-migrate`` must not stop that mmap from closing.
    """
    if cause is not None:
        error.__cause__ = cause.with_traceback(None)
    return error


def fresh(error: TransportError) -> TransportError:
    """A new exception equal to ``error`` (the stored one is never raised, so it stays bare)."""
    copy = type(error)(str(error), errno=error.errno)
    copy.__cause__ = error.__cause__
    return copy


class _ViewCursor:
    """The views a ``writev`` still has to write; what the kernel took is dropped, and a
    partly sent view is sliced, never copied."""

    __slots__ = ("views", "index")

    def __init__(self, views: list[memoryview]) -> None:
        self.views = views
        self.index = 0

    def pending(self) -> bool:
        return self.index < len(self.views)

    def next(self, limit: int) -> list[memoryview]:
        return self.views[self.index:self.index + limit]

    def advance(self, sent: int) -> int:
        done = sent
        while done:
            size = self.views[self.index].nbytes
            if done >= size:
                done -= size
                self.index += 1
            else:
                self.views[self.index] = self.views[self.index][done:]
                done = 0
        return sent


class _FdChannel:
    """What both channel directions share: the descriptor, the abort signal, and the
    shutdown/close protocol.  Subclasses override :meth:`_on_shutdown` and :meth:`_release`."""

    kind = "file"

    def __init__(self, fd: int, *, description: str, kernel_wakeup: bool = False) -> None:
        # kernel_wakeup: _on_shutdown() itself wakes a blocked call (socket shutdown), so the
        # descriptor stays blocking and a big transfer waits in the kernel, not in poll rounds.
        os.set_blocking(fd, kernel_wakeup)
        self._fd = fd
        self.description = description
        self._abort = AbortSignal()
        self._lock = threading.Lock()
        self._released = False

    def shutdown(self) -> None:
        with self._lock:
            self._abort.trigger()
            self._on_shutdown()

    def close(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        # Outside the lock: releasing may wait (a command's exit) and shutdown() must still
        # be able to cut that wait short.
        try:
            self._release()
        finally:
            self._abort.close()

    def _on_shutdown(self) -> None:
        """Transport-specific abort (socket shutdown, killing a command).

        Called under the lock, also after ``close()`` began (``self._released`` is then true).
        """

    def _release(self) -> None:
        """Close the descriptor; raise :class:`TransportError` for a late failure."""
        os.close(self._fd)


class FdOutgoing(_FdChannel):
    """An :class:`OutgoingChannel` over one file descriptor.

    ``kind`` names the peer in error texts as QEMU's channels do: ``socket``, ``command`` or
    ``file`` (``Unable to write to file: No space left on device``).  Subclasses override
    :meth:`_send`, :meth:`_on_shutdown` and :meth:`_release`.  After the first failure every
    write raises the same error again (:attr:`error`).
    """

    #: Page batches go out with sendmsg(MSG_NOSIGNAL) instead of writev.
    _is_socket = False

    def __init__(self, fd: int, *, description: str, kernel_wakeup: bool = False) -> None:
        super().__init__(fd, description=description, kernel_wakeup=kernel_wakeup)
        self._error: TransportError | None = None
        self._bytes_written = 0

    # -- OutgoingChannel ---------------------------------------------------------------------
    @property
    def bytes_written(self) -> int:
        return self._bytes_written

    @property
    def error(self) -> TransportError | None:
        """The first failure of this channel (writes after it raise an equal error)."""
        return self._error

    @property
    def cancelled(self) -> bool:
        return self._abort.triggered

    def fileno(self) -> int:
        return self._fd

    def write(self, data: Chunk) -> None:
        self.writev((data,))

    def writev(self, chunks: Sequence[Chunk]) -> None:
        cursor = _ViewCursor(as_views(chunks))
        del chunks                           # keep a raised error's frames free of buffers
        try:
            self._write_all(lambda: cursor.advance(self._send(cursor.next(IOV_MAX))), cursor.pending)
        finally:
            cursor.views = []

    def write_records(self, batch: RecordSource) -> None:
        """Write a packed batch of page records (``pyvm.fastpath.RecordBatch``): headers
        from the batch, page bytes straight from guest RAM, in as few system calls as the
        kernel allows."""
        try:
            self._write_all(lambda: batch.send(self._fd, self._is_socket), lambda: batch.remaining > 0)
        finally:
            batch.clear()

    def _write_all(self, send_once: Callable[[], int], pending: Callable[[], bool]) -> None:
        """Call ``send_once`` while ``pending()``; the first failure is recorded in
        ``self._error`` and raised (as a fresh copy) now and by every later write."""
        if self._error is None and self._released:
            self._fail(TransportError(f"Unable to write to {self.kind}: channel is closed",
                                      errno=errno_codes.EBADF))
        while self._error is None and pending():
            if self._abort.triggered:
                self._fail(cancelled_error(f"Unable to write to {self.kind}"))
                break
            try:
                sent = send_once()
            except BlockingIOError:
                wait_ready(self._fd, _POLL_OUT, self._abort)
                continue
            except OSError as err:
                if self._abort.triggered:
                    self._fail(detached(cancelled_error(f"Unable to write to {self.kind}"), err))
                else:
                    self._fail(detached(os_error(f"Unable to write to {self.kind}", err), err))
                break
            self._bytes_written += sent
        if self._error is not None:
            raise fresh(self._error)

    def flush(self) -> None:
        if self._error is not None:
            raise fresh(self._error)

    # -- hooks ---------------------------------------------------------------------------------
    def _send(self, views: list[memoryview]) -> int:
        return os.writev(self._fd, views)

    def _fail(self, error: TransportError) -> TransportError:
        """Record the first failure; returns the recorded one."""
        if self._error is None:
            self._error = error
        return self._error


class FdIncoming(_FdChannel):
    """An :class:`IncomingChannel` over one file descriptor (see :class:`FdOutgoing`)."""

    def __init__(self, fd: int, *, description: str, kernel_wakeup: bool = False) -> None:
        super().__init__(fd, description=description, kernel_wakeup=kernel_wakeup)
        self._eof = False
        self._bytes_read = 0

    @property
    def bytes_read(self) -> int:
        return self._bytes_read

    @property
    def at_eof(self) -> bool:
        return self._eof

    @property
    def cancelled(self) -> bool:
        return self._abort.triggered

    def fileno(self) -> int:
        return self._fd

    def read(self, n: int) -> bytes:
        if n <= 0:
            return b""
        data = b""

        def recv_once() -> int:
            nonlocal data
            data = self._recv(n)
            return len(data)
        self._read_with(recv_once)
        return data

    def readinto(self, buf: memoryview | bytearray) -> int:
        view = buf if isinstance(buf, memoryview) else memoryview(buf)
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
        if not view.nbytes:
            return 0
        try:
            return self._read_with(functools.partial(self._recv_into, view))
        finally:
            del buf, view                    # keep a raised error's frames free of buffers

    def _read_with(self, recv_once: Callable[[], int]) -> int:
        """Call ``recv_once`` until it reads (0: end of input), waiting while the descriptor
        has nothing; failures raise as QEMU words them.  Returns what it read."""
        while True:
            failure = self._check()
            if failure is None:
                try:
                    got = recv_once()
                except BlockingIOError:
                    wait_ready(self._fd, _POLL_IN, self._abort)
                    continue
                except OSError as err:
                    failure = self._read_error(err)
                else:
                    failure = self._account(got)
            if failure is not None:
                del recv_once                # (it holds the caller's buffer)
                raise failure
            return got

    def _check(self) -> TransportError | None:
        if self._released:
            return TransportError(f"Unable to read from {self.kind}: channel is closed",
                                  errno=errno_codes.EBADF)
        if self._abort.triggered:
            return cancelled_error(f"Unable to read from {self.kind}")
        return None

    def _read_error(self, err: OSError) -> TransportError:
        if self._abort.triggered:
            return detached(cancelled_error(f"Unable to read from {self.kind}"), err)
        return detached(os_error(f"Unable to read from {self.kind}", err), err)

    def _account(self, got: int) -> TransportError | None:
        if not got:
            if self._abort.triggered:
                # A socket shut down by shutdown() reads as end of input: it is a cancel.
                return cancelled_error(f"Unable to read from {self.kind}")
            self._eof = True
        self._bytes_read += got
        return None

    # -- hooks ---------------------------------------------------------------------------------
    def _recv(self, n: int) -> bytes:
        return os.read(self._fd, n)

    def _recv_into(self, view: memoryview) -> int:
        return os.readv(self._fd, [view])

