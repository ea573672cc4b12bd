"""From a parsed migration address to an open channel (the control side's transport glue).

Outgoing: :func:`outgoing_opener` returns a callable the migration thread calls to
connect / spawn / create; it gives a :class:`~pyvm.migration.control.channel.Channel`
(a byte pipe wrapped in a :class:`StreamChannel`, or rdma's page placement wrapped in a
:class:`PlacementChannel`).  Incoming: :func:`prepare_incoming` binds a listener at once
(so a bad address fails the command and ``query-migrate`` can show the real port) and
returns a callable that waits for the peer; files and commands are opened by that
callable.

rdma: both ends list the same RAM blocks in the same order (they run with the same
arguments), so a block's index names it on the wire.  ``PYVM_RDMA_PROVIDER`` picks the
libfabric provider.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from pyvm.host_sockets import PortError, parse_port
from pyvm.migration.control.address import (ExecMigrationAddress, FdSocketAddress,
                                            FileMigrationAddress, InetSocketAddress,
                                            MigrationAddress, RdmaMigrationAddress,
                                            SocketMigrationAddress, UnixSocketAddress)
from pyvm.migration.control.channel import Channel, PlacementChannel, StreamChannel
from pyvm.migration.control.multifd_channel import MultifdChannel, MultifdConfig
from pyvm.migration.transports import (AbortSignal, IncomingChannel, Listener, RecordChannel,
                                       TransportError,
                                       connect_inet, connect_unix, exec_incoming, exec_outgoing,
                                       file_incoming, file_outgoing, from_fd, incoming_from_fd)
from pyvm.migration.transports.fabric import PROVIDER_ENV
from pyvm.migration.transports.rdma_transport import BlockSpec, RdmaListener, RdmaOutgoing

if TYPE_CHECKING:
    from pyvm.ram import RamBlock

STREAMING = (SocketMigrationAddress, RdmaMigrationAddress)

#: The RAM blocks that are migrated, in order (called when the channel opens).
BlockList = Callable[[], Sequence["RamBlock"]]


def _fd_number(sock: FdSocketAddress) -> int:
    try:
        return int(sock.name, 10)
    except ValueError:
        raise TransportError(f"File descriptor named '{sock.name}' has not been found") from None


def _inet_kwargs(inet: InetSocketAddress) -> dict[str, Any]:
    return {"ipv4": inet.ipv4, "ipv6": inet.ipv6}


def _port(text: str) -> int:
    try:
        return parse_port(text)
    except PortError as err:
        raise TransportError(str(err)) from None


def _provider() -> str | None:
    return os.environ.get(PROVIDER_ENV) or None


def _block_specs(blocks: BlockList) -> list[BlockSpec]:
    return [(b.name, b.mem, b.size) for b in blocks()]


def outgoing_opener(addr: MigrationAddress, abort: AbortSignal, blocks: BlockList,
                    rdma_pin_all: bool = False,
                    upgrade: Callable[[RecordChannel], RecordChannel] | None = None,
                    multifd: MultifdConfig | None = None) -> Callable[[], Channel]:
    """A callable that opens the outgoing channel for ``addr`` (runs on the migration thread).

    ``upgrade`` (TLS, pyvm.migration.control.tls_setup) turns a connected tcp/unix pipe into the
    pipe to use.  ``multifd`` (tcp and unix only): the main channel and the page channels,
    every one connected and upgraded the same way."""
    up: Callable[[RecordChannel], RecordChannel] = upgrade or (lambda pipe: pipe)
    if isinstance(addr, SocketMigrationAddress):
        sock = addr.socket
        connect: Callable[[], RecordChannel] | None = None
        if isinstance(sock, InetSocketAddress):
            def connect() -> RecordChannel:
                return up(connect_inet(sock.host, _port(sock.port), abort=abort,
                                       **_inet_kwargs(sock)))
        elif isinstance(sock, UnixSocketAddress):
            def connect() -> RecordChannel:
                return up(connect_unix(sock.path, abort=abort))
        if connect is not None:
            opener = connect
            if multifd is not None:
                config = multifd
                return lambda: MultifdChannel.open(opener, config)
            return lambda: StreamChannel(opener())
        if isinstance(sock, FdSocketAddress):
            return lambda: StreamChannel(from_fd(_fd_number(sock)))
        raise TransportError(f"socket type '{sock.type}' is not supported by pyvm")
    if isinstance(addr, ExecMigrationAddress):
        return lambda: StreamChannel(exec_outgoing(list(addr.args)))
    if isinstance(addr, FileMigrationAddress):
        return lambda: StreamChannel(file_outgoing(addr.filename, addr.offset, abort=abort))
    if isinstance(addr, RdmaMigrationAddress):
        inet = addr.inet
        return lambda: PlacementChannel(RdmaOutgoing(inet.host, inet.port, _block_specs(blocks),
                                                     rdma_pin_all, provider=_provider(),
                                                     abort=abort))
    raise TransportError(f"unknown migration transport {addr!r}")


@dataclass
class PreparedIncoming:
    """A bound (or about to be opened) incoming channel."""

    accept: Callable[[], IncomingChannel]
    close: Callable[[], None]
    socket_address: list[dict[str, Any]] | None
    listener: Listener | None = None        # tcp/unix: TLS accepts from it itself


def _nothing() -> None:
    pass


def prepare_incoming(addr: MigrationAddress, blocks: BlockList) -> PreparedIncoming:
    if isinstance(addr, SocketMigrationAddress):
        sock = addr.socket
        if isinstance(sock, InetSocketAddress):
            lst = Listener.inet(sock.host, _port(sock.port), **_inet_kwargs(sock))
        elif isinstance(sock, UnixSocketAddress):
            lst = Listener.unix(sock.path)
        elif isinstance(sock, FdSocketAddress):
            fd = _fd_number(sock)
            return PreparedIncoming(lambda: incoming_from_fd(fd), _nothing, None)
        else:
            raise TransportError(f"socket type '{sock.type}' is not supported by pyvm")
        listen = lst.listen_address()
        return PreparedIncoming(lst.accept, lst.close, [listen.to_qapi()], lst)
    if isinstance(addr, ExecMigrationAddress):
        return PreparedIncoming(lambda: exec_incoming(list(addr.args)), _nothing, None)
    if isinstance(addr, FileMigrationAddress):
        if not os.path.exists(addr.filename):
            raise TransportError(f"Could not open '{addr.filename}': No such file or directory")
        return PreparedIncoming(lambda: file_incoming(addr.filename, addr.offset), _nothing, None)
    if isinstance(addr, RdmaMigrationAddress):
        return _prepare_rdma(addr, blocks)
    raise TransportError(f"unknown migration transport {addr!r}")


def _prepare_rdma(addr: RdmaMigrationAddress, blocks: BlockList) -> PreparedIncoming:
    listener = RdmaListener(addr.inet.host, addr.inet.port, provider=_provider())

    def accept() -> IncomingChannel:
        wanted = list(blocks())
        # Pages never populated read as zero: a zero fill need not touch them.
        return listener.accept([(b.name, b.mem, b.size) for b in wanted],
                               zero_hints=[b.unpopulated for b in wanted])
    return PreparedIncoming(accept, listener.close, None)


__all__ = ["BlockList", "PreparedIncoming", "STREAMING", "outgoing_opener", "prepare_incoming"]
