"""Host socket helpers shared by the monitors, the character devices and migration.

One policy for a unix socket a pyvm process listens on (QEMU's ``util/qemu-sockets.c``
unlinks whatever is at the path; pyvm is more careful):

- a leftover *socket* file at the path is stale and is replaced;
- any other kind of file is never replaced: binding fails with ``EEXIST``;
- the socket file gets mode 0600 before anyone can connect, and appears at its path only
  once it listens (bound under a temporary name and renamed, when that name fits).

:func:`parse_port` is the one reader of a TCP port number written in decimal.
"""

from __future__ import annotations

import errno
import os
import socket
import stat

#: sizeof(struct sockaddr_un.sun_path) on Linux (include/uapi/linux/un.h).  QEMU accepts a
#: path of up to this many bytes (util/qemu-sockets.c ``unix_listen_saddr``); the kernel
#: does not need the terminating NUL.
UNIX_PATH_MAX = 108


class PortError(ValueError):
    """A port that is not a decimal number (``value`` None) or not in 0..65535."""

    def __init__(self, text: str, value: int | None) -> None:
        self.text = text
        self.value = value
        super().__init__(f"error parsing port '{text}'" if value is None
                         else f"port {value} out of range")


def parse_port(text: str) -> int:
    """The port number ``text`` names (decimal, 0..65535); raises :class:`PortError`."""
    try:
        port = int(text, 10)
    except ValueError:
        raise PortError(text, None) from None
    if not 0 <= port <= 65535:
        raise PortError(text, port)
    return port


def remove_stale_socket(path: str) -> None:
    """Unlink a socket file left at ``path``; raise ``FileExistsError`` for anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path)
    os.unlink(path)


def bind_unix_listener(path: str, backlog: int = 16) -> socket.socket:
    """A blocking unix stream socket listening at ``path`` (mode 0600); raises OSError.

    The socket is bound and listening under a temporary name first and then renamed, so
    a client that sees the path can connect at once (when the temporary name fits).
    """
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), path)
    remove_stale_socket(path)
    temp = f"{path}.{os.getpid()}~"
    if len(os.fsencode(temp)) > UNIX_PATH_MAX:
        temp = path
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # On Linux bind() gives the socket file the mode of the socket inode.
        os.fchmod(sock.fileno(), 0o600)
        sock.bind(temp)
        try:
            os.chmod(temp, 0o600)
            sock.listen(backlog)
            if temp != path:
                os.rename(temp, path)
        except BaseException:
            os.unlink(temp)
            raise
    except BaseException:
        sock.close()
        raise
    return sock


__all__ = ["PortError", "UNIX_PATH_MAX", "bind_unix_listener", "parse_port",
           "remove_stale_socket"]
