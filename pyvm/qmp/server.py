"""The monitor service: an asyncio event loop on its own thread serving every monitor.

- One listening endpoint per :class:`~pyvm.qmp.options.MonitorSpec` (unix, tcp, stdio);
  a socket accepts any number of clients, each with its own session and negotiation,
  and a client may disconnect and reconnect at will.
- Requests of one connection are answered strictly in order.  Quick queries registered
  ``inline`` run on the loop; every other command runs on one command thread shared by
  all monitors, so commands never run concurrently and the loop stays free to read,
  parse and send events while a command (or the guest) works.
- VM events are fanned out to every negotiated QMP connection; an event emitted by a
  command is sent before that command's reply.
- Bounds: a connection with more than ``QUEUE_HIGH`` requests waiting stops being read
  until it is down to ``QUEUE_LOW``; a client that does not read its output is dropped
  once ``MAX_OUTPUT_BUFFER`` bytes are queued for it; a human-monitor line is at most
  ``MAX_HMP_LINE`` bytes; JSON size limits are in :mod:`pyvm.qmp.json_stream`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import queue
import sys
import threading
from collections import deque
from typing import Any, Callable

import pyvm
from pyvm.errors import ConfigError
from pyvm.events import Event
from pyvm.qmp.context import CommandContext, MonitorState
from pyvm.qmp.dispatch import Call, Reply, run_call
from pyvm.qmp.events import event_message
from pyvm.qmp.hmp import PROMPT, HmpSession, HmpTable, crlf, default_hmp_table
from pyvm.qmp.json_stream import JsonLimits
from pyvm.qmp.json_writer import encode_line
from pyvm.qmp.options import MonitorSpec, StdioEndpoint, TcpEndpoint, UnixEndpoint
from pyvm.qmp.registry import CommandTable, default_table
from pyvm.qmp.session import QmpSession
from pyvm.qmp.transports import StdioTransport, bind_unix_socket
from pyvm.qmp.vm_api import VmApi

log = logging.getLogger("pyvm.qmp")

QUEUE_HIGH = 64
QUEUE_LOW = 16
MAX_OUTPUT_BUFFER = 16 << 20
MAX_HMP_LINE = 64 << 10
BANNER = f"pyvm {pyvm.__version__} monitor - type 'help' for more information\n"


class _CommandThread:
    """Runs blocking command work in order on one daemon thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="pyvm-monitor-cmd",
                                        daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._queue.put((fut, fn, args))
        return fut

    def stop(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fut, fn, args = item
            try:
                result, error = fn(*args), None
            except BaseException as err:  # noqa: BLE001 - delivered to the waiting future
                result, error = None, err
            try:
                self._loop.call_soon_threadsafe(_settle, fut, result, error)
            except RuntimeError:      # loop closed during shutdown
                return


def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.cancelled():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


class _Connection(asyncio.Protocol):
    """Write path, output bound, flush waiting and command sequencing of a client."""

    def __init__(self, service: "MonitorService", spec: MonitorSpec) -> None:
        self.service = service
        self.spec = spec
        self.transport: Any = None
        self.closed = False
        self.busy = False
        self.paused = False
        self.input_done = False
        self.close_on_eof = True      # sockets: yes; stdio keeps its output open

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.service._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.service._connections.discard(self)

    def eof_received(self) -> bool:
        """End of input: answer what was already received; then a socket is closed."""
        self.input_done = True
        self.finish_if_idle()
        return True

    def finish_if_idle(self) -> None:
        if (self.input_done and self.close_on_eof and not self.busy and not self.has_pending()
                and not self.closed):
            self.service._spawn(self._close_after_flush())

    async def _close_after_flush(self) -> None:
        await self.flushed(2.0)
        if self.transport is not None and not self.closed:
            self.transport.close()

    def has_pending(self) -> bool:
        raise NotImplementedError

    def write(self, data: bytes) -> None:
        tr = self.transport
        if self.closed or tr is None or tr.is_closing():
            return
        tr.write(data)
        if tr.get_write_buffer_size() > MAX_OUTPUT_BUFFER:
            log.warning("monitor client on %s does not read its output; dropping it",
                        self.spec.option)
            tr.abort()

    async def flushed(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (not self.closed and self.transport is not None
               and self.transport.get_write_buffer_size() > 0 and loop.time() < deadline):
            await asyncio.sleep(0.002)

    def after_reply(self, ctx: CommandContext) -> None:
        if not ctx.after_reply:
            return
        actions = list(ctx.after_reply)
        ctx.after_reply.clear()

        async def run() -> None:
            await self.flushed(2.0)
            for action in actions:
                self.service.worker.submit(action)
        self.service._spawn(run())

    def flow_control(self, pending: int) -> None:
        if self.transport is None or self.closed:
            return
        if not self.paused and pending >= QUEUE_HIGH:
            self.paused = True
            self.transport.pause_reading()
        elif self.paused and pending <= QUEUE_LOW:
            self.paused = False
            self.transport.resume_reading()


class _QmpConnection(_Connection):
    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.session = QmpSession(self.service.table, self.service.limits, self.spec.pretty)
        self.pending: deque[Any] = deque()
        self.write(self.session.greeting())

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.pending.extend(self.session.feed(data))
        self.pump()

    def pump(self) -> None:
        while self.pending and not self.busy and not self.closed:
            step = self.session.prepare(self.pending.popleft())
            if isinstance(step, Reply):
                self.write(self.session.encode(step.msg))
                continue
            assert isinstance(step, Call)
            ctx = self.service.context(self.session.state)
            if step.command.inline:
                self.write(self.session.encode(run_call(step, ctx)))
                self.after_reply(ctx)
                continue
            self.busy = True
            fut = self.service.worker.submit(run_call, step, ctx)
            fut.add_done_callback(functools.partial(self._done, ctx=ctx))
        self.flow_control(len(self.pending))
        self.finish_if_idle()

    def has_pending(self) -> bool:
        return bool(self.pending)

    def _done(self, fut: asyncio.Future[Any], *, ctx: CommandContext) -> None:
        self.busy = False
        if fut.cancelled() or self.closed:
            return
        self.write(self.session.encode(fut.result()))
        self.after_reply(ctx)
        self.pump()

    def send_event(self, encoded: dict[bool, bytes]) -> None:
        if not self.closed and self.session.receives_events:
            self.write(encoded[self.spec.pretty])


class _HmpConnection(_Connection):
    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        ctx = self.service.context(MonitorState(negotiated=True))
        self.session = HmpSession(self.service.hmp_table, ctx)
        self.buffer = bytearray()
        self.lines: deque[str] = deque()
        self.write(crlf(BANNER + PROMPT))

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.buffer += data
        while True:
            end = self.buffer.find(b"\n")
            if end < 0:
                break
            raw = bytes(self.buffer[:end]).rstrip(b"\r")
            del self.buffer[:end + 1]
            self.lines.append(raw.decode("utf-8", "replace") if len(raw) <= MAX_HMP_LINE
                              else "\x00too-long")
        if len(self.buffer) > MAX_HMP_LINE:
            self.buffer.clear()
            self.lines.append("\x00too-long")
        self.pump()

    def pump(self) -> None:
        while self.lines and not self.busy and not self.closed:
            line = self.lines.popleft()
            if line == "\x00too-long":
                self.write(crlf(f"command line too long (limit {MAX_HMP_LINE} bytes)\n"
                                + PROMPT))
                continue
            self.busy = True
            fut = self.service.worker.submit(self.session.execute, line)
            fut.add_done_callback(self._done)
        self.flow_control(len(self.lines))
        self.finish_if_idle()

    def has_pending(self) -> bool:
        return bool(self.lines)

    def _done(self, fut: asyncio.Future[Any]) -> None:
        self.busy = False
        if fut.cancelled() or self.closed:
            return
        err = fut.exception()
        text = fut.result() if err is None else f"internal error: {err}\n"
        self.write(crlf(text + PROMPT))
        self.after_reply(self.session.cmd_ctx)
        self.pump()


class MonitorService:
    """Every monitor of one VM; :meth:`start` opens them, :meth:`close` ends them."""

    def __init__(self, vm: VmApi, specs: list[MonitorSpec], table: CommandTable | None = None,
                 hmp_table: HmpTable | None = None, limits: JsonLimits | None = None) -> None:
        self.vm = vm
        self.specs = list(specs)
        self.table = table if table is not None else default_table()
        self.hmp_table = hmp_table if hmp_table is not None else default_hmp_table()
        self.limits = limits or JsonLimits()
        self.addresses: dict[str, Any] = {}       # spec label -> bound address
        self._connections: set[_Connection] = set()
        self._servers: list[asyncio.AbstractServer] = []
        self._unix_paths: list[str] = []
        self._stdio: list[StdioTransport] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._closed = False
        self._worker: _CommandThread | None = None

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pyvm-monitor", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            self._thread.join()
            raise self._start_error

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        self._worker = _CommandThread(loop)
        try:
            loop.run_until_complete(self._open())
        except BaseException as err:  # noqa: BLE001 - reported to start()'s caller
            self._start_error = err
            self._cleanup_files()
            self._worker.stop()
            self._worker = None
            loop.close()
            self._ready.set()
            return
        self._unsubscribe = self.vm.events.subscribe(self._on_vm_event)
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        for spec in self.specs:
            factory = self._factory(spec)
            ep = spec.endpoint
            try:
                if isinstance(ep, UnixEndpoint):
                    sock = bind_unix_socket(ep.path)
                    self._unix_paths.append(ep.path)
                    server = await loop.create_unix_server(factory, sock=sock)
                    self.addresses[spec.label] = ep.path
                elif isinstance(ep, TcpEndpoint):
                    server = await loop.create_server(factory, ep.host, ep.port,
                                                      reuse_address=True)
                    self.addresses[spec.label] = server.sockets[0].getsockname()[:2]
                else:
                    assert isinstance(ep, StdioEndpoint)
                    conn = factory()
                    conn.close_on_eof = False   # stdin at EOF: events still go to stdout
                    tr = StdioTransport(loop, conn)
                    self._stdio.append(tr)
                    tr.start()
                    self.addresses[spec.label] = "stdio"
                    continue
            except OSError as err:
                where = f" to {ep.path}" if isinstance(ep, UnixEndpoint) else ""
                reason = os.strerror(err.errno) if err.errno else str(err)
                raise ConfigError(f"{spec.option}: Failed to bind socket{where}: "
                                  f"{reason}") from err
            self._servers.append(server)

    def _factory(self, spec: MonitorSpec) -> Callable[[], _Connection]:
        cls = _QmpConnection if spec.mode == "control" else _HmpConnection
        return lambda: cls(self, spec)

    def close(self, timeout: float = 2.0) -> None:
        """Flush pending output (best effort, ``timeout`` s), close everything, join."""
        if self._closed or self._loop is None or self._thread is None:
            return
        self._closed = True
        if self._unsubscribe is not None:
            self._unsubscribe()
        loop = self._loop
        try:
            fut = asyncio.run_coroutine_threadsafe(self._shutdown(timeout), loop)
            fut.result(timeout + 2.0)
        except Exception as err:  # noqa: BLE001 - closing must not fail the exit path
            log.debug("monitor shutdown: %r", err)
        try:
            loop.call_soon_threadsafe(loop.stop)
        except RuntimeError:
            pass
        self._thread.join(timeout + 2.0)
        if self._worker is not None:
            self._worker.stop()
        self._cleanup_files()

    async def _shutdown(self, timeout: float) -> None:
        for server in self._servers:
            server.close()
        conns = list(self._connections)
        if conns:
            await asyncio.wait([asyncio.ensure_future(c.flushed(timeout)) for c in conns],
                               timeout=timeout)
        for conn in conns:
            if conn.transport is not None:
                conn.transport.close()
        for tr in self._stdio:
            tr.close()
        for task in list(self._tasks):
            task.cancel()

    def _cleanup_files(self) -> None:
        for path in self._unix_paths:
            try:
                os.unlink(path)
            except OSError:
                pass
        self._unix_paths.clear()

    # -- helpers for connections --------------------------------------------------------------
    @property
    def worker(self) -> _CommandThread:
        assert self._worker is not None, "the service is not running"
        return self._worker

    def context(self, state: MonitorState) -> CommandContext:
        return CommandContext(self.vm, self.table, state, self)

    def monitor_chardevs(self) -> list[dict[str, Any]]:
        return [{"label": s.label, "filename": s.filename, "frontend-open": True}
                for s in self.specs]

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- events ---------------------------------------------------------------------------------
    def _on_vm_event(self, event: Event) -> None:
        loop = self._loop
        if loop is None or self._closed:
            return
        try:
            loop.call_soon_threadsafe(self._broadcast, event)
        except RuntimeError:
            pass

    def _broadcast(self, event: Event) -> None:
        try:
            msg = event_message(event, self.table)
            encoded = {False: encode_line(msg, False), True: encode_line(msg, True)}
        except (TypeError, ValueError) as err:
            print(f"pyvm: cannot send event {event.name}: {err}", file=sys.stderr)
            return
        for conn in list(self._connections):
            if isinstance(conn, _QmpConnection):
                conn.send_event(encoded)
