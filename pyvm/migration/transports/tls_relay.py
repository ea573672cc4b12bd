"""TLS on a migration socket: the handshake with QEMU's checks, then a relay thread.

The channels above write page batches straight from guest RAM with ``sendmsg`` on a file
descriptor; Python's :mod:`ssl` encrypts only through its own socket object.  So once the
handshake succeeded, the plaintext side is one end of a ``socketpair``: the migration
reads or writes it as it would a plain socket (the very same channel classes), and a relay
thread owned by the channel moves the bytes between the pair and the TLS socket.  The
channel's ``shutdown()`` (``migrate_cancel``) shuts both sockets down, which wakes the relay
and the migration thread at once; ``close()`` joins the relay, so on the source every byte
has been handed to TLS (and ``close_notify`` sent) before the migration counts as done.

Checks after the handshake follow crypto/tlssession.c ``qcrypto_tls_session_check_certificate``
(texts included): the peer's certificate against the CA, the host name on the client
side, and on the server side the ``tls-authz`` object against the client's distinguished
name (``TLS x509 authz check for %s is denied``).
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time
from typing import Protocol

from pyvm.migration.transports.base import (AbortSignal, TransportCancelled, TransportError,
                                            cancelled_error, wait_ready)
from pyvm.migration.transports.socket_transport import SocketIncoming, SocketOutgoing
from pyvm.tls import (AuthzList, AuthzSimple, TlsCreds, TlsCredsPsk, TlsError,
                      distinguished_name, handshake_error)
from pyvm.tls_pump import TlsPump, engine_for, handshake

#: a peer that does not finish its handshake within this time is dropped
HANDSHAKE_TIMEOUT = 10.0
RELAY_CHUNK = 1 << 20
#: seconds a closing destination lets its TLS pump pass on its last bytes
PUMP_FLUSH_TIMEOUT = 5.0

def _handshake(tls: ssl.SSLSocket, abort: AbortSignal | None, hostname: str | None) -> None:
    """Non-blocking handshake that ``abort`` interrupts; QEMU's texts on failure."""
    tls.setblocking(False)
    deadline = time.monotonic() + HANDSHAKE_TIMEOUT
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            events = select.POLLIN
        except ssl.SSLWantWriteError:
            events = select.POLLOUT
        except ssl.SSLError as err:
            raise handshake_error(err, hostname) from err
        except OSError as err:
            raise TlsError(f"TLS handshake failed: {err.strerror or err}") from err
        left = deadline - time.monotonic()
        if left <= 0:
            raise TlsError("TLS handshake failed: timed out")
        wait_ready(tls.fileno(), events, abort, min(left, 0.5))
        if abort is not None and abort.triggered:
            raise cancelled_error("TLS handshake")
    tls.setblocking(True)


class _Relay:
    """Copies one direction between a plain socket and a TLS socket on its own thread."""

    def __init__(self, name: str, tls: ssl.SSLSocket, plain: socket.socket, outgoing: bool) -> None:
        self.tls = tls
        self.plain = plain
        self.outgoing = outgoing
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        buf = bytearray(RELAY_CHUNK)
        view = memoryview(buf)
        src, dst = (self.plain, self.tls) if self.outgoing else (self.tls, self.plain)
        try:
            while True:
                try:
                    n = src.recv_into(view)
                except ssl.SSLZeroReturnError:
                    n = 0
                except ssl.SSLEOFError:        # the peer closed without close_notify
                    n = 0
                if n == 0:
                    break
                dst.sendall(view[:n])
            if self.outgoing:
                # close_notify says the stream ended on purpose; the destination may close
                # without answering it, which changes nothing for bytes already sent
                try:
                    self.tls.unwrap()
                except (ssl.SSLError, OSError):
                    pass
            else:
                self.plain.shutdown(socket.SHUT_WR)
        except (OSError, ValueError) as err:
            self.error = str(err) or type(err).__name__
            for s in (self.plain, self.tls):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        finally:
            view.release()

    def stop(self) -> None:
        """Wake the relay (cancel): both sockets are shut down."""
        for s in (self.plain, self.tls):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def join(self) -> None:
        self.thread.join()
        self.tls.close()
        self.plain.close()


class _Mover(Protocol):
    """What moves bytes between a channel's plaintext socket and TLS: a relay or a pump."""

    error: str | None

    def stop(self) -> None: ...

    def join(self) -> None: ...


class RelayedOutgoing(SocketOutgoing):
    """A source channel whose plaintext socket is carried over TLS by ``mover``: a cancel
    stops it, and closing waits until it has flushed and said goodbye."""

    def __init__(self, plain: socket.socket, mover: _Mover, *, description: str) -> None:
        self._mover = mover
        super().__init__(plain, description=description)

    def _on_shutdown(self) -> None:
        super()._on_shutdown()
        self._mover.stop()

    def _release(self) -> None:
        super()._release()               # EOF for the mover, which flushes and says goodbye
        self._mover.join()
        if self._mover.error is not None and not self.cancelled and self.error is None:
            raise TransportError(f"Unable to write to socket: {self._mover.error}")


class TlsOutgoing(RelayedOutgoing):
    """The source's end of a TLS connection: plaintext into a socketpair, relayed one way
    (a connection with a return path goes through a pump instead: :func:`tls_client`)."""

    def __init__(self, tls: ssl.SSLSocket, *, description: str) -> None:
        mine, theirs = socket.socketpair()
        super().__init__(mine, _Relay("migration-tls-out", tls, theirs, outgoing=True),
                         description=description)


class TlsIncoming(SocketIncoming):
    """The destination's end: the relay decrypts into a socketpair the decoder reads."""

    def __init__(self, tls: ssl.SSLSocket, *, description: str) -> None:
        mine, theirs = socket.socketpair()
        self._relay = _Relay("migration-tls-in", tls, theirs, outgoing=False)
        super().__init__(mine, description=description)

    def _on_shutdown(self) -> None:
        super()._on_shutdown()
        self._relay.stop()

    def _release(self) -> None:
        super()._release()
        self._relay.stop()
        self._relay.join()


class PumpOutgoing(RelayedOutgoing):
    """The source's end of a TLS session run by a :class:`pyvm.tls_pump.TlsPump`
    (``tls-creds-psk``): plaintext into the pump's socketpair."""

    def __init__(self, pump: TlsPump, *, description: str) -> None:
        super().__init__(pump.plain, pump, description=description)


class PumpIncoming(SocketIncoming):
    """The destination's end of a pumped TLS session."""

    def __init__(self, pump: TlsPump, *, description: str) -> None:
        self._pump = pump
        super().__init__(pump.plain, description=description)

    def _on_shutdown(self) -> None:
        super()._on_shutdown()
        self._pump.stop()

    def _release(self) -> None:
        super()._release()               # EOF for the pump: it sends what was written back
        self._pump.join(PUMP_FLUSH_TIMEOUT)  # (postcopy's last return-path message) first
        if self._pump.alive:
            self._pump.stop()
            self._pump.join()


def _pumped(sock: socket.socket, creds: TlsCreds, server: bool, hostname: str | None,
            authz: AuthzSimple | AuthzList | None, abort: AbortSignal | None) -> TlsPump:
    """Handshake (and authz) through a sans-IO engine, then a pump; sock closed on failure."""
    try:
        engine = engine_for(creds, server, hostname)
        try:
            handshake(sock, engine, authz, aborted=lambda: abort is not None and abort.triggered)
        except TlsError:
            if abort is not None and abort.triggered:
                raise cancelled_error("TLS handshake") from None
            raise
    except BaseException:
        sock.close()
        raise
    return TlsPump(sock, engine, "migration-tls-" + ("in" if server else "out"))


def tls_client(channel: SocketOutgoing, creds: TlsCreds, hostname: str | None,
               abort: AbortSignal | None, duplex: bool = False) -> SocketOutgoing:
    """Upgrade a connected source channel to TLS (migration/tls.c
    ``migration_tls_channel_connect``); TlsError with QEMU's text when refused.

    ``duplex``: the destination writes back on this connection (postcopy's return path),
    so one thread must own the session both ways: a :class:`TlsPump`, as for PSK
    credentials.  Otherwise a relay thread per direction over ``ssl``'s own socket."""
    if isinstance(creds, TlsCredsPsk):
        # no certificate, so no host name to check
        description = channel.description
        return PumpOutgoing(_pumped(channel.detach(), creds, False, None, None, abort),
                            description=description)
    if not hostname:
        channel.close()
        raise TlsError("No hostname available for TLS")
    description = channel.description
    if duplex:
        return PumpOutgoing(_pumped(channel.detach(), creds, False, hostname, None, abort),
                            description=description)
    sock = channel.detach()
    try:
        ctx = creds.context()
        if creds.verify_peer:
            ctx.check_hostname = True
        tls = ctx.wrap_socket(sock, server_side=False, server_hostname=hostname or None,
                              do_handshake_on_connect=False)
        _handshake(tls, abort, hostname)
    except BaseException:
        sock.close()
        raise
    return TlsOutgoing(tls, description=description)


def tls_server(channel: SocketIncoming, creds: TlsCreds,
               authz: AuthzSimple | AuthzList | None, abort: AbortSignal | None,
               duplex: bool = False) -> SocketIncoming:
    """Upgrade an accepted destination channel to TLS and check the client
    (``migration_tls_channel_process_incoming``); TlsError with QEMU's text when refused."""
    description = channel.description
    if isinstance(creds, TlsCredsPsk) or duplex:       # duplex: see tls_client
        return PumpIncoming(_pumped(channel.detach(), creds, True, None, authz, abort),
                            description=description)
    sock = channel.detach()
    try:
        tls = creds.context().wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        _handshake(tls, abort, None)
        if creds.verify_peer and authz is not None:
            name = distinguished_name(tls.getpeercert() or {})
            if not authz.is_allowed(name):
                raise TlsError(f"TLS x509 authz check for {name} is denied")
    except BaseException:
        sock.close()
        raise
    return TlsIncoming(tls, description=description)


__all__ = ["PumpIncoming", "PumpOutgoing", "TlsIncoming", "TlsOutgoing", "TransportCancelled", "tls_client", "tls_server"]
