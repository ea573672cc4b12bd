"""The one-thread TLS relay that carries both directions (postcopy's return path over TLS)."""

from __future__ import annotations

import socket
import threading

import pytest

from pyvm.migration.transports.socket_transport import SocketIncoming, SocketOutgoing
from pyvm.migration.transports.tls_relay import tls_client, tls_server
from pyvm.tls import TlsCredsX509


def test_both_directions_and_the_last_answer_after_close(pki) -> None:
    """The source streams 8 MiB while the destination answers on the same connection;
    the destination's last message, written just before it closes, still arrives."""
    lst = socket.create_server(("127.0.0.1", 0))
    port = lst.getsockname()[1]
    server: dict[str, object] = {}

    def serve() -> None:
        conn, _ = lst.accept()
        inc = tls_server(SocketIncoming(conn, description="test"),
                         TlsCredsX509("s", str(pki["server"]), "server"), None, None, duplex=True)
        back = socket.socket(fileno=__import__("os").dup(inc.fileno()))
        got = 0
        buf = bytearray(1 << 16)
        while got < 8 << 20:
            n = inc.readinto(buf)
            assert n > 0
            got += n
            back.sendall(b"R" * 10)          # a return-path message now and then
        back.sendall(b"SHUT")
        back.close()
        inc.close()
        server["got"] = got

    t = threading.Thread(target=serve)
    t.start()
    out = tls_client(SocketOutgoing(socket.create_connection(("127.0.0.1", port)),
                                    description="test"),
                     TlsCredsX509("c", str(pki["client"]), "client"), "localhost", None,
                     duplex=True)
    rp = socket.socket(fileno=__import__("os").dup(out.fileno()))
    received = bytearray()

    def read_back() -> None:
        while data := rp.recv(65536):
            received.extend(data)

    reader = threading.Thread(target=read_back)
    reader.start()
    block = bytes(range(256)) * 4096
    for _ in range(8):
        out.writev([block])
    out.flush()
    t.join(30)
    reader.join(30)
    assert not reader.is_alive() and server["got"] == 8 << 20
    assert received.endswith(b"SHUT") and set(received[:-4]) == {ord("R")}
    rp.close()
    out.close()
    lst.close()
