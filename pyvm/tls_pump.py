"""A TLS session on a plain socket, pumped by one thread into a socketpair.

Users of a byte socket (a serial backend, a migration channel) keep reading and writing a
plain socket; the other end of a ``socketpair`` belongs to a :class:`TlsPump`, whose one
thread owns the TLS state: it decrypts what the peer sends into the pair and encrypts what
the pair yields for the peer.  One thread, so the TLS state (OpenSSL's ``SSL`` object,
which must not be used by two threads at once) is never shared.

The TLS state itself is a :class:`TlsEngine`: a sans-IO session fed with ciphertext and
asked for plaintext (Python's ``ssl.SSLObject`` over memory BIOs for X.509 credentials,
:mod:`pyvm.tls_psk` for pre-shared keys).  :func:`handshake` runs the handshake on the
raw socket with a deadline and a cancel check, then the checks of crypto/tlssession.c
``qcrypto_tls_session_check_credentials`` (QEMU's texts): the certificate, and on a
server with ``tls-authz`` the distinguished name of the client's certificate.

Buffers are bounded (:data:`BUFFER_CAP` each way): a peer that stops reading stops the
pump reading from the other side, it never grows memory.  :meth:`TlsPump.stop` wakes the
thread (socket shutdown), :meth:`TlsPump.join` waits for it and closes the raw socket.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time
from typing import Callable, Protocol

from pyvm.tls import (AuthzList, AuthzSimple, TlsClosed, TlsCreds, TlsCredsPsk, TlsError,
                      distinguished_name, handshake_error)

#: a peer that does not finish its handshake within this time is dropped
HANDSHAKE_TIMEOUT = 10.0
BUFFER_CAP = 1 << 20
READ_CHUNK = 1 << 16
POLL_MS = 200


class TlsEngine(Protocol):
    """A sans-IO TLS session."""

    def do_handshake(self) -> bool:
        """Advance the handshake: True once done; TlsError (QEMU's text) on failure."""

    def feed(self, data: bytes) -> None:
        """Ciphertext received from the peer."""

    def feed_eof(self) -> None:
        """The peer's socket reached EOF."""

    def read(self) -> bytes:
        """Plaintext ready now (b"" when none); TlsClosed at the end of the session."""

    def write(self, data: bytes) -> None:
        """Plaintext to send (all of it is taken)."""

    def close(self) -> None:
        """Start the end of the session (close_notify)."""

    def take_output(self) -> bytes:
        """Ciphertext to send to the peer now (b"" when none)."""

    def peer_name(self) -> str | None:
        """The distinguished name of the peer's certificate, or None without one."""


class SslObjectEngine:
    """:class:`TlsEngine` over :class:`ssl.SSLObject` (X.509 credentials)."""

    def __init__(self, ctx: ssl.SSLContext, server_side: bool, hostname: str | None) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._hostname = hostname
        self._obj = ctx.wrap_bio(self._in, self._out, server_side=server_side,
                                 server_hostname=None if server_side else hostname)

    def do_handshake(self) -> bool:
        try:
            self._obj.do_handshake()
            return True
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLError as err:
            raise handshake_error(err, self._hostname) from err

    def feed(self, data: bytes) -> None:
        self._in.write(data)

    def feed_eof(self) -> None:
        self._in.write_eof()

    def read(self) -> bytes:
        parts: list[bytes] = []
        while True:
            try:
                chunk = self._obj.read(READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError) as err:
                if parts:
                    break                   # hand these over first; the end comes next call
                raise TlsClosed() from err
            if not chunk:
                if parts:
                    break
                raise TlsClosed()
            parts.append(chunk)
        return b"".join(parts)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = self._obj.write(view)
            view = view[n:]

    def close(self) -> None:
        try:
            self._obj.unwrap()
        except ssl.SSLError:
            pass

    def take_output(self) -> bytes:
        return self._out.read()

    def peer_name(self) -> str | None:
        cert = self._obj.getpeercert()
        return distinguished_name(cert) if cert else None


def engine_for(creds: TlsCreds, server_side: bool, hostname: str | None) -> TlsEngine:
    """A fresh session for one connection with these credentials (files read now).

    A client verifying its peer checks the certificate against ``hostname``
    (crypto/tlssession.c)."""
    if isinstance(creds, TlsCredsPsk):
        from pyvm.tls_psk import PskEngine          # pyOpenSSL: only when PSK is used
        return PskEngine(creds, server_side)
    ctx = creds.context()
    if not server_side and creds.verify_peer:
        ctx.check_hostname = True
    return SslObjectEngine(ctx, server_side, hostname)


def _send_all(sock: socket.socket, data: bytes, deadline: float,
              aborted: Callable[[], bool]) -> None:
    view = memoryview(data)
    while view:
        try:
            n = sock.send(view)
            view = view[n:]
            continue
        except BlockingIOError:
            pass
        if aborted() or time.monotonic() > deadline:
            raise TlsError("TLS handshake failed: timed out")
        select.select([], [sock], [], 0.2)


def handshake(sock: socket.socket, engine: TlsEngine,
              authz: AuthzSimple | AuthzList | None = None, *,
              aborted: Callable[[], bool] = lambda: False,
              timeout: float = HANDSHAKE_TIMEOUT) -> None:
    """Run the handshake on the connected ``sock`` (left non-blocking), then the checks.

    TlsError with QEMU's text when the peer is refused; ``aborted()`` true ends the wait
    with TlsError too (the caller is closing)."""
    sock.setblocking(False)
    deadline = time.monotonic() + timeout
    while True:
        try:
            done = engine.do_handshake()
        except TlsError:
            try:
                sock.send(engine.take_output())    # the alert, so the peer learns why
            except OSError:
                pass
            raise
        _send_all(sock, engine.take_output(), deadline, aborted)
        if done:
            break
        left = deadline - time.monotonic()
        if left <= 0 or aborted():
            raise TlsError("TLS handshake failed: timed out" if left <= 0 else
                           "TLS handshake failed: cancelled")
        ready, _, _ = select.select([sock], [], [], min(left, 0.2))
        if not ready:
            continue
        try:
            data = sock.recv(READ_CHUNK)
        except BlockingIOError:
            continue
        except OSError as err:
            raise TlsError(f"TLS handshake failed: {err.strerror or err}") from err
        if not data:
            engine.feed_eof()
            try:
                engine.do_handshake()
            except TlsError:
                raise
            raise TlsError("TLS handshake failed: the peer closed the connection")
        engine.feed(data)
    if authz is not None:
        name = engine.peer_name()
        if name is None:
            raise TlsError("No certificate peers")
        if not authz.is_allowed(name):
            kind = getattr(engine, "kind", "x509")
            raise TlsError(f"TLS {kind} authz check for {name} is denied")


class TlsPump:
    """One thread between a TLS socket (after :func:`handshake`) and a plain socketpair.

    :attr:`plain` is the end the user reads and writes like any socket.  The session ends
    when either side ends: the peer's close or EOF gives EOF on :attr:`plain` once all the
    peer sent was delivered, and the pump stops; EOF on :attr:`plain` (the user shut it
    down or closed it) sends close_notify to the peer."""

    def __init__(self, sock: socket.socket, engine: TlsEngine, name: str) -> None:
        self.raw = sock
        self.engine = engine
        self.plain, self._theirs = socket.socketpair()
        self._theirs.setblocking(False)
        self.raw.setblocking(False)
        self.error: str | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- owner API ----------------------------------------------------------------------------
    def stop(self) -> None:
        """Wake and end the pump now (a cancel, or the user closing)."""
        self._stopping = True
        for s in (self.raw, self._theirs):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def join(self, timeout: float | None = None) -> None:
        """Wait for the thread; the raw socket and the pump's end of the pair are closed."""
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.raw.close()
            self._theirs.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        to_raw = bytearray()
        to_plain = bytearray()
        raw_eof = False             # the peer's socket reached EOF
        peer_done = False           # the peer ended: deliver what is left, then EOF
        plain_shut = False
        user_done = False           # the user ended: flush, close_notify, stop
        try:
            while not self._stopping:
                if not peer_done:
                    try:
                        data = self.engine.read()
                        to_plain += data
                        peer_done = raw_eof and not data
                    except TlsClosed:
                        peer_done = True
                to_raw += self.engine.take_output()
                if peer_done and not to_plain and not plain_shut:
                    self._theirs.shutdown(socket.SHUT_WR)   # EOF for the user
                    plain_shut = True
                    if not user_done:
                        # The peer ended the session: answer its close_notify and stop, even
                        # while the user still holds the pair open (postcopy's source keeps
                        # a second descriptor of it for the return path).
                        user_done = True
                        self.engine.close()
                        to_raw += self.engine.take_output()
                if user_done and not to_raw:
                    return                                 # close_notify is out
                raw_ev = (select.POLLIN if not peer_done and len(to_plain) < BUFFER_CAP else 0) \
                    | (select.POLLOUT if to_raw else 0)
                plain_ev = 0 if user_done else \
                    ((select.POLLIN if len(to_raw) < BUFFER_CAP else 0)
                     | (select.POLLOUT if to_plain else 0))
                poller = select.poll()
                if raw_ev:
                    poller.register(self.raw, raw_ev)
                if plain_ev:
                    poller.register(self._theirs, plain_ev)
                events = dict(poller.poll(POLL_MS))
                ev = events.get(self.raw.fileno(), 0)
                if ev & select.POLLOUT:
                    del to_raw[:self.raw.send(to_raw)]
                elif ev & (select.POLLHUP | select.POLLERR) and not raw_ev & select.POLLIN:
                    return                  # the peer is gone: what is left cannot reach it
                if ev & (select.POLLIN | select.POLLHUP | select.POLLERR) and raw_ev & select.POLLIN:
                    data = self.raw.recv(READ_CHUNK)
                    if data:
                        self.engine.feed(data)
                    else:
                        self.engine.feed_eof()
                        raw_eof = True
                ev = events.get(self._theirs.fileno(), 0)
                if ev & select.POLLOUT and to_plain:
                    del to_plain[:self._theirs.send(to_plain)]
                if ev & (select.POLLIN | select.POLLHUP | select.POLLERR) and plain_ev & select.POLLIN:
                    data = self._theirs.recv(READ_CHUNK)
                    if data:
                        self.engine.write(data)
                    else:
                        user_done = True
                        self.engine.close()
        except (OSError, ValueError, TlsError, ssl.SSLError) as err:
            if not self._stopping:
                self.error = str(err) or type(err).__name__
        finally:
            for s in (self._theirs, self.raw):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


__all__ = ["HANDSHAKE_TIMEOUT", "SslObjectEngine", "TlsClosed", "TlsEngine", "TlsPump",
           "engine_for", "handshake"]
