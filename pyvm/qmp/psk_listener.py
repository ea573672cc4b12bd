"""A TCP monitor with ``tls-creds-psk``: TLS sessions that asyncio's ``ssl`` cannot run.

Python 3.11's :mod:`ssl` (and so asyncio's TLS) has no pre-shared keys, so such a monitor
accepts on its own thread: each client gets the handshake (and the authz check of its
PSK username) on a thread of its own, bounded by the handshake timeout, then a
:class:`pyvm.tls_pump.TlsPump`, whose plain end the monitor's event loop adopts as an
ordinary connection (``connect_accepted_socket``).  A client that fails is logged with
QEMU's text and dropped; the others carry on.  :meth:`PskMonitorListener.close` stops the
accept thread, the handshakes and the pumps, and joins them all.
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
import threading
from typing import Any, Callable

from pyvm.tls import AuthzList, AuthzSimple, TlsCredsPsk, TlsError
from pyvm.tls_pump import TlsPump, engine_for, handshake

log = logging.getLogger("pyvm.qmp")

POLL_S = 0.2
#: clients in their handshake at once; more wait in the listen backlog
MAX_HANDSHAKES = 8


class PskMonitorListener:
    """Accepts TLS-PSK monitor clients on ``sock`` and hands them to ``loop``."""

    def __init__(self, sock: socket.socket, creds: TlsCredsPsk,
                 authz: AuthzSimple | AuthzList | None, loop: asyncio.AbstractEventLoop,
                 factory: Callable[[], asyncio.Protocol], label: str) -> None:
        self.sock = sock
        self.creds = creds
        self.authz = authz
        self.loop = loop
        self.factory = factory
        self.label = label
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._handshakes: list[threading.Thread] = []
        self._pumps: list[TlsPump] = []
        self._thread = threading.Thread(target=self._accept_loop, name=f"{label}-psk-accept",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop accepting, end every session and join every thread."""
        self._closed.set()
        self._thread.join()
        self.sock.close()
        with self._lock:
            handshakes, self._handshakes = self._handshakes, []
        for t in handshakes:
            t.join()
        with self._lock:
            pumps, self._pumps = self._pumps, []
        for pump in pumps:
            pump.stop()
            pump.join()

    # -- threads ------------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            self._reap()
            try:
                ready, _, _ = select.select([self.sock], [], [], POLL_S)
                with self._lock:
                    busy = len(self._handshakes) >= MAX_HANDSHAKES
                if not ready or busy:
                    continue
                conn, _ = self.sock.accept()
            except (OSError, ValueError):
                continue
            t = threading.Thread(target=self._session, args=(conn,),
                                 name=f"{self.label}-psk-handshake", daemon=True)
            with self._lock:
                self._handshakes.append(t)
            t.start()

    def _reap(self) -> None:
        """Join the handshake threads and pumps that have finished."""
        with self._lock:
            done = [t for t in self._handshakes if not t.is_alive()]
            self._handshakes = [t for t in self._handshakes if t.is_alive()]
            ended = [p for p in self._pumps if not p.alive]
            self._pumps = [p for p in self._pumps if p.alive]
        for t in done:
            t.join()
        for p in ended:
            p.join()

    def _session(self, conn: socket.socket) -> None:
        try:
            engine = engine_for(self.creds, True, None)
            handshake(conn, engine, self.authz, aborted=self._closed.is_set)
        except TlsError as err:
            conn.close()
            if not self._closed.is_set():
                log.warning("monitor: %s", err)
            return
        pump = TlsPump(conn, engine, f"{self.label}-tls")
        with self._lock:
            if self._closed.is_set():
                pump.stop()
                pump.join()
                return
            self._pumps.append(pump)
        plain = pump.plain
        plain.setblocking(False)

        async def adopt() -> Any:
            return await self.loop.connect_accepted_socket(self.factory, sock=plain)
        try:
            asyncio.run_coroutine_threadsafe(adopt(), self.loop).result(10)
        except Exception as err:  # noqa: BLE001 - the loop is closing: drop the client
            log.debug("monitor: PSK client not adopted: %r", err)
            plain.close()
            pump.stop()


__all__ = ["PskMonitorListener"]
