"""Character backends for -serial: parsing, stdio (pipe and pty), file, unix/tcp servers,
flow control into the UART, query-chardev entries."""

from __future__ import annotations

import os
import select
import socket
import stat
import termios
import threading
import time
import pytest

from pyvm.chardev import (HELP_TEXT, EscapeDecoder, FileBackend, NullBackend, SocketBackend,
                          StdioBackend, parse_serial)
from pyvm.devices.base import Clock
from pyvm.devices.uart16550 import Uart16550
from pyvm.errors import ConfigError
from tests.waiting import wait_until




class Sink:
    def __init__(self) -> None:
        self.data = bytearray()
        self.lock = threading.Lock()

    def __call__(self, data: bytes) -> None:
        with self.lock:
            self.data += data

    def get(self) -> bytes:
        with self.lock:
            return bytes(self.data)


def recv_until(sock: socket.socket, expected: bytes, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    got = b""
    while len(got) < len(expected):
        chunk = sock.recv(4096)
        if not chunk:
            break
        got += chunk
    return got


# -- parsing ---------------------------------------------------------------------------------
def test_none_means_no_serial_port():
    assert parse_serial("none", "serial0") is None


def test_null_backend_info():
    backend = parse_serial("null", "serial0")
    assert isinstance(backend, NullBackend)
    backend.write(b"dropped")
    assert backend.info() == {"label": "serial0", "filename": "null", "frontend-open": False}


@pytest.mark.parametrize("spec,message", [
    ("bogus", "'bogus' is not a valid char driver"),
    ("pty", "'pty' is not supported"),
    ("file:", "file name is missing"),
    ("unix:", "unix socket path is missing"),
    ("unix:/tmp/x.sock,server=on,colour=red", "Invalid parameter 'colour'"),
    ("unix:/tmp/x.sock,server=maybe", "Parameter 'server' expects 'on' or 'off'"),
    ("tcp:127.0.0.1:http,server=on", "error parsing port"),
    ("tcp:nohostport,server=on", "error parsing address"),
    ("tcp:127.0.0.1:70000,server=on", "error parsing port"),
    ("unix:/" + "d" * 120 + ",server=on", "is too long"),
    ("unix:/tmp/x.sock,server=on,telnet=on", "'telnet' is not supported"),
])
def test_bad_specs_give_one_line_errors(spec, message):
    with pytest.raises(ConfigError) as info:
        parse_serial(spec, "serial0")
    text = str(info.value)
    assert message in text and "\n" not in text
    assert text.startswith(f"-serial {spec}: ")


def test_unopenable_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="Could not open '.*': No such file or directory"):
        parse_serial(f"file:{tmp_path}/missing/out.txt", "serial0")


def test_file_backend_truncates_and_writes_through(tmp_path):
    path = tmp_path / "serial.log"
    path.write_bytes(b"old contents")
    backend = parse_serial(f"file:{path}", "serial0")
    assert isinstance(backend, FileBackend)
    backend.start()
    backend.write(b"hello ")
    assert path.read_bytes() == b"hello "           # no buffering in pyvm
    backend.write(b"world")
    backend.close()
    backend.close()
    assert path.read_bytes() == b"hello world"
    assert backend.info() == {"label": "serial0", "filename": "file", "frontend-open": True}


# -- escapes -----------------------------------------------------------------------------------
def test_escape_decoder():
    dec = EscapeDecoder()
    assert dec.feed(b"ab\x01xcd") == (b"abcd", ["quit"])
    assert dec.feed(b"\x01\x01") == (b"\x01", [])
    assert dec.feed(b"\x01h\x01?") == (b"", ["help", "help"])
    assert dec.feed(b"\x01") == (b"", [])             # escape split across reads
    assert dec.feed(b"x!") == (b"!", ["quit"])
    assert dec.feed(b"\x01z") == (b"", [])            # unknown escapes are swallowed


# -- stdio -------------------------------------------------------------------------------------
def test_stdio_with_pipes_passes_bytes_unchanged():
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    quits = []
    backend = StdioBackend("serial0", in_fd=in_r, out_fd=out_w, on_quit=lambda: quits.append(1))
    assert not backend.interactive
    sink = Sink()
    backend.set_receiver(sink)
    backend.start()
    os.write(in_w, b"typed\x01x")                   # not a TTY: no escape processing
    wait_until(lambda: sink.get() == b"typed\x01x")
    backend.write(b"guest says hi\n")
    assert os.read(out_r, 100) == b"guest says hi\n"
    os.close(in_w)                                  # EOF ends the reader, not pyvm
    backend.close()
    assert quits == []
    assert backend.info()["filename"] == "stdio"
    for fd in (in_r, out_r, out_w):
        os.close(fd)


def test_stdio_on_a_tty_raw_mode_escapes_and_restore():
    master, slave = os.openpty()
    before = termios.tcgetattr(slave)
    quits = []
    backend = StdioBackend("serial0", in_fd=slave, out_fd=slave, on_quit=lambda: quits.append(1))
    assert backend.interactive
    sink = Sink()
    backend.set_receiver(sink)
    backend.start()
    raw = termios.tcgetattr(slave)
    assert not raw[3] & (termios.ICANON | termios.ECHO)
    assert raw[3] & termios.ISIG                    # Ctrl-C still interrupts pyvm
    assert not raw[0] & termios.ICRNL
    os.write(master, b"a\r\x01\x01\x01h")
    wait_until(lambda: sink.get() == b"a\r\x01")
    shown = bytearray()

    def help_shown() -> bool:
        while select.select([master], [], [], 0)[0]:
            shown.extend(os.read(master, 4096))
        return b"C-a x    exit pyvm" in shown

    wait_until(help_shown)
    os.write(master, b"\x01x")
    wait_until(lambda: quits == [1])
    backend.close()
    assert termios.tcgetattr(slave) == before
    os.close(master)
    os.close(slave)


def test_help_text_names_the_keys():
    assert b"C-a x" in HELP_TEXT and b"C-a h" in HELP_TEXT and b"C-a C-a" in HELP_TEXT


# -- unix sockets --------------------------------------------------------------------------------
@pytest.fixture
def sock_path(tmp_path) -> str:
    return str(tmp_path / "serial.sock")


def test_unix_server_lifecycle(sock_path):
    backend = parse_serial(f"unix:{sock_path},server=on,wait=off", "serial0")
    assert isinstance(backend, SocketBackend)
    assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600
    assert backend.info() == {"label": "serial0",
                              "filename": f"disconnected:unix:{sock_path},server=on",
                              "frontend-open": False}
    sink = Sink()
    backend.set_receiver(sink)
    backend.start()
    backend.write(b"nobody listens")                # dropped
    client = socket.socket(socket.AF_UNIX)
    client.connect(sock_path)
    wait_until(backend.is_open)
    assert backend.info()["filename"] == f"unix:{sock_path},server=on"
    backend.write(b"to client")
    assert recv_until(client, b"to client") == b"to client"
    client.sendall(b"from client")
    wait_until(lambda: sink.get() == b"from client")
    # a second client waits until the first one leaves
    second = socket.socket(socket.AF_UNIX)
    second.connect(sock_path)
    second.sendall(b"+second")
    client.sendall(b"+more")                # sent after the second's: it arrives first
    wait_until(lambda: sink.get() == b"from client+more")
    client.close()
    wait_until(lambda: sink.get() == b"from client+more+second")
    backend.write(b"to second")
    assert recv_until(second, b"to second") == b"to second"
    second.close()
    wait_until(lambda: not backend.is_open())
    backend.close()
    assert not os.path.exists(sock_path)


def test_stale_socket_is_replaced_but_regular_file_is_not(sock_path, tmp_path):
    old = socket.socket(socket.AF_UNIX)
    old.bind(sock_path)
    old.close()
    backend = parse_serial(f"unix:{sock_path},server=on,wait=off", "serial0")
    assert backend is not None
    backend.close()
    regular = tmp_path / "file"
    regular.write_text("keep me")
    with pytest.raises(ConfigError, match="Address already in use"):
        parse_serial(f"unix:{regular},server=on,wait=off", "serial0")
    assert regular.read_text() == "keep me"


def test_wait_on_blocks_start_until_a_client_connects(sock_path, capfd):
    backend = parse_serial(f"unix:{sock_path},server=on", "serial0")
    assert backend is not None
    started = threading.Event()

    def start() -> None:
        backend.start()
        started.set()

    thread = threading.Thread(target=start)
    thread.start()
    err: list[str] = []
    # start() announces the wait, then waits: it must still be waiting
    wait_until(lambda: err.append(capfd.readouterr().err) or "waiting for connection on:" in "".join(err))
    assert not started.is_set()
    client = socket.socket(socket.AF_UNIX)
    client.connect(sock_path)
    assert started.wait(5)
    thread.join()
    assert "waiting for connection on: disconnected:unix:" in "".join(err)
    client.close()
    backend.close()


def test_unix_client_mode(sock_path):
    server = socket.socket(socket.AF_UNIX)
    server.bind(sock_path)
    server.listen(1)
    backend = parse_serial(f"unix:{sock_path}", "serial0")
    assert backend is not None
    conn, _ = server.accept()
    sink = Sink()
    backend.set_receiver(sink)
    backend.start()
    assert backend.info()["frontend-open"] is True
    backend.write(b"ping")
    assert recv_until(conn, b"ping") == b"ping"
    conn.sendall(b"pong")
    wait_until(lambda: sink.get() == b"pong")
    conn.close()
    wait_until(lambda: not backend.is_open())
    backend.close()
    server.close()


def test_unix_client_mode_without_server_fails(sock_path):
    with pytest.raises(ConfigError, match="Failed to connect"):
        parse_serial(f"unix:{sock_path}", "serial0")


# -- tcp -----------------------------------------------------------------------------------------
def test_tcp_server_on_ephemeral_port():
    backend = parse_serial("tcp::0,server=on,wait=off", "serial0")
    assert isinstance(backend, SocketBackend)
    host, port = backend.address
    assert host == "127.0.0.1" and port > 0
    assert backend.info()["filename"] == f"disconnected:tcp:127.0.0.1:{port},server=on"
    sink = Sink()
    backend.set_receiver(sink)
    backend.start()
    client = socket.create_connection(("127.0.0.1", port))
    wait_until(backend.is_open)
    cport = client.getsockname()[1]
    assert backend.info()["filename"] == \
        f"tcp:127.0.0.1:{port},server=on <-> 127.0.0.1:{cport}"
    client.sendall(b"over tcp")
    wait_until(lambda: sink.get() == b"over tcp")
    backend.write(b"back")
    assert recv_until(client, b"back") == b"back"
    client.close()
    backend.close()


# -- flow control and the UART -----------------------------------------------------------------
def test_reader_waits_for_room(sock_path):
    backend = parse_serial(f"unix:{sock_path},server=on,wait=off", "serial0")
    assert backend is not None
    room = [0]
    asked = [0]
    sink = Sink()
    backend.set_receiver(sink)

    def can_receive() -> int:
        asked[0] += 1
        return room[0]
    backend.set_can_receive(can_receive)
    backend.start()
    client = socket.socket(socket.AF_UNIX)
    client.connect(sock_path)
    client.sendall(b"0123456789")
    # the reader holds the input and keeps asking for room (it asks only once it has data)
    wait_until(lambda: asked[0] >= 4)
    assert sink.get() == b""
    room[0] = 4
    backend.accept_input()
    wait_until(lambda: len(sink.get()) >= 4)
    room[0] = 100
    backend.accept_input()
    wait_until(lambda: sink.get() == b"0123456789")
    client.close()
    backend.close()


class _Clock:
    def now_ns(self) -> int:
        return 0


class _Ctx:
    """Just enough machine for a UART test that never looks at IRQs."""

    def __init__(self) -> None:
        self.clock: Clock = _Clock()
        self.kicks = 0

    def set_irq(self, line: int, level: bool) -> None:
        pass

    def kick(self) -> None:
        self.kicks += 1

    def request_reset(self) -> None:
        pass

    def request_exit(self, code: int) -> None:
        pass

    def log(self, topic: str, message: str) -> None:
        pass


def test_socket_input_reaches_guest_through_uart_without_overrun(sock_path):
    backend = parse_serial(f"unix:{sock_path},server=on,wait=off", "serial0")
    assert backend is not None
    uart = Uart16550(backend)
    ctx = _Ctx()
    uart.attach(ctx)
    uart.reset()
    uart.io_write(0x3FA, 1, 0x01)       # FIFO on
    backend.start()
    client = socket.socket(socket.AF_UNIX)
    client.connect(sock_path)
    payload = bytes(range(256)) * 8
    client.sendall(payload)
    got = bytearray()
    end = time.monotonic() + 10
    while len(got) < len(payload) and time.monotonic() < end:
        lsr = uart.io_read(0x3FD, 1)
        assert not lsr & 0x02, "overrun"
        if lsr & 0x01:
            got.append(uart.io_read(0x3F8, 1))
    assert bytes(got) == payload
    assert ctx.kicks > 0
    uart.io_write(0x3F8, 1, ord("!"))   # guest output goes to the client
    assert recv_until(client, b"!") == b"!"
    client.close()
    uart.close()
    assert not os.path.exists(sock_path)


def test_file_write_failure_warns_once_and_drops(tmp_path, capfd):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    backend = parse_serial("file:/dev/full", "serial0")
    assert backend is not None
    backend.write(b"x")
    backend.write(b"y")
    err = capfd.readouterr().err
    assert err.count("serial0: write to '/dev/full' failed") == 1
    backend.close()
