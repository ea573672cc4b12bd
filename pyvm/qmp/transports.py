"""The threaded stdio transport under a monitor (listening sockets: :mod:`pyvm.host_sockets`).

Standard input and output are served by two threads the transport owns, so a blocking
terminal or pipe never stalls the event loop.  The reader waits in ``poll`` on standard
input and a wake-up pipe, so :meth:`StdioTransport.close` can end it; :meth:`join` waits
for both threads.  The transport offers the few asyncio transport methods the monitor
connections use.

"""

from __future__ import annotations

import asyncio
import os
import queue
import select
import threading
from typing import Any


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
        self._wake_r, self._wake_w = os.pipe()
        self._threads = [threading.Thread(target=self._reader, name="pyvm-monitor-stdin",
                                          daemon=True),
                         threading.Thread(target=self._writer, name="pyvm-monitor-stdout",
                                          daemon=True)]

    def start(self) -> None:
        self._protocol.connection_made(self)
        for thread in self._threads:
            thread.start()

    def join(self, timeout: float | None = None) -> None:
        """Wait for both threads (after :meth:`close`), then release the wake-up pipe."""
        for thread in self._threads:
            if thread.ident is not None:
                thread.join(timeout)
        if not any(thread.is_alive() for thread in self._threads):
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._wake_r = self._wake_w = -1

    def _call(self, fn: Any, *args: Any) -> bool:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:          # the loop is closed: pyvm is exiting
            return False
        return True

    def _readable(self) -> bool:
        """Wait until stdin has input (True) or the transport closes (False)."""
        poller = select.poll()
        poller.register(self._fd_in, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._closing:
            ready = dict(poller.poll())
            if self._wake_r in ready:
                return False
            if ready:
                return True
        return False

    def _reader(self) -> None:
        while not self._closing:
            self._can_read.wait()          # close() sets it too
            if not self._readable():
                return
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
            self._can_read.set()
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass

    def abort(self) -> None:
        self.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default
