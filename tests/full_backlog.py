"""A unix listener whose accept backlog is full: the next connect would block (EAGAIN)."""

from __future__ import annotations

import errno
import socket


def full_unix_listener(path: str) -> tuple[socket.socket, list[socket.socket]]:
    """The listener (backlog 0, never accepting) and the client sockets that filled it;
    the caller closes them all."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(0)
    queued = []
    code = 0
    for _ in range(8):
        sock = socket.socket(socket.AF_UNIX)
        sock.setblocking(False)
        code = sock.connect_ex(path)
        queued.append(sock)
        if code == errno.EAGAIN:
            break
    assert code == errno.EAGAIN, "the backlog never filled"      # the situation under test
    return listener, queued
