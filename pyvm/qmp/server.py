"""The monitor service: an asyncio event loop on its own thread serving every monitor.

One listening endpoint per :class:`~pyvm.qmp.options.MonitorSpec` (unix, tcp, stdio).
A socket accepts any number of clients, each with its own session and negotiation, and
a client may disconnect and reconnect at will.  VM events are fanned out to every
negotiated QMP connection.  How a connection orders, runs and bounds its requests is in
:mod:`pyvm.qmp.connections`; JSON size limits are in :mod:`pyvm.qmp.json_stream`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import sys
import threading
from typing import TYPE_CHECKING, Any, Callable

from pyvm.errors import ConfigError
from pyvm.events import Event
from pyvm.host_sockets import bind_unix_listener
from pyvm.qmp.connections import CommandThread, Connection, HmpConnection, QmpConnection
from pyvm.qmp.context import CommandContext, MonitorState
from pyvm.qmp.events import event_message
from pyvm.qmp.core import build_tables
from pyvm.qmp.json_stream import JsonLimits
from pyvm.qmp.json_writer import encode_line
from pyvm.qmp.psk_listener import PskMonitorListener
from pyvm.qmp.options import MonitorSpec, StdioEndpoint, TcpEndpoint, UnixEndpoint
from pyvm.qmp.tables import MonitorTables
from pyvm.qmp.transports import StdioTransport
from pyvm.qmp.vm_api import VmApi
from pyvm.tls import TlsCredsPsk, TlsCredsX509, TlsError, distinguished_name

if TYPE_CHECKING:
    from pyvm.tls import ObjectRegistry

log = logging.getLogger("pyvm.qmp")


class MonitorService:
    """Every monitor of one VM; :meth:`start` opens them, :meth:`close` ends them."""

    def __init__(self, vm: VmApi, specs: list[MonitorSpec], tables: MonitorTables | None = None,
                 limits: JsonLimits | None = None, hold: bool = False,
                 tls_objects: "ObjectRegistry | None" = None) -> None:
        self.vm = vm
        self.tls_objects = tls_objects        # -object tls-creds-x509/authz-*, for tls-creds=
        # While held, clients are greeted and their requests read and queued, but nothing
        # runs: QEMU runs no monitor command before the machine has started.
        self.held = hold
        self.specs = list(specs)
        # One set of tables per service, built by the caller (the command line adds
        # migration's commands); without one, pyvm's core commands only.
        self.tables = tables if tables is not None else build_tables()
        self.table = self.tables.qmp
        self.hmp_table = self.tables.hmp
        self.limits = limits or JsonLimits()
        self.addresses: dict[str, Any] = {}       # spec label -> bound address
        self.connections: set[Connection] = set()
        self._servers: list[asyncio.AbstractServer] = []
        self._psk_listeners: list[PskMonitorListener] = []     # tls-creds-psk monitors
        self._unix_paths: list[str] = []
        self._stdio: list[StdioTransport] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._closed = False
        self._worker: CommandThread | None = None

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> None:
        # Owned here: close() stops the loop and joins this thread, the command thread and
        # the stdio threads.
        self._thread = threading.Thread(target=self._run, name="pyvm-monitor", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            self._thread.join()
            raise self._start_error

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        self._worker = CommandThread(loop)
        try:
            loop.run_until_complete(self._open())
        except BaseException as err:  # noqa: BLE001 - reported to start()'s caller
            self._start_error = err
            for listener in self._psk_listeners:
                listener.close()
            self._cleanup_files()
            self._worker.stop()
            self._worker = None
            loop.close()
            self._ready.set()
            return
        self._unsubscribe = self.vm.events.subscribe(self._on_vm_event)
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        for spec in self.specs:
            factory = self._factory(spec)
            ep = spec.endpoint
            try:
                if isinstance(ep, UnixEndpoint):
                    sock = bind_unix_listener(ep.path)
                    sock.setblocking(False)
                    self._unix_paths.append(ep.path)
                    server = await loop.create_unix_server(factory, sock=sock)
                    self.addresses[spec.label] = ep.path
                elif isinstance(ep, TcpEndpoint) and self._psk_creds(spec) is not None:
                    self._open_psk(spec, ep, factory)
                    continue
                elif isinstance(ep, TcpEndpoint):
                    tls = self._tls_context(spec)
                    server = await loop.create_server(
                        self._authz_gate(factory, spec), ep.host, ep.port, reuse_address=True,
                        ssl=tls, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if tls else None)
                    self.addresses[spec.label] = server.sockets[0].getsockname()[:2]
                else:
                    assert isinstance(ep, StdioEndpoint)
                    conn = factory()
                    conn.close_on_eof = False   # stdin at EOF: events still go to stdout
                    tr = StdioTransport(loop, conn)
                    self._stdio.append(tr)
                    tr.start()
                    self.addresses[spec.label] = "stdio"
                    continue
            except OSError as err:
                where = f" to {ep.path}" if isinstance(ep, UnixEndpoint) else ""
                reason = os.strerror(err.errno) if err.errno else str(err)
                raise ConfigError(f"{spec.option}: Failed to bind socket{where}: "
                                  f"{reason}") from err
            self._servers.append(server)

    def _tls_context(self, spec: MonitorSpec) -> ssl.SSLContext | None:
        """The server context of ``tls-creds=ID`` (chardev/char-socket.c texts)."""
        if spec.tls_creds is None:
            return None
        try:
            if self.tls_objects is None:
                raise TlsError(f"No TLS credentials with id '{spec.tls_creds}'")
            creds = self.tls_objects.creds(spec.tls_creds, "server")
            assert isinstance(creds, TlsCredsX509)          # PSK: _psk_creds
            return creds.context()
        except TlsError as err:
            raise ConfigError(f"{spec.option}: {err}") from err

    def _psk_creds(self, spec: MonitorSpec) -> TlsCredsPsk | None:
        """The ``tls-creds-psk`` object a monitor names (served by psk_listener.py)."""
        if spec.tls_creds is None or self.tls_objects is None:
            return None
        obj = self.tls_objects.get(spec.tls_creds)
        return obj if isinstance(obj, TlsCredsPsk) else None

    def _open_psk(self, spec: MonitorSpec, ep: TcpEndpoint,
                  factory: Callable[[], Connection]) -> None:
        assert self.tls_objects is not None and self._loop is not None
        try:
            creds = self.tls_objects.creds(spec.tls_creds or "", "server")
            authz = self.tls_objects.authz(spec.tls_authz) if spec.tls_authz else None
        except TlsError as err:
            raise ConfigError(f"{spec.option}: {err}") from err
        assert isinstance(creds, TlsCredsPsk)
        family = socket.AF_INET6 if ":" in ep.host else socket.AF_INET
        sock = socket.create_server((ep.host, ep.port), family=family)
        sock.setblocking(False)
        self.addresses[spec.label] = sock.getsockname()[:2]
        listener = PskMonitorListener(sock, creds, authz, self._loop, factory, spec.label)
        listener.start()
        self._psk_listeners.append(listener)

    def _authz_gate(self, factory: Callable[[], Connection],
                    spec: MonitorSpec) -> Callable[[], asyncio.Protocol]:
        if spec.tls_creds is None:
            return factory
        authz_id, objects = spec.tls_authz, self.tls_objects
        return lambda: _TlsGate(factory, authz_id, objects)

    def _factory(self, spec: MonitorSpec) -> Callable[[], Connection]:
        cls = QmpConnection if spec.mode == "control" else HmpConnection
        return lambda: cls(self, spec)

    def release(self) -> None:
        """Start running the commands queued while the service was held."""
        loop = self._loop
        if loop is None or not self.held:
            return

        def go() -> None:
            self.held = False
            for conn in list(self.connections):
                conn.pump()
        try:
            loop.call_soon_threadsafe(go)
        except RuntimeError:
            pass

    def close(self, timeout: float = 2.0) -> None:
        """Flush pending output (best effort, ``timeout`` s), close everything, join."""
        if self._closed or self._loop is None or self._thread is None:
            return
        self._closed = True
        if self._unsubscribe is not None:
            self._unsubscribe()
        loop = self._loop
        try:
            fut = asyncio.run_coroutine_threadsafe(self._shutdown(timeout), loop)
            fut.result(timeout + 2.0)
        except Exception as err:  # noqa: BLE001 - closing must not fail the exit path
            log.debug("monitor shutdown: %r", err)
        for listener in self._psk_listeners:
            listener.close()
        try:
            loop.call_soon_threadsafe(loop.stop)
        except RuntimeError:
            pass
        self._thread.join(timeout + 2.0)
        for tr in self._stdio:
            tr.close()
            tr.join(timeout)
        if self._worker is not None:
            self._worker.stop(timeout + 2.0)
        self._cleanup_files()

    async def _shutdown(self, timeout: float) -> None:
        for server in self._servers:
            server.close()
        conns = list(self.connections)
        if conns:
            await asyncio.wait([asyncio.ensure_future(c.flushed(timeout)) for c in conns],
                               timeout=timeout)
        for conn in conns:
            if conn.transport is not None:
                conn.transport.close()
        for tr in self._stdio:
            tr.close()
        for task in list(self._tasks):
            task.cancel()

    def _cleanup_files(self) -> None:
        for path in self._unix_paths:
            try:
                os.unlink(path)
            except OSError:
                pass
        self._unix_paths.clear()

    # -- helpers for connections --------------------------------------------------------------
    @property
    def worker(self) -> CommandThread:
        assert self._worker is not None, "the service is not running"
        return self._worker

    def context(self, state: MonitorState) -> CommandContext:
        return CommandContext(self.vm, self.table, state, self, hmp_table=self.hmp_table)

    def monitor_chardevs(self) -> list[dict[str, Any]]:
        return [{"label": s.label, "filename": s.filename, "frontend-open": True}
                for s in self.specs]

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- events ---------------------------------------------------------------------------------
    def _on_vm_event(self, event: Event) -> None:
        loop = self._loop
        if loop is None or self._closed:
            return
        try:
            loop.call_soon_threadsafe(self._broadcast, event)
        except RuntimeError:
            pass

    def _broadcast(self, event: Event) -> None:
        try:
            msg = event_message(event, self.table)
            encoded = {False: encode_line(msg, False), True: encode_line(msg, True)}
        except (TypeError, ValueError) as err:
            print(f"pyvm: cannot send event {event.name}: {err}", file=sys.stderr)
            return
        for conn in list(self.connections):
            if isinstance(conn, QmpConnection):
                conn.send_event(encoded)


TLS_HANDSHAKE_TIMEOUT = 10.0     # seconds a TLS client has to finish its handshake


class _TlsGate(asyncio.Protocol):
    """A monitor connection over TLS.  With ``tls-authz=ID`` the client's certificate name
    must be allowed by the authz object after the handshake
    (crypto/tlssession.c qcrypto_tls_session_check_certificate); otherwise the connection
    is closed before the monitor greets it.  TLS has no half-close: at the client's EOF
    the connection ends (replies not yet written are dropped)."""

    def __init__(self, factory: Callable[[], Connection], authz_id: str | None,
                 objects: "ObjectRegistry | None") -> None:
        self._factory = factory
        self._authz_id = authz_id
        self._objects = objects
        self._inner: Connection | None = None

    def _refusal(self, transport: asyncio.BaseTransport) -> str | None:
        """Why the client is refused (QEMU's text), or None when it may use the monitor.

        The name checked and reported is the distinguished name of the client's
        certificate, as crypto/tlssession.c ``qcrypto_tls_session_check_certificate``
        reports it, not the client's address."""
        if self._authz_id is None:
            return None
        cert = transport.get_extra_info("peercert")
        if not cert:
            return "No certificate peers"
        name = distinguished_name(cert)
        try:
            if self._objects is not None and \
                    self._objects.authz(self._authz_id).is_allowed(name):
                return None
        except TlsError as err:
            return str(err)
        return f"TLS x509 authz check for {name} is denied"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        refusal = self._refusal(transport)
        if refusal is not None:
            log.warning("monitor: %s", refusal)
            transport.close()
            return
        self._inner = self._factory()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._inner is not None:
            self._inner.eof_received()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()


def start_monitors(vm: VmApi, specs: list[MonitorSpec], tables: MonitorTables,
                   hold: bool = False, tls_objects: "ObjectRegistry | None" = None
                   ) -> MonitorService:
    """Open every endpoint and start the monitor thread; ``.close()`` ends it.

    With ``hold=True`` clients are greeted but no command runs until ``.release()`` --
    call it once the machine has started, so that no client sees a half-built VM.
    """
    service = MonitorService(vm, specs, tables, hold=hold, tls_objects=tls_objects)
    service.start()
    return service
