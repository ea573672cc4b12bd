"""Migration transports over real sockets, pipes, commands and files.

Every test moves bytes through the kernel: TCP (IPv4 and IPv6 loopback) and unix sockets,
``/bin/sh -c`` pipelines with ``cat``, and temporary files; failure paths use real refused
connections, real dead peers, ``/dev/full`` and missing directories.
"""

from __future__ import annotations

import errno
import mmap
import os
import signal
import socket
import stat
import threading
import time
import tracemalloc
import zlib
from pathlib import Path
from typing import Callable

import pytest

from pyvm.errors import PyvmError
from tests.full_backlog import full_unix_listener
from tests.waiting import wait_blocked, wait_until
from pyvm.migration.transports import (AbortSignal, IncomingChannel, Listener, OutgoingChannel,
                                       RecordChannel, TransportCancelled, TransportError, TransportTimeout,
                                       connect_inet, connect_unix, exec_incoming, exec_outgoing,
                                       file_incoming, file_outgoing, from_fd, incoming_from_fd,
                                       shell_argv)

MiB = 1 << 20


# -- helpers -------------------------------------------------------------------------------------
def payload(size: int, seed: int = 1) -> bytes:
    """Deterministic, non-repeating test bytes."""
    block = bytes((i * 131 + seed * 7 + (i >> 8)) & 0xFF for i in range(4096))
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += block[:64] + counter.to_bytes(8, "little") + block[72:]
        counter += 1
    return bytes(out[:size])


def read_all(channel: IncomingChannel, chunk: int = MiB) -> bytes:
    out = bytearray()
    while True:
        data = channel.read(chunk)
        if not data:
            return bytes(out)
        out += data


class Thread(threading.Thread):
    """A thread that keeps its target's result or exception for the test to check."""

    def __init__(self, target: Callable[[], object]) -> None:
        super().__init__(daemon=True)
        self._target_fn = target
        self.result: object = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self._target_fn()
        except BaseException as err:         # handed to the test
            self.error = err

    def outcome(self, timeout: float = 20) -> object:
        self.join(timeout)
        assert not self.is_alive(), "thread still blocked"
        if self.error is not None:
            raise self.error
        return self.result


def transfer_through(listener: Listener, connect: Callable[[], OutgoingChannel],
                     data: bytes) -> bytes:
    """Accept in a thread, connect, write ``data`` in pieces; what arrived."""
    def serve() -> bytes:
        incoming = listener.accept(timeout=10)
        try:
            return read_all(incoming)
        finally:
            incoming.close()

    server = Thread(serve)
    server.start()
    out = connect()
    out.write(data[:100])
    view = memoryview(data)
    out.writev([view[100:5000], b"", bytearray(view[5000:9000]), view[9000:]])
    out.flush()
    assert out.bytes_written == len(data)
    out.close()
    got = server.outcome()
    assert isinstance(got, bytes)
    return got


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


_BOUND_NOT_LISTENING: list[socket.socket] = []


def closed_port() -> int:
    """A TCP port on 127.0.0.1 with a bound but not listening socket behind it: refuses."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    _BOUND_NOT_LISTENING.append(sock)        # kept bound so that nobody else takes the port
    return int(sock.getsockname()[1])


# -- sockets: data path ----------------------------------------------------------------------------
def test_tcp_ipv4_transfer_and_reported_address() -> None:
    data = payload(3 * MiB + 123)
    with Listener.inet("127.0.0.1", 0) as listener:
        address = listener.listen_address()
        assert address.port != 0
        assert address.to_qapi() == {"type": "inet", "host": "127.0.0.1",
                                     "port": str(address.port), "ipv4": True}
        assert str(address) == f"tcp:127.0.0.1:{address.port}"
        got = transfer_through(listener, lambda: connect_inet("127.0.0.1", address.port), data)
    assert got == data


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
def test_tcp_ipv6_transfer() -> None:
    data = payload(MiB + 7, seed=2)
    with Listener.inet("::1", "0") as listener:
        address = listener.listen_address()
        assert address.ipv6 and address.host == "::1" and address.port != 0
        assert address.to_qapi()["ipv6"] is True
        assert str(address) == f"tcp:[::1]:{address.port}"
        got = transfer_through(listener, lambda: connect_inet("::1", str(address.port)), data)
    assert got == data


def test_tcp_wildcard_listener_reports_real_port() -> None:
    with Listener.inet("0.0.0.0", 0) as listener:
        address = listener.listen_address()
        assert address.host == "0.0.0.0" and address.port > 0
        got = transfer_through(listener, lambda: connect_inet("127.0.0.1", address.port), b"hi")
    assert got == b"hi"


def test_unix_transfer_mode_0600_and_unlink(tmp_path: Path) -> None:
    path = tmp_path / "mig.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))                                    # a socket file nobody serves
    stale.close()
    listener = Listener.unix(str(path))                      # replaces the stale socket
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert listener.listen_address().to_qapi() == {"type": "unix", "path": str(path)}
    data = payload(2 * MiB, seed=3)
    assert transfer_through(listener, lambda: connect_unix(str(path)), data) == data
    assert not path.exists()                                 # unlinked once accepted
    listener.close()


def test_unix_listener_refuses_to_replace_a_file(tmp_path: Path) -> None:
    path = tmp_path / "mig.sock"
    path.write_text("not a socket")
    with pytest.raises(TransportError, match=f"^Failed to bind socket to {path}: File exists$"):
        Listener.unix(str(path))
    assert path.read_text() == "not a socket"


def test_unix_listener_close_without_connection_unlinks(tmp_path: Path) -> None:
    path = tmp_path / "idle.sock"
    listener = Listener.unix(str(path))
    assert path.exists()
    listener.close()
    listener.close()                                         # idempotent
    assert not path.exists()


def test_only_the_first_connection_is_accepted() -> None:
    listener = Listener.inet("127.0.0.1", 0)
    port = listener.listen_address().port
    first = connect_inet("127.0.0.1", port)
    incoming = listener.accept(timeout=5)
    with pytest.raises(TransportError, match=f"Failed to connect to '127.0.0.1:{port}': "
                                             "Connection refused"):
        connect_inet("127.0.0.1", port)
    with pytest.raises(TransportCancelled):
        listener.accept(timeout=1)
    first.close()
    incoming.close()


def test_read_returns_empty_at_eof_and_readinto_zero() -> None:
    a, b = socket.socketpair()
    out = from_fd(a.detach())
    inc = incoming_from_fd(b.detach())
    out.write(b"abc")
    out.close()
    buf = bytearray(10)
    assert inc.readinto(buf) == 3 and buf[:3] == b"abc"
    assert inc.readinto(buf) == 0
    assert inc.read(5) == b""
    inc.close()


def test_from_fd_socket_and_pipe() -> None:
    a, b = socket.socketpair()
    out = from_fd(a.detach(), require_socket=True)
    assert isinstance(out, OutgoingChannel) and isinstance(out, RecordChannel)
    out.write(b"over a socket")
    out.close()
    assert b.recv(100) == b"over a socket"
    b.close()

    r, w = os.pipe()
    with pytest.raises(TransportError, match=f"File descriptor '{w}' is not a socket"):
        from_fd(w, require_socket=True)
    out = from_fd(w)
    inc = incoming_from_fd(r)
    out.write(b"over a pipe")
    out.close()
    assert read_all(inc) == b"over a pipe"
    inc.close()


def test_listener_from_an_inherited_socket() -> None:
    inherited = socket.socket()
    inherited.bind(("127.0.0.1", 0))
    port = inherited.getsockname()[1]
    listener = Listener.from_fd(inherited.detach())
    assert listener.listen_address().port == port
    got = transfer_through(listener, lambda: connect_inet("127.0.0.1", port), b"via fd")
    assert got == b"via fd"

    r, w = os.pipe()
    with pytest.raises(TransportError, match=f"^File descriptor '{r}' is not a socket$"):
        Listener.from_fd(r)
    os.close(r)
    os.close(w)


def test_unix_abstract_namespace() -> None:
    name = f"pyvm-test-{os.getpid()}-{time.monotonic_ns()}"
    listener = Listener.unix(name, abstract=True)
    assert listener.listen_address().to_qapi() == {"type": "unix", "path": name,
                                                   "abstract": True}
    got = transfer_through(listener, lambda: connect_unix(name, abstract=True), b"abstract")
    assert got == b"abstract"


# -- sockets: failures ---------------------------------------------------------------------------
def test_connection_refused_text() -> None:
    port = closed_port()
    with pytest.raises(TransportError) as info:
        connect_inet("127.0.0.1", port)
    assert str(info.value) == f"Failed to connect to '127.0.0.1:{port}': Connection refused"
    assert info.value.errno == errno.ECONNREFUSED
    assert isinstance(info.value, PyvmError)


def test_unix_connect_missing_path_text(tmp_path: Path) -> None:
    path = tmp_path / "nobody.sock"
    with pytest.raises(TransportError) as info:
        connect_unix(str(path))
    assert str(info.value) == f"Failed to connect to '{path}': No such file or directory"


def test_unix_path_too_long() -> None:
    path = "/tmp/" + "x" * 120
    with pytest.raises(TransportError, match="UNIX socket path '/tmp/x+' is too long"):
        Listener.unix(path)
    with pytest.raises(TransportError, match="is too long"):
        connect_unix(path)


def test_address_resolution_failure_text() -> None:
    with pytest.raises(TransportError, match="^address resolution failed for not-a-number:4446: "):
        connect_inet("not-a-number", 4446, numeric=True)
    with pytest.raises(TransportError, match="^Cannot disable IPv4 and IPv6 at same time$"):
        connect_inet("127.0.0.1", 1, ipv4=False, ipv6=False)


def test_listen_on_busy_port_text() -> None:
    with Listener.inet("127.0.0.1", 0) as busy:
        port = busy.listen_address().port
        with pytest.raises(TransportError,
                           match="^Failed to find an available port: Address already in use$"):
            Listener.inet("127.0.0.1", port)


def test_peer_closing_mid_transfer_fails_the_write() -> None:
    listener = Listener.inet("127.0.0.1", 0)
    out = connect_inet("127.0.0.1", listener.listen_address().port)
    incoming = listener.accept(timeout=5)

    def read_a_little_then_close() -> int:
        got = len(incoming.read(64 * 1024))
        incoming.close()
        return got

    peer = Thread(read_a_little_then_close)
    peer.start()
    source = mmap.mmap(-1, 64 * MiB)
    view = memoryview(source)
    with pytest.raises(TransportError) as info:
        out.writev([view[i:i + 4096] for i in range(0, len(view), 4096)])
    assert str(info.value) in ("Unable to write to socket: Connection reset by peer",
                               "Unable to write to socket: Broken pipe")
    assert info.value.errno in (errno.ECONNRESET, errno.EPIPE)
    assert not isinstance(info.value, TransportCancelled)
    assert 0 < out.bytes_written < 64 * MiB
    with pytest.raises(TransportError) as again:             # the error is sticky
        out.write(b"more")
    assert str(again.value) == str(info.value) == str(out.error)
    assert isinstance(peer.outcome(), int)
    out.close()
    view.release()
    source.close()


def test_shutdown_from_another_thread_unblocks_a_write() -> None:
    listener = Listener.inet("127.0.0.1", 0)
    out = connect_inet("127.0.0.1", listener.listen_address().port)
    incoming = listener.accept(timeout=5)                    # never read: the writer blocks
    writer = Thread(lambda: out.write(bytes(64 * MiB)))
    writer.start()
    wait_blocked(writer)                                     # the socket buffer is full
    started = time.monotonic()
    out.shutdown()
    with pytest.raises(TransportCancelled, match="^Unable to write to socket: Operation canceled$"):
        writer.outcome(timeout=5)
    assert time.monotonic() - started < 5
    out.close()
    out.shutdown()                                           # harmless after close
    incoming.close()


def test_shutdown_from_another_thread_unblocks_a_read() -> None:
    listener = Listener.inet("127.0.0.1", 0)
    out = connect_inet("127.0.0.1", listener.listen_address().port)
    incoming = listener.accept(timeout=5)
    reader = Thread(lambda: incoming.read(100))
    reader.start()
    wait_blocked(reader)
    incoming.shutdown()
    with pytest.raises(TransportCancelled,
                       match="^Unable to read from socket: Operation canceled$"):
        reader.outcome(timeout=5)
    incoming.close()
    out.close()


def test_close_from_another_thread_unblocks_an_accept(tmp_path: Path) -> None:
    path = tmp_path / "wait.sock"
    listener = Listener.unix(str(path))
    acceptor = Thread(listener.accept)
    acceptor.start()
    wait_blocked(acceptor)
    listener.close()
    with pytest.raises(TransportCancelled):
        acceptor.outcome(timeout=5)
    assert not path.exists()


def test_accept_timeout() -> None:
    with Listener.inet("127.0.0.1", 0) as listener:
        with pytest.raises(TransportTimeout):
            listener.accept(timeout=0.1)


def test_abort_signal_interrupts_a_hanging_connect() -> None:
    # A listener whose accept queue is full drops new SYNs: connect() hangs until aborted.
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    port = full.getsockname()[1]
    queued = []
    for _ in range(4):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        queued.append(sock)

    def established() -> bool:            # one accepted handshake fills a listen(0) queue
        for sock in queued:
            try:
                sock.getpeername()
                return True
            except OSError:
                pass
        return False
    wait_until(established, 5, "a queued connection established")
    abort = AbortSignal()
    connector = Thread(lambda: connect_inet("127.0.0.1", port, abort=abort))
    connector.start()
    wait_blocked(connector)
    abort.trigger()
    with pytest.raises(TransportCancelled, match=f"^Failed to connect to '127.0.0.1:{port}'"):
        connector.outcome(timeout=5)
    abort.close()
    for sock in queued:
        sock.close()
    full.close()


def test_abort_signal_interrupts_a_unix_connect_to_a_full_backlog(tmp_path: Path) -> None:
    path = str(tmp_path / "full.sock")
    full, queued = full_unix_listener(path)
    abort = AbortSignal()
    connector = Thread(lambda: connect_unix(path, abort=abort))
    connector.start()
    wait_blocked(connector)
    abort.trigger()
    with pytest.raises(TransportCancelled, match=f"^Failed to connect to '{path}'"):
        connector.outcome(timeout=5)
    abort.close()
    for sock in queued:
        sock.close()
    full.close()


# -- exec ----------------------------------------------------------------------------------------
def test_exec_cat_both_ways(tmp_path: Path) -> None:
    target = tmp_path / "stream.bin"
    data = payload(3 * MiB + 5, seed=4)
    out = exec_outgoing(shell_argv(f"cat | cat > '{target}'"))
    assert isinstance(out, OutgoingChannel) and isinstance(out, RecordChannel)
    view = memoryview(data)
    out.writev([view[i:i + 65536] for i in range(0, len(view), 65536)])
    out.close()
    assert out.exit_status == 0
    assert target.read_bytes() == data

    inc = exec_incoming(shell_argv(f"cat '{target}' | cat"))
    assert isinstance(inc, IncomingChannel)
    assert read_all(inc, 100_000) == data
    inc.close()
    assert inc.exit_status == 0


def test_exec_argv_form_runs_without_a_shell(tmp_path: Path) -> None:
    target = tmp_path / "argv $HOME.bin"                     # no shell: no expansion
    out = exec_outgoing(["tee", str(target)])
    out.write(b"argv form")
    out.close()
    assert target.read_bytes() == b"argv form"
    inc = exec_incoming(["cat", str(target)])
    assert read_all(inc) == b"argv form"
    inc.close()


def test_exec_nonzero_exit_is_reported_at_close() -> None:
    out = exec_outgoing(shell_argv("cat > /dev/null; exit 3"))
    out.write(b"small enough to fit the pipe")
    with pytest.raises(TransportError, match=r"^Command 'cat > /dev/null; exit 3' exited with "
                                             r"status 3$"):
        out.close()
    assert out.exit_status == 3


def test_exec_false_fails_the_write() -> None:
    out = exec_outgoing(shell_argv("false"))
    with pytest.raises(TransportError) as info:
        out.write(bytes(8 * MiB))                            # more than the pipe holds
    assert str(info.value) == "Unable to write to command: Broken pipe"
    assert info.value.errno == errno.EPIPE
    out.close()                                              # the write error was the report
    assert out.exit_status == 1


def test_exec_command_not_found() -> None:
    with pytest.raises(TransportError, match="^Unable to run command '/nonexistent/migrate': "
                                             "No such file or directory$"):
        exec_outgoing(["/nonexistent/migrate"])


def test_exec_incoming_nonzero_exit_and_early_close() -> None:
    inc = exec_incoming(shell_argv("printf abc; exit 2"))
    assert read_all(inc) == b"abc"
    with pytest.raises(TransportError, match="^Command 'printf abc; exit 2' exited with status 2$"):
        inc.close()

    endless = exec_incoming(shell_argv("yes"))
    assert endless.read(1000)
    started = time.monotonic()
    endless.close()                                          # stops the command, no error
    assert time.monotonic() - started < 5
    assert endless.exit_status is not None


def live_group_members(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that are not zombies (orphans may wait a while for a reaper)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state not in ("Z", "X"):
            members.append(int(entry))
    return members


def test_exec_shutdown_unblocks_a_write_and_kills_the_pipeline() -> None:
    out = exec_outgoing(shell_argv("sleep 30 | sleep 30"))  # never reads its input
    writer = Thread(lambda: out.write(bytes(8 * MiB)))
    writer.start()
    wait_blocked(writer)                                     # the pipe is full
    out.shutdown()
    with pytest.raises(TransportCancelled,
                       match="^Unable to write to command: Operation canceled$"):
        writer.outcome(timeout=5)
    out.close()
    assert out.exit_status == -signal.SIGTERM
    wait_until(lambda: live_group_members(out.pid) == [], 5, "the pipeline's processes gone")


def test_exec_shutdown_unblocks_a_read() -> None:
    inc = exec_incoming(shell_argv("sleep 30"))
    reader = Thread(lambda: inc.read(10))
    reader.start()
    wait_blocked(reader)
    inc.shutdown()
    with pytest.raises(TransportCancelled,
                       match="^Unable to read from command: Operation canceled$"):
        reader.outcome(timeout=5)
    inc.close()


# -- file ----------------------------------------------------------------------------------------
def test_file_with_offset_truncates_like_qemu(tmp_path: Path) -> None:
    path = tmp_path / "vm.state"
    path.write_bytes(b"H" * 4096 + b"old stream" * 1000)
    data = payload(MiB + 3, seed=5)
    out = file_outgoing(str(path), offset=4096)
    out.write(data)
    out.close()
    content = path.read_bytes()
    assert len(content) == 4096 + len(data)
    assert content[:4096] == bytes(4096)                     # O_TRUNC: the old header is gone
    assert content[4096:] == data
    inc = file_incoming(str(path), offset=4096)
    assert read_all(inc, 77_777) == data
    inc.close()


def test_file_preserve_prefix_keeps_the_header(tmp_path: Path) -> None:
    path = tmp_path / "vm.state"
    header = b"my own header\n".ljust(512, b"\0")
    path.write_bytes(header + b"an older, longer stream" * 1000)
    data = payload(10_000, seed=6)
    out = file_outgoing(str(path), offset=len(header), preserve_prefix=True)
    out.write(data)
    out.close()
    assert path.read_bytes() == header + data


def test_file_created_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "new.state"
    out = file_outgoing(str(path))
    out.write(b"x")
    out.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_file_in_missing_directory(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "vm.state"
    with pytest.raises(TransportError) as info:
        file_outgoing(str(path))
    assert str(info.value) == f"Could not create '{path}': No such file or directory"
    with pytest.raises(TransportError) as info:
        file_incoming(str(path))
    assert str(info.value) == f"Could not open '{path}': No such file or directory"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_full_disk_text() -> None:
    out = file_outgoing("/dev/full")
    with pytest.raises(TransportError) as info:
        out.write(b"page" * 1024)
    assert str(info.value) == "Unable to write to file: No space left on device"
    assert info.value.errno == errno.ENOSPC
    out.close()


def test_file_offset_past_end_reads_empty(tmp_path: Path) -> None:
    path = tmp_path / "short"
    path.write_bytes(b"12345")
    inc = file_incoming(str(path), offset=100)
    assert inc.read(10) == b""
    inc.close()


def test_file_shutdown_cancels_further_writes(tmp_path: Path) -> None:
    out = file_outgoing(str(tmp_path / "cancelled"))
    out.write(b"before")
    out.shutdown()
    with pytest.raises(TransportCancelled, match="^Unable to write to file: Operation canceled$"):
        out.write(b"after")
    out.close()                                              # no fsync error, no raise


# -- zero copy -----------------------------------------------------------------------------------
def test_writev_64mib_of_memoryviews_without_copies(tmp_path: Path) -> None:
    size = 64 * MiB
    ram = mmap.mmap(-1, size)                                # stands in for guest RAM
    seed_block = payload(MiB, seed=7)
    for offset in range(0, size, MiB):
        ram[offset:offset + MiB] = seed_block
        ram[offset:offset + 8] = offset.to_bytes(8, "little")
    view = memoryview(ram)
    pages = [view[i:i + 4096] for i in range(0, size, 4096)]
    expected_crc = zlib.crc32(view)

    path = tmp_path / "bulk.sock"
    listener = Listener.unix(str(path))
    buffer = bytearray(MiB)

    def drain() -> tuple[int, int]:
        incoming = listener.accept(timeout=10)
        total, crc = 0, 0
        chunk = memoryview(buffer)
        while True:
            got = incoming.readinto(chunk)
            if not got:
                break
            crc = zlib.crc32(chunk[:got], crc)
            total += got
        incoming.close()
        return total, crc

    out = connect_unix(str(path))
    reader = Thread(drain)
    tracemalloc.start()
    try:
        reader.start()
        started = time.perf_counter()
        out.writev(pages)
        out.close()
        outcome = reader.outcome(timeout=60)
        assert isinstance(outcome, tuple)
        total, crc = outcome
        elapsed = time.perf_counter() - started
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == size and crc == expected_crc
    # The source pages were never copied: Python allocated far less than one MiB of buffers.
    assert peak < 2 * MiB, f"peak Python allocation {peak} bytes"
    print(f"unix writev of 64 MiB in 4 KiB memoryviews: {size / elapsed / 1e6:.0f} MB/s")
    view.release()
    for page in pages:
        page.release()
    ram.close()
