"""``MSG_ZEROCOPY`` sends for multifd page channels (capability ``zero-copy-send``).

Linux Documentation/networking/msg_zerocopy.rst: with ``SO_ZEROCOPY`` set on a socket, a
``sendmsg(MSG_ZEROCOPY)`` pins the user pages instead of copying them; the kernel reports on
the socket's error queue (``MSG_ERRQUEUE``, an ``IP_RECVERR``/``IPV6_RECVERR`` message with a
``struct sock_extended_err`` of origin ``SO_EE_ORIGIN_ZEROCOPY``) when a range of sends
(numbered from 0 per socket) no longer uses the pages, and sets ``SO_EE_CODE_ZEROCOPY_COPIED``
when it copied after all.  On loopback (and on devices without scatter-gather) the kernel
always copies: the sends work and every completion says so.

QEMU (io/channel-socket.c ``qio_channel_socket_writev`` / ``qio_channel_socket_flush``)
sends the packet header normally and the guest pages with ``MSG_ZEROCOPY``; at every dirty
bitmap sync it waits for every completion, and counts ``dirty-sync-missed-zero-copy`` when
all of a channel's sends since the last sync were copied.  :class:`ZeroCopySocketOutgoing`
does the same.  Only guest RAM goes out this way: it stays mapped for the VM's life.
"""

from __future__ import annotations

import errno as errno_codes
import select
import socket
import struct

from pyvm.migration.transports.base import Chunk, TransportError, cancelled_error
from pyvm.migration.transports.socket_transport import SocketOutgoing

# <linux/socket.h>, <linux/errqueue.h>, <linux/in.h>/<linux/in6.h>
SO_ZEROCOPY = getattr(socket, "SO_ZEROCOPY", 60)
MSG_ZEROCOPY = getattr(socket, "MSG_ZEROCOPY", 0x4000000)
SO_EE_ORIGIN_ZEROCOPY = 5
SO_EE_CODE_ZEROCOPY_COPIED = 1
IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)
_EXTENDED_ERR = struct.Struct("=IBBBBII")      # struct sock_extended_err

#: QEMU's text when the socket cannot do zero copy (io/channel.c)
NOT_AVAILABLE = "Requested Zero Copy feature is not available"

#: outstanding zero-copy sends after which completions are collected on the way
REAP_AFTER = 256


class ZeroCopySocketOutgoing(SocketOutgoing):
    """A connected tcp socket whose page writes use ``MSG_ZEROCOPY``."""

    def __init__(self, sock: socket.socket, *, description: str) -> None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_ZEROCOPY, 1)
        except OSError as err:
            sock.close()
            raise TransportError(NOT_AVAILABLE, errno=errno_codes.EINVAL) from err
        super().__init__(sock, description=description)
        self._zero_copy = False
        self._queued = 0          # zero-copy sends made
        self._completed = 0       # ... whose completion was read
        self._any_zero_copied = False

    @classmethod
    def adopt(cls, channel: SocketOutgoing) -> "ZeroCopySocketOutgoing":
        """The same connection, with zero copy (``channel`` is given up)."""
        return cls(channel.detach(), description=channel.description)

    def write_zero_copy(self, views: list[Chunk]) -> None:
        """Write ``views`` (guest RAM) without copying them."""
        self._zero_copy = True
        try:
            self.writev(views)
        finally:
            self._zero_copy = False

    def _send(self, views: list[memoryview]) -> int:
        if not self._zero_copy:
            return super()._send(views)
        if self._queued - self._completed >= REAP_AFTER:
            self._reap()
        try:
            sent = self._sock.sendmsg(views, (), socket.MSG_NOSIGNAL | MSG_ZEROCOPY)
        except OSError as err:
            if err.errno == errno_codes.ENOBUFS:
                # the socket's option memory is full of completions: read them, try again
                self._reap()
                raise BlockingIOError(errno_codes.EAGAIN, "completions pending") from err
            raise
        self._queued += 1
        return sent

    def _reap(self) -> None:
        """Read every completion waiting on the error queue (never blocks)."""
        sock = self._sock
        while True:
            try:
                _, ancillary, _, _ = sock.recvmsg(0, socket.CMSG_SPACE(_EXTENDED_ERR.size + 16),
                                                  socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                raise TransportError(f"Unable to read errqueue: {err.strerror}",
                                     errno=err.errno) from err
            for level, kind, data in ancillary:
                if (level, kind) not in ((socket.IPPROTO_IP, IP_RECVERR),
                                         (socket.IPPROTO_IPV6, IPV6_RECVERR)):
                    continue
                ee_errno, origin, _type, code, _pad, info, last = _EXTENDED_ERR.unpack_from(data)
                if origin != SO_EE_ORIGIN_ZEROCOPY:
                    raise TransportError("Error not from zero copy")
                if ee_errno != 0:
                    raise TransportError(f"Error on zero copy: {errno_codes.errorcode.get(ee_errno, ee_errno)}")
                self._completed += (last - info + 1) & 0xFFFFFFFF
                if code != SO_EE_CODE_ZEROCOPY_COPIED:
                    self._any_zero_copied = True

    def flush_zero_copy(self) -> bool:
        """Wait until the kernel is done with every page sent so far; True when all sends
        since the last flush were copied (QEMU then counts a missed zero copy)."""
        had_sends = self._completed < self._queued
        while self._completed < self._queued:
            if self._abort.triggered:
                raise cancelled_error("Unable to flush zero copy")
            self._reap()
            if self._completed < self._queued:
                poller = select.poll()
                poller.register(self._sock.fileno(), select.POLLERR)
                poller.poll(100)
        copied = had_sends and not self._any_zero_copied
        self._any_zero_copied = False
        return copied


__all__ = ["NOT_AVAILABLE", "ZeroCopySocketOutgoing"]
