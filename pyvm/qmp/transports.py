"""Byte pipes under the monitors: listening sockets and a threaded stdio transport.

Unix sockets are created with mode 0600: on Linux, ``bind`` gives the new socket file
the mode of the (unbound) socket inode, which is set first with ``fchmod``; the file is
``chmod``-ed again after ``bind`` for other systems.  The socket appears at its path only
once it listens.  A stale socket file at the path is
replaced (QEMU unlinks it too); any other kind of file is left alone and reported.

Standard input and output are served by two daemon threads, so a blocking terminal or
pipe never stalls the event loop; the transport offers the few asyncio transport methods
the monitor connections use.
"""

from __future__ import annotations

import asyncio
import errno
import os
import queue
import socket
import stat
import threading
from typing import Any


# sockaddr_un.sun_path holds 108 bytes including the terminating NUL (Linux).
_UNIX_PATH_MAX = 108


def bind_unix_socket(path: str) -> socket.socket:
    """A listening unix socket at ``path`` with mode 0600; raises OSError.

    The socket is bound and listening under a temporary name first and then renamed, so
    a client that sees the path can connect at once (when the temporary name fits).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, os.strerror(errno.EEXIST))
        os.unlink(path)
    temp = f"{path}.{os.getpid()}~"
    if len(os.fsencode(temp)) >= _UNIX_PATH_MAX:
        temp = path
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.fchmod(sock.fileno(), 0o600)
        sock.bind(temp)
        try:
            os.chmod(temp, 0o600)
            sock.listen(16)
            if temp != path:
                os.rename(temp, path)
        except BaseException:
            os.unlink(temp)
            raise
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class StdioTransport(asyncio.BaseTransport):
    """stdin/stdout as a transport for one protocol; reading and writing on threads."""

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: asyncio.Protocol,
                 fd_in: int = 0, fd_out: int = 1) -> None:
        super().__init__()
        self._loop = loop
        self._protocol = protocol
        self._fd_in = fd_in
        self._fd_out = fd_out
        self._out: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._pending = 0
        self._lock = threading.Lock()
        self._can_read = threading.Event()
        self._can_read.set()
        self._closing = False

    def start(self) -> None:
        self._protocol.connection_made(self)
        threading.Thread(target=self._reader, name="pyvm-monitor-stdin", daemon=True).start()
        threading.Thread(target=self._writer, name="pyvm-monitor-stdout", daemon=True).start()

    def _call(self, fn: Any, *args: Any) -> bool:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:          # the loop is closed: pyvm is exiting
            return False
        return True

    def _reader(self) -> None:
        while not self._closing:
            self._can_read.wait()
            try:
                data = os.read(self._fd_in, 65536)
            except OSError:
                data = b""
            if not data:
                self._call(self._protocol.eof_received)
                return
            if not self._call(self._protocol.data_received, data):
                return

    def _writer(self) -> None:
        while True:
            data = self._out.get()
            if data is None:
                self._call(self._protocol.connection_lost, None)
                return
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(self._fd_out, view):]
            except OSError:
                self._closing = True
            with self._lock:
                self._pending -= len(data)

    # -- the asyncio transport surface the monitor uses ------------------------------------
    def write(self, data: bytes) -> None:
        if self._closing:
            return
        with self._lock:
            self._pending += len(data)
        self._out.put(bytes(data))

    def get_write_buffer_size(self) -> int:
        with self._lock:
            return self._pending

    def pause_reading(self) -> None:
        self._can_read.clear()

    def resume_reading(self) -> None:
        self._can_read.set()

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._out.put(None)

    def abort(self) -> None:
        self.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default
