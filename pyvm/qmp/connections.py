"""Monitor connections: one QMP or human-monitor client each, on the service's loop.

Requests of one connection are answered strictly in order.  Quick queries registered
``inline`` run on the loop; every other command runs on the service's single command
thread (:class:`CommandThread`), so commands never run concurrently and the loop stays
free to read, parse and send events meanwhile.  An event emitted by a command goes out
before that command's reply (both travel through the loop's FIFO callback queue).

Bounds: a connection with ``QUEUE_HIGH`` requests waiting is not read until it is down
to ``QUEUE_LOW``; a client that leaves ``MAX_OUTPUT_BUFFER`` bytes unread is dropped; a
human-monitor line is at most ``MAX_HMP_LINE`` bytes.  At end of input a socket client
still gets the replies to what it sent, then the connection closes; stdio keeps its
output open for events.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
from collections import deque
from typing import Any, Callable, Protocol

import pyvm
from pyvm.qmp.context import CommandContext, MonitorState
from pyvm.qmp.dispatch import NO_ID as _NO_ID, Call, Reply, error_msg, run_call
from pyvm.qmp.errors import CommandError
from pyvm.qmp.hmp import PROMPT, HmpSession, crlf
from pyvm.qmp.hmp_table import HmpTable
from pyvm.qmp.json_stream import JsonLimits
from pyvm.qmp.options import MonitorSpec
from pyvm.qmp.registry import CommandTable
from pyvm.qmp.session import QmpSession

log = logging.getLogger("pyvm.qmp")

QUEUE_HIGH = 64
QUEUE_LOW = 16
MAX_OUTPUT_BUFFER = 16 << 20
MAX_HMP_LINE = 64 << 10
BANNER = f"pyvm {pyvm.__version__} monitor - type 'help' for more information\n"


class CommandThread:
    """Runs blocking command work in order on one thread; :meth:`stop` ends and joins it."""

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

    def stop(self, timeout: float | None = None) -> None:
        """Finish the work already queued, then end the thread and join it (any thread
        but this one)."""
        self._queue.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

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


class ConnectionHost(Protocol):
    """What a connection needs of its monitor service (:class:`pyvm.qmp.server.MonitorService`)."""

    connections: set["Connection"]
    held: bool
    limits: JsonLimits
    table: CommandTable
    hmp_table: HmpTable

    @property
    def worker(self) -> CommandThread: ...

    def context(self, state: MonitorState) -> CommandContext: ...

    def spawn(self, coro: Any) -> None: ...


class Connection(asyncio.Protocol):
    """Write path, output bound, flush waiting and command sequencing of a client."""

    def __init__(self, service: ConnectionHost, spec: MonitorSpec) -> None:
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
        self.service.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.service.connections.discard(self)

    def eof_received(self) -> bool:
        """End of input: answer what was already received; then a socket is closed."""
        self.input_done = True
        self.finish_if_idle()
        return True

    def finish_if_idle(self) -> None:
        if (self.input_done and self.close_on_eof and not self.busy and not self.has_pending()
                and not self.closed):
            self.service.spawn(self._close_after_flush())

    async def _close_after_flush(self) -> None:
        await self.flushed(2.0)
        if self.transport is not None and not self.closed:
            self.transport.close()

    def has_pending(self) -> bool:
        raise NotImplementedError

    def pump(self) -> None:
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
        self.service.spawn(run())

    def flow_control(self, pending: int) -> None:
        if self.transport is None or self.closed:
            return
        if not self.paused and pending >= QUEUE_HIGH:
            self.paused = True
            self.transport.pause_reading()
        elif self.paused and pending <= QUEUE_LOW:
            self.paused = False
            self.transport.resume_reading()


class QmpConnection(Connection):
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
        while self.pending and not self.busy and not self.closed and not self.service.held:
            step = self.session.prepare(self.pending.popleft())
            if isinstance(step, Reply):
                self.send_reply(step.msg)
                continue
            assert isinstance(step, Call)
            ctx = self.service.context(self.session.state)
            if step.command.inline:
                self.send_reply(run_call(step, ctx))
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
        self.send_reply(fut.result())
        self.after_reply(ctx)
        self.pump()

    def send_reply(self, msg: dict[str, Any]) -> None:
        try:
            data = self.session.encode(msg)
        except (TypeError, ValueError) as err:   # a handler returned something not JSON
            log.error("cannot encode a reply: %s", err)
            fallback = error_msg(CommandError(f"internal error: the reply cannot be encoded: "
                                              f"{err}"), msg.get("id", _NO_ID))
            data = self.session.encode(fallback)
        self.write(data)

    def send_event(self, encoded: dict[bool, bytes]) -> None:
        if not self.closed and self.session.receives_events:
            self.write(encoded[self.spec.pretty])


class HmpConnection(Connection):
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
        while self.lines and not self.busy and not self.closed and not self.service.held:
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
