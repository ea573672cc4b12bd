"""libfabric for the rdma transport: loading the binding, choosing a provider, message endpoints.

The Cython binding (``_fabric``) is optional: it is built only where libfabric's headers
are installed, and it needs ``libfabric.so.1`` at run time.  :func:`load_binding` imports it
on first use and turns any failure into one line naming what to install, so nothing else
in pyvm depends on libfabric.

Provider choice: ``verbs`` (InfiniBand/RoCE NICs) when fi_getinfo finds it, else ``tcp``
(RMA in software over TCP sockets); ``PYVM_RDMA_PROVIDER`` or the ``provider`` argument
forces one.  Both give connected message endpoints (FI_EP_MSG) with FI_MSG and FI_RMA and
the ordering the protocol needs (send after send, send after write); ``tcp;ofi_rxm`` is an
FI_EP_RDM layering and is not used.

:class:`Endpoint` is the message layer both sides of the transport share: one registered
arena of bounce buffers (receive slots and send slots), a pool of RDMA write operations,
completion polling that hands each received message to a callback and re-posts its buffer,
and waits bounded by a timeout, the peer's disconnect and a cancel from another thread.
"""

from __future__ import annotations

import errno as errno_codes
import importlib
import mmap
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Optional

from pyvm.migration.transports.base import AbortSignal, TransportCancelled, cancelled_error
from pyvm.migration.transports.rdma_protocol import RdmaError

PROVIDER_ENV = "PYVM_RDMA_PROVIDER"
DEFAULT_PROVIDERS = ("verbs", "tcp")
BINDING = "pyvm.migration.transports._fabric"
MISSING_LIBRARY = ("libfabric is not available (install Debian package libfabric1 / "
                   "libfabric-dev and rebuild pyvm)")
POLL_SLICE = 0.1            # seconds a wait blocks in libfabric before it looks around
# Completion errors that mean the connection is gone (peer closed, reset or killed).
_CONNECTION_GONE = frozenset({errno_codes.ECANCELED, errno_codes.ENOTCONN, errno_codes.ECONNRESET,
                              errno_codes.EPIPE, errno_codes.ECONNABORTED, errno_codes.ESHUTDOWN})


class FabricUnavailableError(RdmaError):
    """libfabric cannot be loaded, or no provider offers RMA over FI_EP_MSG."""


_binding: Optional[ModuleType] = None
_binding_lock = threading.Lock()


def load_binding() -> ModuleType:
    """The ``_fabric`` extension, imported on first use."""
    global _binding
    with _binding_lock:
        if _binding is None:
            try:
                _binding = importlib.import_module(BINDING)
            except ImportError as err:      # not built, or libfabric.so.1 missing
                raise FabricUnavailableError(MISSING_LIBRARY) from err
        return _binding


def available() -> bool:
    """True when the binding loads (a provider may still be missing)."""
    try:
        load_binding()
    except FabricUnavailableError:
        return False
    return True


def providers_to_try(provider: str | None = None) -> tuple[str, ...]:
    forced = provider or os.environ.get(PROVIDER_ENV, "").strip()
    return (forced,) if forced else DEFAULT_PROVIDERS


def rdma_error(err: BaseException, what: str) -> RdmaError:
    """A binding failure as an :class:`RdmaError` (``what: libfabric's text``)."""
    code = getattr(err, "errno", None)
    return RdmaError(f"{what}: {err}", errno=code if isinstance(code, int) else None)


def host_port(host: str, port: str | int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def find_info(host: str, port: str | int, *, passive: bool, provider: str | None = None,
              abort: AbortSignal | None = None) -> Any:
    """The first fi_info of the preferred provider for ``host:port``.

    ``passive`` looks up a local address to listen on, else a destination to connect to.
    With ``abort`` the lookup runs on a helper thread (:func:`_abortable`) while this one
    watches the signal: ``fi_getinfo`` cannot be interrupted, and it can block for
    seconds -- the first call in a process loads and probes every provider (1.4 s on a
    host without RDMA devices), and a host name goes through ``getaddrinfo(3)``, which
    waits for a silent resolver for its full timeout (resolv.conf(5): 10 s by default).
    """
    if abort is None:
        return _find_info(host, port, passive, provider)
    return _abortable(lambda: _find_info(host, port, passive, provider), abort,
                      f"RDMA ERROR: looking up {host_port(host, port)}")


def _find_info(host: str, port: str | int, passive: bool, provider: str | None) -> Any:
    binding = load_binding()
    tried = providers_to_try(provider)
    present = []
    for name in tried:
        try:
            infos = binding.getinfo(host or None, str(port), passive, name)
            if infos:
                return infos[0]
            if binding.getinfo(None, None, False, name):
                present.append(name)
        except binding.FabricError:
            present.append(name)
    if present:
        raise RdmaError(f"could not resolve address {host_port(host, port)} "
                        f"(providers: {', '.join(present)})", errno=errno_codes.EADDRNOTAVAIL)
    raise FabricUnavailableError("no libfabric provider supports RMA over FI_EP_MSG here "
                                 f"(tried: {', '.join(tried)})")


ABORT_SLICE = 0.05          # seconds between looks at the abort signal during a lookup


def _abortable(fn: Callable[[], Any], abort: AbortSignal, what: str) -> Any:
    """``fn()`` on a helper thread; its result or exception, or TransportCancelled as soon
    as ``abort`` triggers.  A cancelled lookup's thread finishes on its own (it holds
    nothing but the lookup; the fi_info it returns is freed with it) and is adopted by
    ``abort``, whose owner joins it (:meth:`AbortSignal.join_adopted`)."""
    outcome: list[tuple[bool, Any]] = []
    done = threading.Event()

    def work() -> None:
        try:
            outcome.append((True, fn()))
        except BaseException as err:  # noqa: B902 - handed to the waiting thread
            outcome.append((False, err))
        finally:
            done.set()

    worker = threading.Thread(target=work, name="rdma-lookup", daemon=True)
    worker.start()
    while not done.wait(ABORT_SLICE):
        if abort.triggered:
            abort.adopt(worker)
            raise cancelled_error(what)
    worker.join()
    ok, value = outcome[0]
    if ok:
        return value
    raise value


def sockaddr_host_port(raw: bytes) -> tuple[str, int]:
    """``(host, port)`` of a raw ``struct sockaddr_in``/``sockaddr_in6``."""
    family = struct.unpack_from("=H", raw)[0]
    port = struct.unpack_from(">H", raw, 2)[0]
    if family == socket.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    return socket.inet_ntop(socket.AF_INET, raw[4:8]), port


class FabricListener:
    """A passive endpoint on ``host:port`` (port 0 picks a free one).

    :meth:`close` may come from any thread; while another thread waits for a request the
    passive endpoint is closed by that thread when its wait ends, never under it.
    """

    def __init__(self, host: str, port: str | int, *, provider: str | None = None) -> None:
        binding = load_binding()
        self.info = find_info(host, port, passive=True, provider=provider)
        self.provider: str = self.info.provider
        self._lock = threading.Lock()
        self._waiting = False
        self._closing = False
        try:
            self._listener = binding.Listener(self.info)
            self.address = sockaddr_host_port(self._listener.getname())
        except binding.FabricError as err:
            raise rdma_error(err, f"listening on {host_port(host, port)} failed") from err

    def wait_request(self, deadline: float | None, abort: AbortSignal | None) -> Any:
        """The next connection request; TransportCancelled/RdmaError on abort or timeout."""
        binding = load_binding()
        with self._lock:
            if self._waiting:
                raise RdmaError("another thread is already accepting a connection")
            self._waiting = True
        try:
            while True:
                if self._closing or (abort is not None and abort.triggered):
                    raise cancelled_error("RDMA ERROR: accepting a connection")
                if deadline is not None and time.monotonic() >= deadline:
                    raise RdmaError("timed out waiting for a connection",
                                    errno=errno_codes.ETIMEDOUT)
                try:
                    request = self._listener.wait_request(int(POLL_SLICE * 1000))
                except binding.FabricError as err:
                    raise rdma_error(err, "waiting for a connection failed") from err
                if request is not None:
                    return request
        finally:
            with self._lock:
                self._waiting = False
                if self._closing:
                    self._listener.close()

    def reject(self, request: Any) -> None:
        with self._lock:
            if not self._closing:
                self._listener.reject(request)

    def connection(self, request: Any, max_ops: int) -> Any:
        binding = load_binding()
        try:
            return binding.Connection.server(self._listener, request, max_ops)
        except binding.FabricError as err:
            raise rdma_error(err, "setting up the accepted connection failed") from err

    def close(self) -> None:
        with self._lock:
            self._closing = True
            if not self._waiting:
                self._listener.close()


@dataclass(frozen=True)
class EndpointSizes:
    """Bounce buffers and operation pools of one side of a connection."""

    recv_slots: int
    recv_size: int
    send_slots: int
    send_size: int
    write_slots: int = 0

    @property
    def max_ops(self) -> int:
        return self.recv_slots + self.send_slots + self.write_slots


class Endpoint:
    """Messages and RDMA writes over one connection (used by one thread at a time).

    ``on_message`` receives each incoming message as a memoryview of its receive buffer,
    valid only during the call; the buffer is re-posted afterwards.  ``shutdown()`` may be
    called from any thread: the owner's next wait raises :class:`TransportCancelled`.
    """

    def __init__(self, conn: Any, sizes: EndpointSizes, on_message: Callable[[memoryview], None],
                 *, timeout: float, abort: AbortSignal | None = None, peer: str = "") -> None:
        self._binding = load_binding()
        self._conn = conn
        self.sizes = sizes
        self.provider: str = conn.info.provider
        self.peer = peer
        self.timeout = timeout
        self._abort = abort
        self._on_message = on_message
        self._cancelled = False
        self.peer_closed = False
        self._error: Optional[RdmaError] = None
        self._recv_bytes = sizes.recv_slots * sizes.recv_size
        total = self._recv_bytes + sizes.send_slots * sizes.send_size
        self._arena = mmap.mmap(-1, total)
        self._view = memoryview(self._arena)
        self._free_send = list(range(sizes.send_slots))
        self._write_base = sizes.recv_slots + sizes.send_slots
        self._free_writes = list(range(self._write_base, sizes.max_ops))
        self.writes_in_flight = 0
        #: Register local buffers (sources of sends and writes): the provider's FI_MR_LOCAL.
        self.local_registration = bool(conn.mr_mode & self._binding.MR_LOCAL)
        self._region = self.call(conn.register, "registering bounce buffers", self._arena,
                                  0, total, self._binding.ACCESS_SEND | self._binding.ACCESS_RECV,
                                  self.local_registration)

    # -- set-up ------------------------------------------------------------------------------------
    @property
    def connection(self) -> Any:
        return self._conn

    def post_receives(self) -> None:
        for slot in range(self.sizes.recv_slots):
            self._repost(slot)

    def connect(self, private_data: bytes, timeout: float, what: str) -> bytes:
        """Connect (client side) and return the peer's private data."""
        self.call(self._conn.connect, what, private_data)
        return self._wait_connected(timeout, what)

    def accept(self, private_data: bytes, timeout: float, what: str) -> bytes:
        self.call(self._conn.accept, what, private_data)
        return self._wait_connected(timeout, what)

    def _wait_connected(self, timeout: float, what: str) -> bytes:
        deadline = time.monotonic() + timeout
        while not self.call(self._conn.wait_connected, what, int(POLL_SLICE * 1000)):
            self._check_cancel(what)
            if time.monotonic() >= deadline:
                raise self._fail(RdmaError(f"{what}: timed out after {timeout:g} s",
                                           errno=errno_codes.ETIMEDOUT))
        return bytes(self._conn.peer_data)

    # -- sending -----------------------------------------------------------------------------------
    def send_slot(self, what: str) -> tuple[int, memoryview]:
        """A free send buffer ``(slot, view)``; fill it and pass it to :meth:`send`."""
        self.wait(lambda: bool(self._free_send), what)
        slot = self._free_send.pop()
        start = self._recv_bytes + slot * self.sizes.send_size
        return slot, self._view[start:start + self.sizes.send_size]

    def send(self, slot: int, length: int, what: str) -> None:
        offset = self._recv_bytes + slot * self.sizes.send_size
        op = self.sizes.recv_slots + slot
        self._post(self._conn.send, what, self._region, offset, length, op)

    def send_bytes(self, data: bytes, what: str) -> None:
        slot, view = self.send_slot(what)
        view[:len(data)] = data
        view.release()
        self.send(slot, len(data), what)

    def sends_idle(self) -> bool:
        return len(self._free_send) == self.sizes.send_slots

    # -- RDMA writes -------------------------------------------------------------------------------
    def write(self, region: Any, offset: int, length: int, remote_addr: int, key: int,
              what: str) -> None:
        """RMA-write ``region[offset:offset+length]`` to the peer's ``remote_addr``."""
        self.wait(lambda: bool(self._free_writes), what)
        op = self._free_writes.pop()
        try:
            self._post(self._conn.write, what, region, offset, length, remote_addr, key, op)
        except BaseException:
            self._free_writes.append(op)
            raise
        self.writes_in_flight += 1

    def drain_writes(self, what: str) -> None:
        self.wait(lambda: self.writes_in_flight == 0, what)

    # -- progress and waiting ----------------------------------------------------------------------
    def progress(self, timeout: float) -> int:
        """Handle the completions that arrive within ``timeout`` seconds; how many there were."""
        if self._error is not None:
            raise self._error
        try:
            done = self._conn.poll(int(timeout * 1000))
        except self._binding.FabricError as err:
            if err.errno not in _CONNECTION_GONE:
                raise self._fail(rdma_error(err, "a transfer failed")) from err
            # The connection went away: the provider fails or flushes what was posted.
            self.peer_closed = True
            self._release_failed(err.op)
            return 1
        for op, _flags, length in done:
            if op < self.sizes.recv_slots:
                start = op * self.sizes.recv_size
                with self._view[start:start + length] as message:
                    try:
                        self._on_message(message)
                    except RdmaError as err:
                        self._fail(err)
                        raise
                self._repost(op)
            elif op < self._write_base:
                self._free_send.append(op - self.sizes.recv_slots)
            else:
                self._free_writes.append(op)
                self.writes_in_flight -= 1
        return len(done)

    def _release_failed(self, op: int) -> None:
        if self.sizes.recv_slots <= op < self._write_base:
            self._free_send.append(op - self.sizes.recv_slots)
        elif self._write_base <= op < self.sizes.max_ops:
            self._free_writes.append(op)
            self.writes_in_flight -= 1

    def check_peer(self) -> bool:
        """Look for a disconnect event; True once the peer has shut the connection down."""
        if not self.peer_closed:
            event = self.call(self._conn.poll_event, "connection event")
            if event == self._binding.EVENT_SHUTDOWN:
                self.peer_closed = True
        return self.peer_closed

    def wait(self, ready: Callable[[], bool], what: str, timeout: float | None = None) -> None:
        """Make progress until ``ready()``; errors on timeout, disconnect or cancel."""
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while not ready():
            self._check_cancel(what)
            if self.peer_closed:
                raise self._fail(RdmaError(f"{what}: the connection was closed by the peer "
                                           f"{self.peer}".rstrip(), errno=errno_codes.ECONNRESET))
            if time.monotonic() >= deadline:
                raise self._fail(RdmaError(f"{what}: no progress for {limit:g} s",
                                           errno=errno_codes.ETIMEDOUT))
            if self.progress(POLL_SLICE) == 0:
                self.check_peer()

    def _check_cancel(self, what: str) -> None:
        if self._cancelled or (self._abort is not None and self._abort.triggered):
            raise self._fail(cancelled_error(f"RDMA ERROR: {what}"))

    # -- shutdown ----------------------------------------------------------------------------------
    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def error(self) -> Optional[RdmaError]:
        """The first failure of this endpoint; every later operation raises it again."""
        return self._error

    def shutdown(self) -> None:
        """Abort the owner's current and future waits (any thread)."""
        self._cancelled = True

    def disconnect(self) -> None:
        """Tell the peer the connection is over (owner thread)."""
        if not self._conn.closed:
            self._conn.shutdown()

    def close(self) -> None:
        """Release the connection and the bounce buffers (owner thread)."""
        self._conn.close()
        self._view.release()
        self._arena.close()

    # -- helpers -----------------------------------------------------------------------------------
    def _repost(self, slot: int) -> None:
        self._post(self._conn.post_recv, "posting a receive", self._region,
                   slot * self.sizes.recv_size, self.sizes.recv_size, slot)

    def _post(self, call: Callable[..., bool], what: str, *args: Any) -> None:
        """Post an operation, making progress while the provider's queue is full."""
        deadline = time.monotonic() + self.timeout
        while not self.call(call, what, *args):
            self._check_cancel(what)
            if time.monotonic() >= deadline:
                raise self._fail(RdmaError(f"{what}: the send queue stayed full",
                                           errno=errno_codes.ETIMEDOUT))
            self.progress(0.001)

    def call(self, call: Callable[..., Any], what: str, *args: Any) -> Any:
        if self._error is not None:
            raise self._error
        try:
            return call(*args)
        except self._binding.FabricError as err:
            raise self._fail(rdma_error(err, what)) from err

    def _fail(self, error: RdmaError | TransportCancelled) -> Any:
        if self._error is None and isinstance(error, RdmaError):
            self._error = error
        return error
