"""Socket transport: ``tcp:HOST:PORT``, ``unix:PATH``, ``fd:N`` and the ``socket`` channel forms.

Outgoing: :func:`connect_inet`, :func:`connect_unix`, :func:`from_fd`.  Incoming: a
:class:`Listener` bound to an inet or unix address (or given a listening descriptor) that
accepts the first connection only, as QEMU's migration listener does, then stops listening; and
:func:`incoming_from_fd` for a descriptor that already carries the stream.

Address handling follows QEMU's ``util/qemu-sockets.c``: ``getaddrinfo`` results are tried in
order; the ``ipv4``/``ipv6`` flags pick the address family; a wildcard IPv6 listener also takes
IPv4 connections unless a flag says otherwise; the listener sets ``SO_REUSEADDR``, uses a
backlog of one and, with ``to``, tries each port up to ``to``.  Error texts are QEMU's
(``Failed to connect to '127.0.0.1:1': Connection refused``).
"""

from __future__ import annotations

import errno as errno_codes
import os
import select
import socket
import stat
import threading
import time
from dataclasses import dataclass
from typing import Any

from pyvm.host_sockets import UNIX_PATH_MAX, bind_unix_listener
from pyvm.migration.transports.base import (AbortSignal, FdIncoming, FdOutgoing, TransportError,
                                            TransportTimeout, _FdChannel, cancelled_error,
                                            os_error, wait_ready)

# A path may fill sockaddr_un.sun_path (UNIX_PATH_MAX) without a terminating NUL; an
# abstract name has one byte less (the leading NUL).

# QEMU's migration listener passes num=1 to listen() unless multifd is on.
LISTEN_BACKLOG = 1

# How often a unix connect to a listener with a full backlog is retried.
UNIX_RETRY_SECONDS = 0.05

# Send buffer asked for stream sockets (capped by net.core.wmem_max).  TCP throughput gains
# from more than the kernel's 16 KiB starting size; a unix socket's default (about 200 KiB)
# makes the destination read in small pieces, a Python round each (bench/migration.py).
STREAM_SNDBUF = 4 << 20


# -- channels ---------------------------------------------------------------------------------
class _SocketChannel(_FdChannel):
    """What both directions do with the socket they own: shut it down on cancel, close it on
    release, or hand it over still open."""

    def __init__(self, sock: socket.socket, *, description: str) -> None:
        sock.setblocking(True)
        self._sock = sock
        super().__init__(sock.fileno(), description=description, kernel_wakeup=True)

    def _on_shutdown(self) -> None:
        if not self._released:
            _shutdown_quietly(self._sock)

    def _release(self) -> None:
        self._sock.close()

    def detach(self) -> socket.socket:
        """Give up the channel and return its socket, still open (TLS takes it over)."""
        with self._lock:
            self._released = True
        self._abort.close()
        return self._sock


class SocketOutgoing(_SocketChannel, FdOutgoing):
    """A connected stream socket the source writes to."""

    kind = "socket"
    _is_socket = True

    def _send(self, views: list[memoryview]) -> int:
        # MSG_NOSIGNAL: a closed peer gives EPIPE, never SIGPIPE, even when embedded.
        return self._sock.sendmsg(views, (), socket.MSG_NOSIGNAL)


class SocketIncoming(_SocketChannel, FdIncoming):
    """A connected stream socket the destination reads from."""

    kind = "socket"

    def _recv(self, n: int) -> bytes:
        return self._sock.recv(n)

    def _recv_into(self, view: memoryview) -> int:
        return self._sock.recv_into(view)


def _shutdown_quietly(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass                     # not connected (any more): nothing to wake


# -- address helpers ---------------------------------------------------------------------------
def _ai_family(host: str, ipv4: bool | None, ipv6: bool | None) -> int:
    """QEMU's ``inet_ai_family_from_address`` matrix."""
    if ipv4 is False and ipv6 is False:
        raise TransportError("Cannot disable IPv4 and IPv6 at same time")
    if ipv4 and ipv6:
        return socket.AF_INET6 if not host else socket.AF_UNSPEC
    if ipv6 or ipv4 is False:
        return socket.AF_INET6
    if ipv4 or ipv6 is False:
        return socket.AF_INET
    return socket.AF_UNSPEC


def _resolve(host: str, port: str, family: int, flags: int) -> list[tuple[Any, ...]]:
    try:
        return socket.getaddrinfo(host or None, port or None, family, socket.SOCK_STREAM, 0, flags)
    except socket.gaierror as err:
        raise TransportError(f"address resolution failed for {host}:{port}: "
                             f"{err.strerror}") from err
    except UnicodeError as err:
        raise TransportError(f"address resolution failed for {host}:{port}: {err}") from err


def _unix_sockaddr(path: str, abstract: bool, tight: bool) -> str | bytes:
    raw = os.fsencode(path)
    limit = UNIX_PATH_MAX - 1 if abstract else UNIX_PATH_MAX
    if len(raw) > limit:
        # QEMU adds the hint "Path must be less than %zu bytes" on a line of its own.
        raise TransportError(f"UNIX socket path '{path}' is too long")
    if not abstract:
        return raw
    name = b"\0" + raw
    return name if tight else name.ljust(UNIX_PATH_MAX, b"\0")


# -- outgoing ----------------------------------------------------------------------------------
def connect_inet(host: str, port: str | int, *, ipv4: bool | None = None,
                 ipv6: bool | None = None, keep_alive: bool = False, numeric: bool = False,
                 abort: AbortSignal | None = None) -> SocketOutgoing:
    """Connect to ``host:port`` (``host`` without brackets for IPv6: ``::1``).

    ``abort`` (optional) lets another thread interrupt a slow connect
    (:class:`TransportCancelled`); once connected, ``shutdown()`` of the channel aborts writes.
    """
    port = str(port)
    if not host or not port:
        raise TransportError("host and/or port not specified")
    flags = socket.AI_CANONNAME | socket.AI_V4MAPPED
    if numeric:
        flags |= socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
    last: TransportError | None = None
    for family, kind, proto, _name, sockaddr in _resolve(host, port, _ai_family(host, ipv4, ipv6),
                                                        flags):
        try:
            sock = socket.socket(family, kind, proto)
        except OSError as err:
            last = os_error(f"Failed to create socket family {family}", err)
            continue
        try:
            _connect(sock, sockaddr, abort)
        except TransportError as err:
            sock.close()
            if abort is not None and abort.triggered:
                raise cancelled_error(f"Failed to connect to '{host}:{port}'") from err
            last = TransportError(f"Failed to connect to '{host}:{port}': {err}", errno=err.errno)
            continue
        _tune_stream_socket(sock)
        if keep_alive:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            except OSError as err:
                sock.close()
                raise os_error("Unable to set keep-alive option on socket", err) from err
        return SocketOutgoing(sock, description=f"tcp:{_join_host_port(host, port)}")
    assert last is not None
    raise last


def _connect(sock: socket.socket, sockaddr: tuple[Any, ...], abort: AbortSignal | None) -> None:
    """Non-blocking connect that an :class:`AbortSignal` can interrupt (error: strerror only)."""
    sock.setblocking(False)
    code = sock.connect_ex(sockaddr)
    if code in (errno_codes.EINPROGRESS, errno_codes.EALREADY):
        while True:
            wait_ready(sock.fileno(), select.POLLOUT, abort)
            if abort is not None and abort.triggered:
                raise TransportError(os.strerror(errno_codes.ECANCELED),
                                     errno=errno_codes.ECANCELED)
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code != errno_codes.EINPROGRESS:
                break
    if code:
        raise TransportError(os.strerror(code), errno=code)


def _tune_stream_socket(sock: socket.socket) -> None:
    """A large send buffer; for TCP, Nagle stays on (the stream is bulk data)."""
    try:
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < STREAM_SNDBUF:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SNDBUF)
    except OSError:
        pass                     # tuning only


def _join_host_port(host: str, port: str | int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def connect_unix(path: str, *, abstract: bool = False, tight: bool = True,
                 abort: AbortSignal | None = None) -> SocketOutgoing:
    """Connect to the unix socket at ``path`` (``abstract``: Linux abstract namespace).

    A listener whose backlog is full makes a unix connect wait; ``abort`` interrupts that.
    """
    address = _unix_sockaddr(path, abstract, tight)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    while True:
        code = sock.connect_ex(address)
        if code != errno_codes.EAGAIN:   # unix sockets: EAGAIN = backlog full, try again
            break
        # Not POLLOUT: an unconnected unix socket polls writable at once (unix_poll in
        # Linux net/unix/af_unix.c), which made this loop spin at full CPU.  Wait for the
        # retry period, or less if aborted.
        if abort is not None:
            wait_ready(abort.fileno(), select.POLLIN, None, UNIX_RETRY_SECONDS)
        else:
            time.sleep(UNIX_RETRY_SECONDS)
        if abort is not None and abort.triggered:
            sock.close()
            raise cancelled_error(f"Failed to connect to '{path}'")
    if code:
        sock.close()
        raise TransportError(f"Failed to connect to '{path}': {os.strerror(code)}", errno=code)
    _tune_stream_socket(sock)
    return SocketOutgoing(sock, description=f"unix:{path}")


def _fd_mode(fd: int) -> int:
    try:
        return os.fstat(fd).st_mode
    except OSError as err:
        raise os_error(f"Unable to use file descriptor {fd}", err) from err


def from_fd(fd: int, *, require_socket: bool = False) -> FdOutgoing:
    """An outgoing channel over an inherited descriptor (``fd:N``); the channel owns it.

    A socket gets socket semantics and texts; a pipe or file is written like ``file:``.
    ``require_socket`` is the ``socket`` channel form's check.
    """
    if stat.S_ISSOCK(_fd_mode(fd)):
        return SocketOutgoing(socket.socket(fileno=fd), description=f"fd:{fd}")
    if require_socket:
        raise TransportError(f"File descriptor '{fd}' is not a socket")
    return FdOutgoing(fd, description=f"fd:{fd}")


def incoming_from_fd(fd: int, *, require_socket: bool = False) -> FdIncoming:
    """An incoming channel over an inherited descriptor that carries the stream."""
    if stat.S_ISSOCK(_fd_mode(fd)):
        return SocketIncoming(socket.socket(fileno=fd), description=f"fd:{fd}")
    if require_socket:
        raise TransportError(f"File descriptor '{fd}' is not a socket")
    return FdIncoming(fd, description=f"fd:{fd}")


# -- incoming ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ListenAddress:
    """Where a :class:`Listener` listens, with the real port when port 0 was asked."""

    type: str                    # "inet" or "unix"
    host: str = ""
    port: int = 0
    ipv6: bool = False
    path: str = ""
    abstract: bool = False

    def to_qapi(self) -> dict[str, object]:
        """QEMU's ``SocketAddress`` as query-migrate's ``socket-address`` shows it."""
        if self.type == "unix":
            result: dict[str, object] = {"type": "unix", "path": self.path}
            if self.abstract:
                result["abstract"] = True
            return result
        family = "ipv6" if self.ipv6 else "ipv4"
        return {"type": "inet", "host": self.host, "port": str(self.port), family: True}

    def __str__(self) -> str:
        if self.type == "unix":
            return f"unix:{self.path}"
        return f"tcp:{_join_host_port(self.host, self.port)}"


class Listener:
    """A listening socket that hands out the first connection as a :class:`SocketIncoming`.

    ``close()`` may be called from any thread; it aborts a pending :meth:`accept`.  A unix
    socket file is created with mode 0600 and removed again at close (if it is still ours).
    """

    def __init__(self, sock: socket.socket, address: ListenAddress,
                 unlink: tuple[str, int, int] | None = None) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._address = address
        self._unlink = unlink                # (path, st_dev, st_ino) of our socket file
        self._abort = AbortSignal()
        self._lock = threading.Lock()
        self._closed = False
        self._accepting = False

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def inet(cls, host: str, port: str | int, *, ipv4: bool | None = None,
             ipv6: bool | None = None, to: int | None = None, numeric: bool = False,
             keep_alive: bool = False) -> "Listener":
        """Listen on ``host:port`` (``""``, ``0.0.0.0`` or ``::`` for all addresses)."""
        port = str(port)
        flags = socket.AI_PASSIVE
        if numeric:
            flags |= socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
        family = _ai_family(host, ipv4, ipv6)
        # IPV6_V6ONLY=0 (dual stack) unless exactly one family was asked for.
        v6only = not ((ipv4 is None and ipv6 is None) or (ipv4 and ipv6))
        created = False
        last_err: OSError | None = None
        for fam, kind, proto, _name, sockaddr in _resolve(host, port, family, flags):
            first = sockaddr[1]
            for number in range(first, (to if to is not None else first) + 1):
                try:
                    sock = socket.socket(fam, kind, proto)
                except OSError as err:
                    last_err = err
                    if number == first:
                        break
                    raise os_error("Failed to recreate failed listening socket", err) from err
                created = True
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    _bind(sock, (sockaddr[0], number, *sockaddr[2:]), v6only)
                    sock.listen(LISTEN_BACKLOG)
                    if keep_alive:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                except OSError as err:
                    sock.close()
                    if err.errno == errno_codes.EADDRINUSE:
                        last_err = err
                        continue
                    raise os_error("Failed to bind socket", err) from err
                bound = sock.getsockname()
                return cls(sock, ListenAddress("inet", host=bound[0], port=bound[1],
                                               ipv6=fam == socket.AF_INET6))
        failure = last_err or OSError(errno_codes.EADDRNOTAVAIL,
                                      os.strerror(errno_codes.EADDRNOTAVAIL))
        raise os_error("Failed to find an available port" if created
                       else "Failed to create a socket", failure)

    @classmethod
    def unix(cls, path: str, *, abstract: bool = False, tight: bool = True) -> "Listener":
        """Listen on a unix socket (a stale socket file at ``path`` is replaced, any other
        file is refused: :mod:`pyvm.host_sockets`)."""
        address = _unix_sockaddr(path, abstract, tight)
        if not abstract:
            try:
                sock = bind_unix_listener(path, LISTEN_BACKLOG)
            except OSError as err:
                raise os_error(f"Failed to bind socket to {path}", err) from err
            try:
                st = os.stat(path)
            except OSError as err:
                sock.close()
                raise os_error(f"Failed to bind socket to {path}", err) from err
            return cls(sock, ListenAddress("unix", path=path), (path, st.st_dev, st.st_ino))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                sock.bind(address)
            except OSError as err:
                raise os_error(f"Failed to bind socket to {path}", err) from err
            try:
                sock.listen(LISTEN_BACKLOG)
            except OSError as err:
                raise os_error("Failed to listen on socket", err) from err
        except BaseException:
            sock.close()
            raise
        return cls(sock, ListenAddress("unix", path=path, abstract=True), None)

    @classmethod
    def from_fd(cls, fd: int) -> "Listener":
        """Listen on an inherited socket (``socket`` channel of type ``fd``)."""
        if not stat.S_ISSOCK(_fd_mode(fd)):
            raise TransportError(f"File descriptor '{fd}' is not a socket")
        sock = socket.socket(fileno=fd)
        try:
            sock.listen(LISTEN_BACKLOG)
        except OSError as err:
            sock.close()
            raise os_error("Failed to listen on socket", err) from err
        bound = sock.getsockname()
        if sock.family == socket.AF_UNIX:
            name = bound.decode(errors="replace") if isinstance(bound, bytes) else bound
            address = ListenAddress("unix", path=name.lstrip("\0"), abstract=name.startswith("\0"))
        else:
            address = ListenAddress("inet", host=bound[0], port=bound[1],
                                    ipv6=sock.family == socket.AF_INET6)
        return cls(sock, address)

    # -- use -----------------------------------------------------------------------------------
    def listen_address(self) -> ListenAddress:
        return self._address

    def set_backlog(self, backlog: int) -> None:
        """Queue up to ``backlog`` connections (QEMU's migration listener queues
        ``multifd-channels`` with multifd, migration/socket.c)."""
        with self._lock:
            if not self._closed:
                self._sock.listen(max(1, backlog))

    def fileno(self) -> int:
        return self._sock.fileno()

    def accept(self, timeout: float | None = None, *, keep_open: bool = False) -> SocketIncoming:
        """Wait for the first connection; the listener stops listening once it is accepted
        (unless ``keep_open``: TLS keeps listening until a peer passes its checks)."""
        with self._lock:
            if self._closed:
                raise cancelled_error("could not accept migration connection")
            self._accepting = True
        try:
            if not wait_ready(self._sock.fileno(), select.POLLIN, self._abort, timeout):
                raise TransportTimeout(f"no migration connection on {self._address} "
                                       f"within {timeout:g} s", errno=errno_codes.ETIMEDOUT)
            while True:
                if self._abort.triggered:
                    raise cancelled_error("could not accept migration connection")
                try:
                    conn, peer = self._sock.accept()
                    break
                except BlockingIOError:
                    wait_ready(self._sock.fileno(), select.POLLIN, self._abort)
                except OSError as err:
                    raise TransportError(f"could not accept migration connection "
                                         f"({os.strerror(err.errno or errno_codes.EIO)})",
                                         errno=err.errno) from err
        finally:
            with self._lock:
                self._accepting = False
                if self._closed:
                    self._release()
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
            description = f"tcp:{_join_host_port(peer[0], peer[1])}"
        else:
            description = str(self._address)
        if not keep_open:
            self.close()                     # QEMU accepts only the first connection
        return SocketIncoming(conn, description=description)

    def close(self) -> None:
        """Stop listening; safe from any thread, wakes a pending :meth:`accept`."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._abort.trigger()
            if not self._accepting:
                self._release()

    def _release(self) -> None:
        """Close the socket and remove our socket file; called once, under the lock."""
        self._sock.close()
        self._abort.close()
        if self._unlink is not None:
            path, dev, ino = self._unlink
            self._unlink = None
            try:
                st = os.stat(path)
                if (st.st_dev, st.st_ino) == (dev, ino):
                    os.unlink(path)
            except OSError:
                pass

    def __enter__(self) -> "Listener":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _bind(sock: socket.socket, sockaddr: tuple[Any, ...], v6only: bool) -> None:
    """bind(); a dual-stack IPv6 bind that collides on IPv4 retries IPv6-only (QEMU's try_bind)."""
    if sock.family != socket.AF_INET6:
        sock.bind(sockaddr)
        return
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
    try:
        sock.bind(sockaddr)
    except OSError as err:
        if err.errno != errno_codes.EADDRINUSE or v6only:
            raise
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
