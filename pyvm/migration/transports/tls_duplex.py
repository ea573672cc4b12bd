"""A TLS relay that carries both directions of one connection on one thread.

Postcopy writes back on the migration connection (the return path: page requests,
``SHUT``, ``PONG``; QEMU's migration/migration.c ``open_return_path_on_source`` and
savevm.c ``MIG_CMD_OPEN_RETURN_PATH``), so with TLS the plaintext socketpair of
:mod:`pyvm.migration.transports.tls_relay` must carry bytes both ways.  Python's
:class:`ssl.SSLSocket` wraps one OpenSSL ``SSL`` object, which may not be read by one
thread while another writes it; so instead of a thread per direction this relay runs one
thread over non-blocking sockets and :func:`select.select`, moving

- plaintext from the socketpair into TLS (``up``), and
- decrypted bytes from TLS into the socketpair (``down``),

each through a bounded buffer.  The ends: when the socketpair's side ends, the relay
passes on what it holds, sends ``close_notify`` (on the side that started the
connection) and stops; when the peer ends the TLS connection, the relay passes on what
it decrypted, then shuts the socketpair down (reads see the end, writes fail) and stops
(the source closes its channel while its return-path socket is still open).  :meth:`DuplexRelay.stop` shuts
both sockets down, which ends a blocked ``select``.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading

CHUNK = 1 << 20
#: bytes a direction may hold before the relay stops reading its source
LIMIT = 4 << 20
CLOSE_NOTIFY_TIMEOUT = 2.0
#: seconds a closing channel waits for the relay to pass on its last bytes
FLUSH_TIMEOUT = 5.0


class DuplexRelay:
    """Copies both directions between a plain socket and a TLS socket on one thread."""

    def __init__(self, name: str, tls: ssl.SSLSocket, plain: socket.socket, outgoing: bool) -> None:
        self.tls = tls
        self.plain = plain
        self.outgoing = outgoing
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self._relay()
        except (OSError, ValueError) as err:
            self.error = str(err) or type(err).__name__
            self.stop()

    def _relay(self) -> None:
        tls, plain = self.tls, self.plain
        tls.setblocking(False)
        plain.setblocking(False)
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        up = bytearray()                 # plain -> tls
        down = bytearray()               # tls -> plain
        plain_eof = tls_eof = down_shut = False
        write_len = 0                    # an SSL write to retry with the same length
        read_wants_write = write_wants_read = False
        try:
            while True:
                # Decrypted bytes may wait inside OpenSSL with nothing on the socket.
                if not tls_eof and len(down) < LIMIT and tls.pending():
                    tls_eof = self._read_tls(view, down)
                if tls_eof and not down and not down_shut:
                    # The peer ended the connection: nothing written here can reach it
                    # any more; the migration side reads the end and its writes fail.
                    if up:
                        self.error = "the peer closed the connection"
                    try:
                        plain.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass                 # the migration side closed already
                    down_shut = True
                    break
                if plain_eof and not up:
                    break
                rlist: list[socket.socket] = []
                wlist: list[socket.socket] = []
                if not plain_eof and len(up) < LIMIT:
                    rlist.append(plain)
                if (not tls_eof and len(down) < LIMIT) or write_wants_read:
                    rlist.append(tls)
                if (up and not write_wants_read) or read_wants_write:
                    wlist.append(tls)
                if down:
                    wlist.append(plain)
                if not rlist and not wlist:
                    break
                readable, writable, _ = select.select(rlist, wlist, [])
                if plain in readable:
                    try:
                        n = plain.recv_into(view)
                    except BlockingIOError:
                        n = -1
                    if n == 0:
                        plain_eof = True
                    elif n > 0:
                        up += view[:n]
                if tls in readable or (read_wants_write and tls in writable):
                    read_wants_write = False
                    if write_wants_read:
                        write_wants_read = False      # retry the write below
                    if not tls_eof and len(down) < LIMIT:
                        try:
                            tls_eof = self._read_tls(view, down)
                        except ssl.SSLWantWriteError:
                            read_wants_write = True
                if up and (tls in writable or tls in readable) and not write_wants_read:
                    length = write_len or min(len(up), CHUNK)
                    try:
                        sent = tls.send(up[:length])
                        del up[:sent]
                        write_len = 0
                    except ssl.SSLWantWriteError:
                        write_len = length
                    except ssl.SSLWantReadError:
                        write_len = length
                        write_wants_read = True
                if down and plain in writable:
                    try:
                        sent = plain.send(down)
                        del down[:sent]
                    except BlockingIOError:
                        pass
            if self.outgoing and not tls_eof:
                self._close_notify()
        finally:
            view.release()

    def _read_tls(self, view: memoryview, down: bytearray) -> bool:
        """Read what TLS has (up to the limit); True at its end."""
        while len(down) < LIMIT:
            try:
                n = self.tls.recv_into(view, min(CHUNK, LIMIT - len(down)))
            except ssl.SSLWantReadError:
                return False
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return True
            if n == 0:
                return True
            down += view[:n]
        return False

    def _close_notify(self) -> None:
        # close_notify says the stream ended on purpose; the peer may close without
        # answering it, which changes nothing for bytes already sent
        try:
            self.tls.settimeout(CLOSE_NOTIFY_TIMEOUT)
            self.tls.unwrap()
        except (ssl.SSLError, OSError, ValueError):
            pass

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

    def finish(self, timeout: float = FLUSH_TIMEOUT) -> None:
        """After the plaintext side closed: let the relay pass on what it still holds
        (the destination's last return-path message, ``SHUT``), then end it."""
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.stop()
        self.join()
