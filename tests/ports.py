"""A TCP port on the loopback that nothing listens on (for a peer a test starts later)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port the kernel just gave out and took back: free until someone binds it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
