"""The migration parameters ``tls-creds``, ``tls-hostname`` and ``tls-authz`` applied to
channels (QEMU migration/tls.c).

With ``tls-creds`` empty (the default) nothing changes.  Otherwise, on the source, a
connected tcp/unix channel is upgraded to TLS with the client credentials, checking the
destination's certificate against ``tls-hostname`` (default: the host of the tcp address);
on the destination, each accepted connection must pass the TLS handshake with the server
credentials and, when ``tls-authz`` names an ``authz-simple``/``authz-list`` object, the
authorization of its certificate's distinguished name.  A client that fails is reported on
stderr and dropped; the destination keeps listening and stays in ``inmigrate``, as QEMU's
does.  The parameters are read when the connection is made, as in QEMU.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Callable

from pyvm.migration.control.address import (InetSocketAddress, MigrationAddress, SocketMigrationAddress,
                                    UnixSocketAddress)
from pyvm.migration.transports import AbortSignal, TransportError
from pyvm.migration.transports.tls_relay import tls_client, tls_server
from pyvm.tls import TlsError

if TYPE_CHECKING:
    from pyvm.machine import Machine
    from pyvm.migration.control.connect import PreparedIncoming
    from pyvm.migration.control.manager import MigrationManager


def _socket_kind(addr: MigrationAddress) -> str | None:
    if isinstance(addr, SocketMigrationAddress):
        if isinstance(addr.socket, InetSocketAddress):
            return "inet"
        if isinstance(addr.socket, UnixSocketAddress):
            return "unix"
    return None


def tls_upgrade(machine: "Machine", mgr: "MigrationManager", addr: MigrationAddress,
                abort: AbortSignal) -> Callable[[Any], Any] | None:
    """What the source does to a freshly connected channel, or None without TLS."""
    creds_id = mgr.params["tls-creds"]
    if not creds_id:
        return None
    kind = _socket_kind(addr)
    hostname = mgr.params["tls-hostname"] or None
    if hostname is None and kind == "inet":
        assert isinstance(addr, SocketMigrationAddress) and isinstance(addr.socket, InetSocketAddress)
        hostname = addr.socket.host

    def upgrade(channel: Any) -> Any:
        if kind is None:
            channel.close()
            raise TransportError("TLS is supported on tcp and unix migration channels only")
        try:
            creds = machine.cfg.tls_objects.creds(creds_id, "client")
            # postcopy writes back on the connection (its return path)
            return tls_client(channel, creds, hostname, abort,
                              duplex=bool(mgr.caps["postcopy-ram"]))
        except TlsError as err:
            raise TransportError(str(err)) from err
    return upgrade


def tls_accept(machine: "Machine", mgr: "MigrationManager",
               prepared: "PreparedIncoming", keep_listening: bool = False) -> Callable[[], Any]:
    """The destination's accept: plain, or TLS-checked connections until one passes.

    ``keep_listening`` (multifd: several connections) leaves the listener open; its owner
    closes it."""
    listener = prepared.listener
    if listener is None:
        return prepared.accept

    def accept() -> Any:
        creds_id = mgr.params["tls-creds"]
        if not creds_id:
            return listener.accept(keep_open=True) if keep_listening else prepared.accept()
        objects = machine.cfg.tls_objects
        authz_id = mgr.params["tls-authz"]
        try:
            creds = objects.creds(creds_id, "server")
            authz = objects.authz(authz_id) if authz_id else None
        except TlsError as err:
            raise TransportError(str(err)) from err
        while True:
            channel = listener.accept(keep_open=True)
            try:
                tls = tls_server(channel, creds, authz, None,
                                 duplex=bool(mgr.caps["postcopy-ram"]))
            except TlsError as err:
                # migration/tls.c migration_tls_incoming_handshake: error_report, go on
                print(f"pyvm: {err}", file=sys.stderr, flush=True)
                continue
            if not keep_listening:
                listener.close()
            return tls
    return accept
