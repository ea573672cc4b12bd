"""The rdma transport (``rdma:HOST:PORT``): guest RAM by one-sided RDMA writes, the rest as
messages.

Source: :class:`RdmaOutgoing` connects, learns the destination's RAM blocks
(RAM_BLOCKS_REQUEST/RESULT), and then offers the byte-channel interface for the ordinary
stream (sent as QEMU_FILE messages) plus :meth:`RdmaOutgoing.place_pages`, which RMA-writes
pages straight into the destination's block.  Without pin-all, the 1 MiB chunks under a write
are first registered on the destination with REGISTER_REQUEST/RESULT.
:meth:`RdmaOutgoing.round_finished` waits for the round's writes to complete and sends
REGISTER_FINISHED.

Destination: :class:`RdmaListener` accepts one connection into an :class:`RdmaIncoming`,
whose service thread answers the control requests itself and queues QEMU_FILE bytes, so the
stream loader reads the stream exactly as from a socket while pages land in guest RAM.  In
the RAM stream the source emits ``RAM_SAVE_FLAG_HOOK`` after :meth:`round_finished`; the
loader skips it, since messages are handled in arrival order: that round's
REGISTER_FINISHED was processed (:attr:`RdmaIncoming.rounds_finished` counts it) before
the stream bytes that follow it become readable.

Every RAM page of every round goes through :meth:`RdmaOutgoing.place_pages` or
:meth:`RdmaOutgoing.place_zero_pages`; none may also travel as a PAGE or ZERO record in the
stream, because the loader applies stream records later than RDMA writes land, and a stale
record would overwrite newer memory.  Pages written by RDMA bypass the destination's dirty
bitmap and page observers.

Protocol details, flow control and wire layouts: :mod:`.rdma_protocol`.
"""

from __future__ import annotations

import collections
import errno as errno_codes
import threading
import time
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from pyvm.fastpath import find_zero_pages, find_zero_pages_at
from pyvm.migration.transports.base import AbortSignal, Chunk, as_views, cancelled_error
from pyvm.migration.transports.fabric import (Endpoint, EndpointSizes, FabricListener,
                                              find_info, host_port, load_binding, rdma_error)
from pyvm.migration.transports.rdma_protocol import (
    HEADER_SIZE, MAX_DEST_BLOCKS, RDMA_CAPABILITY_PIN_ALL, RDMA_CONTROL_MAX_BUFFER,
    RDMA_CONTROL_MAX_COMMANDS_PER_MESSAGE, RDMA_MERGE_MAX, RDMA_RESOLVE_TIMEOUT_MS,
    RDMA_REG_CHUNK_SHIFT, RDMA_REG_CHUNK_SIZE, RdmaCapabilities, ChunkMap, Compress, ControlMessage,
    ControlType, DestBlock, RdmaError, RdmaProtocolError, Register, RegisterResult,
    block_base_for, chunk_of, decode_compress, decode_dest_blocks, decode_message,
    decode_register_requests, decode_register_results, encode_compress, encode_dest_blocks,
    encode_header, encode_message, encode_register_requests, encode_register_results,
    expect, merge_pages, remote_address)

#: A RAM block as the transport sees it: name, buffer over its memory, length in bytes.
BlockSpec = tuple[str, Any, int]
#: ``hint(first_page, count)``: a bool mask of the pages known to be zero, or None.
ZeroHint = Callable[[int, int], Any]

DEFAULT_TIMEOUT = 60.0                   # seconds without progress before a wait fails
CONNECT_TIMEOUT = RDMA_RESOLVE_TIMEOUT_MS / 1000
DEST_RECV_SLOTS = 8                      # receive buffers the destination grants as credits
REPLY_SIZE = 128 * 1024                  # destination -> source messages (results, READY)
SOURCE_SEND_SLOTS = 4
DEST_SEND_SLOTS = 4
WRITE_SLOTS = 32                         # RDMA writes in flight
STREAM_QUEUE_MAX = 16 << 20              # destination: stream bytes queued before credits wait
_ZEROS = bytes(RDMA_REG_CHUNK_SIZE)
PAGE = 4096                     # the pages COMPRESS ranges are made of (TARGET_PAGE_SIZE)


def _check_blocks(blocks: Sequence[BlockSpec]) -> None:
    if len(blocks) > MAX_DEST_BLOCKS:
        raise RdmaError(f"{len(blocks)} RAM blocks are more than the {MAX_DEST_BLOCKS} supported")
    for name, buffer, length in blocks:
        if length <= 0 or memoryview(buffer).nbytes < length:
            raise ValueError(f"RAM block {name}: buffer smaller than {length} bytes")


class RdmaOutgoing:
    """The source end: an :class:`OutgoingChannel` plus RDMA page writes."""

    #: Register guest RAM used as a write source even when the provider does not ask for
    #: it (FI_MR_LOCAL); lets the on-demand local registration path run on any provider.
    register_local_memory = False

    def __init__(self, host: str, port: str | int, blocks: Sequence[BlockSpec],
                 pin_all: bool = False, *, provider: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, abort: AbortSignal | None = None) -> None:
        _check_blocks(blocks)
        binding = load_binding()
        self.peer = host_port(host, port)
        info = find_info(host, port, passive=False, provider=provider, abort=abort)
        # Receive buffers: every grant (READY), one reply and an ERROR can be in flight.
        writes = max(1, min(WRITE_SLOTS, info.tx_size - SOURCE_SEND_SLOTS))
        sizes = EndpointSizes(DEST_RECV_SLOTS + 2, REPLY_SIZE, SOURCE_SEND_SLOTS,
                              RDMA_CONTROL_MAX_BUFFER, writes)
        try:
            conn = binding.Connection.client(info, sizes.max_ops)
        except binding.FabricError as err:
            raise rdma_error(err, f"connecting to destination {self.peer} failed") from err
        self._ep = Endpoint(conn, sizes, self._on_message, timeout=timeout, abort=abort,
                            peer=self.peer)
        self.provider: str = self._ep.provider
        self._blocks = list(blocks)
        self._credits = 0
        self._window = 0                  # receive buffers the destination granted in all
        self._inbox: collections.deque[ControlMessage] = collections.deque()
        self._stream_slot: Optional[tuple[int, memoryview]] = None
        self._stream_fill = 0
        self._closed = False
        self.bytes_written = 0            # stream bytes (QEMU_FILE payloads)
        self.rdma_bytes = 0               # guest RAM bytes written by RDMA
        self.control_bytes = 0            # other control messages (fills, registrations)
        self.pages_written = 0            # pages given to place_pages
        self.zero_pages = 0               # pages given to place_zero_pages
        self.registrations = 0            # chunk runs registered on demand
        self.rounds = 0
        try:
            self._ep.post_receives()
            wanted = RdmaCapabilities(flags=RDMA_CAPABILITY_PIN_ALL if pin_all else 0)
            answer = RdmaCapabilities.decode(self._ep.connect(
                wanted.encode(), CONNECT_TIMEOUT, f"connecting to destination {self.peer} failed"))
            # The destination may refuse pin-all; chunks are then registered on demand.
            self.pin_all = bool(answer.flags & RDMA_CAPABILITY_PIN_ALL)
            self._exchange_blocks()
        except BaseException:
            self._ep.close()
            raise

    # -- set-up ------------------------------------------------------------------------------------
    def _exchange_blocks(self) -> None:
        reply = self._request(encode_message(ControlType.RAM_BLOCKS_REQUEST),
                              ControlType.RAM_BLOCKS_RESULT, "RAM_BLOCKS_REQUEST")
        dest = decode_dest_blocks(reply)
        if len(dest) != len(self._blocks):
            raise RdmaError(f"ram blocks mismatch (Number of blocks {len(self._blocks)} vs "
                            f"{len(dest)}): the pyvm command line parameters are probably not "
                            "identical on both the source and destination")
        local_registered = self.register_local_memory or self._ep.local_registration
        self._local_registered = local_registered
        self._dest = dest
        self._remote: list[ChunkMap[tuple[int, int]]] = []
        self._local: list[ChunkMap[tuple[Any, int]]] = []
        for index, ((name, buffer, length), remote) in enumerate(zip(self._blocks, dest)):
            if remote.length != length:
                raise RdmaError(f"Block {name}/{index} has a different length {length} vs "
                                f"{remote.length}")
            remote_map: ChunkMap[tuple[int, int]] = ChunkMap(length)
            local_map: ChunkMap[tuple[Any, int]] = ChunkMap(length)
            if self.pin_all:
                remote_map.fill_all((remote.key, remote.remote_host_addr))
            if self.pin_all or not local_registered:
                region = self._register_local(buffer, 0, length)
                local_map.fill_all((region, 0))
            self._remote.append(remote_map)
            self._local.append(local_map)

    def _register_local(self, buffer: Any, offset: int, length: int) -> Any:
        binding = load_binding()
        return self._ep.call(self._ep.connection.register, "registering guest RAM", buffer,
                              offset, length, binding.ACCESS_WRITE, self._local_registered)

    # -- messages ----------------------------------------------------------------------------------
    def _on_message(self, data: memoryview) -> None:
        msg = decode_message(data)
        if msg.type == ControlType.READY:
            self._credits += msg.repeat
            self._window = max(self._window, self._credits)
        elif msg.type in (ControlType.RAM_BLOCKS_RESULT, ControlType.REGISTER_RESULT,
                          ControlType.ERROR):
            if msg.type == ControlType.ERROR:
                raise RdmaProtocolError(f"the destination {self.peer} reported an error")
            self._inbox.append(msg)
        else:
            raise RdmaProtocolError(f"unexpected {msg.type.name} from the destination")

    def _take_credit(self, what: str) -> None:
        self._ep.wait(lambda: self._credits > 0, what)
        self._credits -= 1

    def _send(self, message: bytes, what: str) -> None:
        self._take_credit(what)
        self._ep.send_bytes(message, what)
        self.control_bytes += len(message)

    def _request(self, message: bytes, reply: ControlType, what: str) -> ControlMessage:
        self._send(message, what)
        self._ep.wait(lambda: bool(self._inbox), f"{what}: waiting for {reply.name}")
        return expect(self._inbox.popleft(), reply)

    @property
    def bytes_moved(self) -> int:
        """Every byte this end sent: stream payloads, RMA-written RAM, other control messages."""
        return self.bytes_written + self.rdma_bytes + self.control_bytes

    # -- the stream (OutgoingChannel) -------------------------------------------------------------
    def write(self, data: Chunk) -> None:
        self.writev((data,))

    def writev(self, chunks: Sequence[Chunk]) -> None:
        self._check_open()
        for view in as_views(chunks):
            pos, size = 0, view.nbytes
            while pos < size:
                if self._stream_slot is None:
                    self._stream_slot = self._ep.send_slot("sending stream bytes")
                    self._stream_fill = HEADER_SIZE
                buf = self._stream_slot[1]
                take = min(size - pos, len(buf) - self._stream_fill)
                buf[self._stream_fill:self._stream_fill + take] = view[pos:pos + take]
                self._stream_fill += take
                pos += take
                if self._stream_fill == len(buf):
                    self._send_stream()
            self.bytes_written += size

    def flush(self) -> None:
        self._check_open()
        if self._stream_slot is not None:
            self._send_stream()

    def _send_stream(self) -> None:
        assert self._stream_slot is not None
        slot, buf = self._stream_slot
        length = self._stream_fill
        buf[:HEADER_SIZE] = encode_header(ControlType.QEMU_FILE, length - HEADER_SIZE)
        buf.release()
        self._stream_slot = None
        self._take_credit("sending stream bytes")
        self._ep.send(slot, length, "sending stream bytes")

    # -- RAM ---------------------------------------------------------------------------------------
    def place_pages(self, block_index: int, page_offsets: Iterable[int], page_size: int) -> None:
        """RMA-write the pages at ``page_offsets`` (bytes into the block) to the destination.

        Contiguous pages merge into writes of up to RDMA_MERGE_MAX bytes.  The writes may
        still be in flight when this returns; :meth:`round_finished` waits for them.
        """
        runs = self._runs(block_index, page_offsets, page_size, RDMA_MERGE_MAX)
        self._write_runs(block_index, runs)
        self.pages_written += sum(length for _offset, length in runs) // page_size

    def place_zero_pages(self, block_index: int, page_offsets: Iterable[int],
                         page_size: int) -> None:
        """Pages known to be all zero: where their chunk is not registered on the destination
        yet they are filled there (COMPRESS), so untouched memory is never registered;
        elsewhere they are RMA-written like any page."""
        runs = self._runs(block_index, page_offsets, page_size, self._blocks[block_index][2])
        remote_map, base = self._remote[block_index], self._dest[block_index].offset
        fills: list[Compress] = []
        writes: list[tuple[int, int]] = []
        for offset, length in runs:
            self.zero_pages += length // page_size
            end = offset + length
            while offset < end:
                stop = min(end, (chunk_of(offset) + 1) << RDMA_REG_CHUNK_SHIFT)
                if remote_map.get(chunk_of(offset)) is None:
                    fills.append(Compress(0, block_index, base + offset, stop - offset))
                else:
                    writes.append((offset, stop - offset))
                offset = stop
        for at in range(0, len(fills), RDMA_CONTROL_MAX_COMMANDS_PER_MESSAGE):
            self._send(encode_compress(fills[at:at + RDMA_CONTROL_MAX_COMMANDS_PER_MESSAGE]),
                       "COMPRESS")
        self._write_runs(block_index, writes)

    def _runs(self, block_index: int, page_offsets: Iterable[int], page_size: int,
              limit: int) -> list[tuple[int, int]]:
        self._check_open()
        if not 0 <= block_index < len(self._blocks):
            raise RdmaError(f"RAM block index {block_index} out of range")
        return list(merge_pages(page_offsets, page_size, self._blocks[block_index][2], limit))

    def _write_runs(self, block_index: int, runs: list[tuple[int, int]]) -> None:
        if not runs:
            return
        self._register_remote(block_index, runs)
        self._register_local_chunks(block_index, runs)
        remote_map, local_map = self._remote[block_index], self._local[block_index]
        for offset, length in runs:
            for piece, piece_len, (key, host_addr) in remote_map.segments(offset, length):
                for sub, sub_len, (region, start) in local_map.segments(piece, piece_len):
                    self._ep.write(region, sub - start, sub_len, remote_address(host_addr, sub),
                                   key, "writing guest RAM")
            self.rdma_bytes += length

    def _register_remote(self, index: int, runs: list[tuple[int, int]]) -> None:
        remote_map = self._remote[index]
        missing = remote_map.missing_runs(runs)
        base = self._dest[index].offset
        for at in range(0, len(missing), RDMA_CONTROL_MAX_COMMANDS_PER_MESSAGE):
            batch = missing[at:at + RDMA_CONTROL_MAX_COMMANDS_PER_MESSAGE]
            requests = [Register(base + remote_map.chunk_span(first, count)[0], index, count - 1)
                        for first, count in batch]
            reply = self._request(encode_register_requests(requests), ControlType.REGISTER_RESULT,
                                  "REGISTER_REQUEST")
            results = decode_register_results(reply)
            if len(results) != len(batch):
                raise RdmaProtocolError(f"{len(results)} registration results for "
                                        f"{len(batch)} requests")
            for (first, count), result in zip(batch, results):
                remote_map.set_range(first, count, (result.key, result.host_addr))
            self.registrations += len(batch)

    def _register_local_chunks(self, index: int, runs: list[tuple[int, int]]) -> None:
        local_map = self._local[index]
        buffer = self._blocks[index][1]
        for first, count in local_map.missing_runs(runs):
            start, length = local_map.chunk_span(first, count)
            local_map.set_range(first, count, (self._register_local(buffer, start, length), start))

    def round_finished(self) -> None:
        """End a round: flush stream bytes, wait for every write, send REGISTER_FINISHED."""
        self.flush()
        self._ep.drain_writes("completing RDMA writes")
        self._send(encode_message(ControlType.REGISTER_FINISHED), "REGISTER_FINISHED")
        self.rounds += 1

    # -- teardown ----------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RdmaError("write to a closed rdma channel", errno=errno_codes.EBADF)

    def shutdown(self) -> None:
        """Abort a blocked or future operation (any thread)."""
        self._ep.shutdown()

    def close(self) -> None:
        """Deliver what is buffered, disconnect and release everything."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self._ep.cancelled and self._ep.error is None:
                if self._stream_slot is not None:
                    self._send_stream()
                self._ep.drain_writes("completing RDMA writes")
                self._ep.wait(self._ep.sends_idle, "completing sends")
                # Every grant back means the destination processed every message and will
                # send nothing more: disconnecting now cannot lose data in either direction
                # (over TCP, closing with unread input resets the connection).
                self._ep.wait(lambda: self._credits == self._window,
                              "waiting for the destination to take the last messages")
                self._ep.disconnect()
        finally:
            self._ep.close()


class RdmaListener:
    """Listens on ``host:port`` for the source's rdma connection (the first one is taken)."""

    def __init__(self, host: str, port: str | int, *, provider: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self._fabric = FabricListener(host, port, provider=provider)
        self.provider = self._fabric.provider
        self.timeout = timeout

    def listen_address(self) -> tuple[str, int]:
        return self._fabric.address

    def accept(self, blocks: Sequence[BlockSpec], *, timeout: float | None = None,
               abort: AbortSignal | None = None,
               zero_hints: Sequence[ZeroHint | None] | None = None) -> "RdmaIncoming":
        """Wait for the source and return the connected :class:`RdmaIncoming`.

        ``zero_hints[i]``, when given, answers for block ``i`` which pages are known to be
        zero without reading them: ``hint(first_page, count)`` returns a bool mask, or None
        when it cannot tell (see :meth:`pyvm.ram.RamBlock.unpopulated`).
        """
        _check_blocks(blocks)
        deadline = None if timeout is None else time.monotonic() + timeout
        request = self._fabric.wait_request(deadline, abort)
        try:
            wanted = RdmaCapabilities.decode(request.private_data)
            answer = wanted.answer(RDMA_CAPABILITY_PIN_ALL)
        except RdmaError:
            self._fabric.reject(request)
            raise
        sizes = EndpointSizes(DEST_RECV_SLOTS, RDMA_CONTROL_MAX_BUFFER, DEST_SEND_SLOTS, REPLY_SIZE)
        conn = self._fabric.connection(request, sizes.max_ops)
        return RdmaIncoming(conn, sizes, blocks, answer, timeout=self.timeout, abort=abort,
                            zero_hints=zero_hints)

    def close(self) -> None:
        """Stop listening (any thread; a pending accept raises TransportCancelled).

        A connection already accepted stays up: it holds its own reference to the fabric.
        """
        self._fabric.close()


class RdmaIncoming:
    """The destination end: an :class:`IncomingChannel` whose RAM blocks take RDMA writes."""

    def __init__(self, conn: Any, sizes: EndpointSizes, blocks: Sequence[BlockSpec],
                 caps: RdmaCapabilities, *, timeout: float, abort: AbortSignal | None,
                 zero_hints: Sequence[ZeroHint | None] | None = None) -> None:
        binding = load_binding()
        self._zero_hints = list(zero_hints or [None] * len(blocks))
        self._ep = Endpoint(conn, sizes, self._on_message, timeout=timeout, abort=abort,
                            peer="source")
        self.provider: str = self._ep.provider
        self.pin_all = bool(caps.flags & RDMA_CAPABILITY_PIN_ALL)
        self._blocks = list(blocks)
        self._virtual = bool(conn.mr_mode & binding.MR_VIRT_ADDR)
        self._prefault = bool(conn.mr_mode & binding.MR_ALLOCATED)
        self._maps: list[ChunkMap[tuple[int, int]]] = [ChunkMap(b[2]) for b in blocks]
        self._views = [memoryview(b[1]).cast("B") for b in blocks]
        self._offsets = [sum(b[2] for b in blocks[:i]) for i in range(len(blocks))]
        self._cond = threading.Condition()
        self._queue: collections.deque[bytes] = collections.deque()
        self._head = 0                         # bytes of _queue[0] already read
        self._queued = 0
        self._eof = False
        self._error: Optional[BaseException] = None
        self._stop = False
        self._work: collections.deque[ControlMessage] = collections.deque()
        self._credits_owed = 0
        self.rounds_finished = 0
        self.bytes_read = 0
        self.registrations = 0
        try:
            if self.pin_all:
                for index in range(len(blocks)):
                    self._register(index, 0, len(self._maps[index]))
            self._ep.post_receives()
            self._ep.accept(caps.encode(), CONNECT_TIMEOUT, "accepting the source's connection")
            self._ep.send_bytes(encode_message(ControlType.READY, repeat=sizes.recv_slots),
                                "granting receive buffers")
        except BaseException:
            self._ep.close()
            raise
        self._thread = threading.Thread(target=self._serve, name="rdma-incoming", daemon=True)
        self._thread.start()

    # -- service thread ----------------------------------------------------------------------------
    def _serve(self) -> None:
        try:
            while not self._stop:
                handled = self._ep.progress(0.005 if self._credits_owed else 0.1)
                while self._work:
                    self._handle(self._work.popleft())
                if self._credits_owed and self._queued <= STREAM_QUEUE_MAX:
                    owed, self._credits_owed = self._credits_owed, 0
                    self._ep.send_bytes(encode_message(ControlType.READY, repeat=owed),
                                        "granting receive buffers")
                if not handled and self._ep.check_peer():
                    while self._ep.progress(0.05):     # messages that raced the disconnect
                        pass
                    break
            if self._credits_owed and not self._ep.peer_closed:
                # Closed by the reader: hand back the last grants so that a source that is
                # closing sees every message taken.
                self._ep.send_bytes(encode_message(ControlType.READY, repeat=self._credits_owed),
                                    "granting receive buffers")
        except BaseException as err:  # noqa: B902 - handed to the reading thread
            self._set_error(err)
            if isinstance(err, RdmaProtocolError):
                self._try_send_error()
        finally:
            with self._cond:
                self._eof = True
                self._cond.notify_all()
            if not self._ep.peer_closed:
                try:
                    self._ep.disconnect()
                except RdmaError:
                    pass
            self._ep.close()
            for view in self._views:
                view.release()

    def _on_message(self, data: memoryview) -> None:
        # Handled after the completion batch, in arrival order: a COMPRESS fill must happen
        # before a later REGISTER_RESULT lets the source write there, and a round's
        # REGISTER_FINISHED before the stream bytes that follow it become readable.
        self._work.append(decode_message(data))
        self._credits_owed += 1

    def _handle(self, msg: ControlMessage) -> None:
        if msg.type == ControlType.QEMU_FILE:
            if msg.payload:
                with self._cond:
                    self._queue.append(msg.payload)
                    self._queued += len(msg.payload)
                    self._cond.notify_all()
        elif msg.type == ControlType.REGISTER_FINISHED:
            with self._cond:
                self.rounds_finished += 1
                self._cond.notify_all()
        elif msg.type == ControlType.RAM_BLOCKS_REQUEST:
            blocks = []
            for index, (_name, _buffer, length) in enumerate(self._blocks):
                # Key and base only when pinned; otherwise REGISTER_RESULT brings them.
                key, base = self._maps[index].get(0) or (0, 0)
                blocks.append(DestBlock(base, self._offsets[index], length, key))
            self._reply(encode_message(ControlType.RAM_BLOCKS_RESULT, encode_dest_blocks(blocks)),
                        ControlType.RAM_BLOCKS_RESULT)
        elif msg.type == ControlType.REGISTER_REQUEST:
            results = [self._register_request(req) for req in decode_register_requests(msg)]
            self._reply(encode_register_results(results), ControlType.REGISTER_RESULT)
        elif msg.type == ControlType.COMPRESS:
            for fill in decode_compress(msg):
                self._fill(fill)
        elif msg.type == ControlType.ERROR:
            raise RdmaError("the source reported an error")
        else:
            raise RdmaProtocolError(f"unexpected {msg.type.name} from the source")

    def _block_range(self, what: str, index: int, list_offset: int, length: int) -> int:
        """The offset inside block ``index`` of a list-wide range, checked to lie inside."""
        if not 0 <= index < len(self._blocks):
            raise RdmaProtocolError(f"{what} for unknown block {index}")
        offset = list_offset - self._offsets[index]
        size = self._blocks[index][2]
        if not (0 <= offset < size and 0 < length <= size - offset):
            raise RdmaProtocolError(f"{what} outside block {index}")
        return offset

    def _fill(self, fill: Compress) -> None:
        offset = self._block_range("COMPRESS", fill.block_idx, fill.offset, fill.length)
        if fill.value > 0xFF:
            raise RdmaProtocolError(f"COMPRESS fill value {fill.value} is not a byte")
        view = self._views[fill.block_idx]
        end = offset + fill.length
        if fill.value == 0 and offset % PAGE == 0 and end % PAGE == 0:
            # Zero only the pages that are not zero already, so that untouched memory
            # stays unallocated (QEMU's ram_handle_zero).  Pages never populated are zero
            # without reading them (asked now: RDMA writes populate pages behind pyvm's back).
            count = (end - offset) // PAGE
            hint = self._zero_hints[fill.block_idx]
            known = hint(offset // PAGE, count) if hint is not None else None
            pages = np.frombuffer(view, dtype=np.uint8)
            if known is None:
                zero = np.zeros(count, dtype=np.uint8)
                find_zero_pages(pages, offset // PAGE, count, zero)
                todo = np.flatnonzero(zero == 0)
            else:
                unknown = np.flatnonzero(~known)
                zero = np.zeros(unknown.size, dtype=np.uint8)
                find_zero_pages_at(pages, unknown + offset // PAGE, zero)
                todo = unknown[zero == 0]
            for index in todo.tolist():
                at = offset + index * PAGE
                view[at:at + PAGE] = _ZEROS[:PAGE]
            return
        pattern = _ZEROS if fill.value == 0 else bytes((fill.value,)) * len(_ZEROS)
        while offset < end:
            step = min(end - offset, len(pattern))
            view[offset:offset + step] = pattern[:step]
            offset += step

    def _register_request(self, req: Register) -> RegisterResult:
        offset = self._block_range("REGISTER_REQUEST", req.current_index, req.current_addr, 1)
        chunk_map = self._maps[req.current_index]
        first, count = chunk_of(offset), req.chunks + 1
        if first + count > len(chunk_map):
            raise RdmaProtocolError(f"REGISTER_REQUEST outside block {req.current_index}")
        if self.pin_all:
            entry = chunk_map.get(first)
            assert entry is not None
            return RegisterResult(*entry)
        if any(chunk_map.get(c) is not None for c in range(first, first + count)):
            raise RdmaProtocolError(f"REGISTER_REQUEST for a registered chunk of block "
                                    f"{req.current_index}")
        return RegisterResult(*self._register(req.current_index, first, count))

    def _register(self, index: int, first: int, count: int) -> tuple[int, int]:
        binding = load_binding()
        chunk_map = self._maps[index]
        start, length = chunk_map.chunk_span(first, count)
        region = self._ep.call(self._ep.connection.register, "registering guest RAM",
                                self._blocks[index][1], start, length,
                                binding.ACCESS_REMOTE_WRITE, True, self._prefault)
        entry = (region.key, block_base_for(region.address if self._virtual else 0, start))
        chunk_map.set_range(first, count, entry)
        self.registrations += 1
        return entry

    def _reply(self, message: bytes, ctype: ControlType) -> None:
        self._ep.send_bytes(message, f"sending {ctype.name}")

    def _try_send_error(self) -> None:
        try:
            self._ep.send_bytes(encode_message(ControlType.ERROR), "sending ERROR")
        except BaseException:  # noqa: B902 - best effort on a failing connection
            pass

    def _set_error(self, err: BaseException) -> None:
        with self._cond:
            if self._error is None:
                self._error = err
            self._cond.notify_all()

    # -- the stream (IncomingChannel) --------------------------------------------------------------
    def _wait_data(self) -> bool:
        """Block until stream bytes are queued (True) or the input ended (False)."""
        with self._cond:
            while not self._queue:
                if self._ep.cancelled:
                    raise cancelled_error("RDMA ERROR: reading the migration stream")
                if self._error is not None:
                    raise self._error
                if self._eof:
                    return False
                self._cond.wait(0.1)
            return True

    def read(self, n: int) -> bytes:
        if n <= 0 or not self._wait_data():
            return b""
        with self._cond:
            head = self._queue[0]
            data = head[self._head:self._head + n]
            self._consume(len(data))
        return data

    def readinto(self, buf: memoryview | bytearray) -> int:
        view = buf if isinstance(buf, memoryview) else memoryview(buf)
        view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        if not view.nbytes or not self._wait_data():
            return 0
        with self._cond:
            head = self._queue[0]
            take = min(view.nbytes, len(head) - self._head)
            view[:take] = head[self._head:self._head + take]
            self._consume(take)
        return take

    def _consume(self, n: int) -> None:
        self._head += n
        self._queued -= n
        self.bytes_read += n
        if self._head == len(self._queue[0]):
            self._queue.popleft()
            self._head = 0

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._queue

    def shutdown(self) -> None:
        """Abort a blocked or future read (any thread)."""
        self._ep.shutdown()
        self._stop = True
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        """Disconnect and release the registrations (the blocks' buffers are released too)."""
        self._stop = True
        self._ep.shutdown()
        self._thread.join()
