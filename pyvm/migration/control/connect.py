"""From a parsed migration address to an open byte channel (the transports' glue).

Outgoing: :func:`outgoing_opener` returns a callable the migration thread calls to
connect / spawn / create.  Incoming: :func:`prepare_incoming` binds a listener at once (so
a bad address fails the command and ``query-migrate`` can show the real port) and returns
a callable that waits for the peer; files and commands are opened by that callable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

from pyvm.migration.control.address import (ExecMigrationAddress, FdSocketAddress, FileMigrationAddress,
                                    InetSocketAddress, MigrationAddress, RdmaMigrationAddress,
                                    SocketMigrationAddress, UnixSocketAddress, socket_address_json)
from pyvm.migration.transports import (AbortSignal, Listener, TransportError, connect_inet,
                                       connect_unix, exec_incoming, exec_outgoing, file_incoming,
                                       file_outgoing, from_fd, incoming_from_fd)

STREAMING = (SocketMigrationAddress, RdmaMigrationAddress)


def _fd_number(sock: FdSocketAddress) -> int:
    try:
        return int(sock.name, 10)
    except ValueError:
        raise TransportError(f"File descriptor named '{sock.name}' has not been found") from None


def _inet_kwargs(inet: InetSocketAddress) -> dict[str, Any]:
    return {"ipv4": inet.ipv4, "ipv6": inet.ipv6}


def outgoing_opener(addr: MigrationAddress, abort: AbortSignal,
                    rdma_blocks: Callable[[], Any] | None = None,
                    rdma_pin_all: bool = False,
                    upgrade: Callable[[Any], Any] | None = None) -> Callable[[], Any]:
    """A callable that opens the outgoing channel for ``addr`` (runs on the migration thread).

    ``upgrade`` (TLS, pyvm.migration.tls_glue) turns a connected tcp/unix channel into
    the channel to use."""
    up: Callable[[Any], Any] = upgrade or (lambda ch: ch)
    if isinstance(addr, SocketMigrationAddress):
        sock = addr.socket
        if isinstance(sock, InetSocketAddress):
            return lambda: up(connect_inet(sock.host, _port(sock.port), abort=abort,
                                           **_inet_kwargs(sock)))
        if isinstance(sock, UnixSocketAddress):
            return lambda: up(connect_unix(sock.path, abort=abort))
        if isinstance(sock, FdSocketAddress):
            return lambda: from_fd(_fd_number(sock))
        raise TransportError(f"socket type '{sock.type}' is not supported by pyvm")
    if isinstance(addr, ExecMigrationAddress):
        return lambda: exec_outgoing(list(addr.args))
    if isinstance(addr, FileMigrationAddress):
        return lambda: file_outgoing(addr.filename, addr.offset, abort=abort)
    if isinstance(addr, RdmaMigrationAddress):
        from pyvm.migration.control.rdma_connect import rdma_outgoing_opener
        return rdma_outgoing_opener(addr, rdma_blocks, abort, rdma_pin_all)
    raise TransportError(f"unknown migration transport {addr!r}")


def _port(text: str) -> int:
    try:
        port = int(text, 10)
    except ValueError:
        raise TransportError(f"error parsing port '{text}'") from None
    if not 0 <= port <= 65535:
        raise TransportError(f"port {port} out of range")
    return port


@dataclass
class PreparedIncoming:
    """A bound (or about to be opened) incoming channel."""

    accept: Callable[[], Any]
    close: Callable[[], None]
    socket_address: list[dict[str, Any]] | None
    listener: Listener | None = None        # tcp/unix: TLS accepts from it itself


def prepare_incoming(addr: MigrationAddress, rdma_blocks: Callable[[], Any] | None = None) -> PreparedIncoming:
    if isinstance(addr, SocketMigrationAddress):
        sock = addr.socket
        if isinstance(sock, InetSocketAddress):
            lst = Listener.inet(sock.host, _port(sock.port), **_inet_kwargs(sock))
        elif isinstance(sock, UnixSocketAddress):
            lst = Listener.unix(sock.path)
        elif isinstance(sock, FdSocketAddress):
            fd = _fd_number(sock)
            return PreparedIncoming(lambda: incoming_from_fd(fd), lambda: None, None)
        else:
            raise TransportError(f"socket type '{sock.type}' is not supported by pyvm")
        listen = lst.listen_address()
        return PreparedIncoming(lambda: lst.accept(), lst.close, [listen.to_qapi()], lst)
    if isinstance(addr, ExecMigrationAddress):
        return PreparedIncoming(lambda: exec_incoming(list(addr.args)), lambda: None, None)
    if isinstance(addr, FileMigrationAddress):
        if not os.path.exists(addr.filename):
            raise TransportError(f"Could not open '{addr.filename}': No such file or directory")
        return PreparedIncoming(lambda: file_incoming(addr.filename, addr.offset), lambda: None, None)
    if isinstance(addr, RdmaMigrationAddress):
        from pyvm.migration.control.rdma_connect import prepare_rdma_incoming
        return prepare_rdma_incoming(addr, rdma_blocks)
    raise TransportError(f"unknown migration transport {addr!r}")


__all__ = ["PreparedIncoming", "STREAMING", "outgoing_opener", "prepare_incoming",
           "socket_address_json"]
