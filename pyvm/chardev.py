"""Character backends for ``-serial``: where the guest's serial bytes go and come from.

Forms (QEMU's ``-serial`` syntax, the subset pyvm supports):

=====================================  ==========================================================
``stdio`` (also ``mon:stdio``)         the terminal; a TTY is put in raw mode (signals such as
                                       Ctrl-C still work) and restored at exit; Ctrl-A x quits,
                                       Ctrl-A h prints help, Ctrl-A Ctrl-A sends Ctrl-A
``file:PATH``                          output only, the file is created or truncated
``unix:PATH,server=on[,wait=off]``     a listening unix socket (mode 0600), one client at a
                                       time; without ``wait=off`` pyvm waits for the first client
``unix:PATH``                          (``server=off``) connect to an existing socket
``tcp:[HOST]:PORT,server=on[,...]``    the same over TCP; HOST defaults to 127.0.0.1
``tcp:...,tls-creds=ID``               TLS on the TCP socket (QEMU's chardev-socket options):
                                       ``tls-creds`` names TLS credentials whose endpoint
                                       matches the socket's role; a server with
                                       ``tls-authz=ID`` lets in only certificates whose name
                                       the authz object allows.  A client that fails the
                                       handshake or the check is reported on stderr and
                                       dropped; the guest runs on.
``null``                               output dropped, no input
``none``                               no serial port at all (:func:`parse_serial` returns None)
``chardev:ID``                         the ``-chardev socket|file|stdio|null,id=ID,...`` of
                                       that id (:func:`resolve_chardev`)
=====================================  ==========================================================

The monitor multiplexing of ``mon:stdio`` (Ctrl-A c) is not provided here.  Output written
while no socket client is connected is dropped.  The UART transmits with
:meth:`CharBackend.write_some`, which never blocks: a socket client that does not read
leaves the rest in the UART's transmit FIFO (the guest sees its transmitter busy, as with
QEMU's ``qemu_chr_fe_write`` and ``serial_watch_cb`` in hw/char/serial.c), and the backend
calls the ``on_writable`` callback once the socket takes data again.  Input is handed to the receiver (the
UART's ``receive``) from a reader thread, no faster than the receiver's ``can_receive``
allows; the receiver calls :meth:`CharBackend.accept_input` when it has room again.

:meth:`CharBackend.info` gives QEMU's ``query-chardev`` entry.  Socket file names follow
QEMU: ``disconnected:unix:PATH,server=on`` while no client is connected, and
``unix:PATH,server=on`` / ``tcp:H:P,server=on <-> CH:CP`` with one.
"""

from __future__ import annotations

import atexit
import errno
import os
import select
import socket
import sys
import termios
import threading
from typing import Any, Callable, ClassVar

from pyvm.errors import ConfigError
from pyvm.private_files import create_private
from pyvm.host_sockets import UNIX_PATH_MAX, PortError, bind_unix_listener, parse_port
from pyvm.tls import AuthzList, AuthzSimple, ObjectRegistry, TlsCreds, TlsError
from pyvm.tls_pump import TlsPump, engine_for, handshake

Receiver = Callable[[bytes], None]
CanReceive = Callable[[], int]
Writable = Callable[[], None]

ESCAPE_CHAR = 0x01          # Ctrl-A, as in QEMU's multiplexer
READ_CHUNK = 4096
POLL_S = 0.2                # how often blocked threads look at the closed flag

HELP_TEXT = (b"\n\r"
             b"C-a h    print this help\n\r"
             b"C-a x    exit pyvm\n\r"
             b"C-a C-a  sends C-a\n\r")
TERMINATED_TEXT = b"pyvm: Terminated\n\r"


class EscapeDecoder:
    """Sans-IO Ctrl-A escape handling for an interactive terminal.

    :meth:`feed` takes typed bytes and returns the bytes meant for the guest and the
    actions requested (``"help"``, ``"quit"``), in order of arrival.
    """

    def __init__(self) -> None:
        self._escaped = False

    def feed(self, data: bytes) -> tuple[bytes, list[str]]:
        out = bytearray()
        actions: list[str] = []
        for byte in data:
            if self._escaped:
                self._escaped = False
                if byte == ESCAPE_CHAR:
                    out.append(byte)
                elif byte in (ord("h"), ord("?")):
                    actions.append("help")
                elif byte == ord("x"):
                    actions.append("quit")
                # any other key after Ctrl-A is swallowed
            elif byte == ESCAPE_CHAR:
                self._escaped = True
            else:
                out.append(byte)
        return bytes(out), actions


class CharBackend:
    """A byte pipe between the serial port and the host."""

    #: QEMU's name for the backend type, shown as ``filename`` in ``query-chardev``
    kind: ClassVar[str] = "null"

    def __init__(self, label: str, on_quit: Callable[[], None] | None = None) -> None:
        self.label = label
        self._on_quit = on_quit
        self._receiver: Receiver | None = None
        self._can_receive: CanReceive | None = None
        self._on_writable: Writable | None = None
        self._room = threading.Event()
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []
        self._warned = False

    # -- wiring ---------------------------------------------------------------------------
    def set_receiver(self, fn: Receiver) -> None:
        """Where input goes (the UART's ``receive``)."""
        self._receiver = fn

    def set_can_receive(self, fn: CanReceive) -> None:
        """How much input the receiver can take right now (the UART's ``can_receive``)."""
        self._can_receive = fn

    def set_on_writable(self, fn: Writable) -> None:
        """Called (from a backend thread) after :meth:`want_writable`, once
        :meth:`write_some` can take more output (the UART's transmit retry)."""
        self._on_writable = fn

    def set_on_quit(self, fn: Callable[[], None]) -> None:
        """Called (from the reader thread) when the user asks to quit with Ctrl-A x."""
        self._on_quit = fn

    def accept_input(self) -> None:
        """The receiver has room again: wake a reader waiting to deliver."""
        self._room.set()

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Begin reading input (spawns the reader thread when the backend has input)."""

    def close(self) -> None:
        """Stop the threads and release host resources; safe to call twice."""
        self._closed.set()
        self._room.set()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    # -- data -----------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        """Send guest output to the host (dropped by backends without output)."""

    def write_some(self, data: bytes) -> int:
        """Send what the host takes of ``data`` now, without blocking; how many bytes
        were consumed (sent or dropped).  Fewer than ``len(data)``: call
        :meth:`want_writable` and retry the rest when told."""
        self.write(data)
        return len(data)

    def want_writable(self) -> None:
        """Ask for one ``on_writable`` call once :meth:`write_some` can take more."""
        fn = self._on_writable
        if fn is not None:
            fn()

    def is_open(self) -> bool:
        """QEMU's ``frontend-open``: a frontend is connected and can talk."""
        return True

    @property
    def filename(self) -> str:
        """QEMU's ``filename`` of this chardev."""
        return self.kind

    def info(self) -> dict[str, Any]:
        """This backend's ``query-chardev`` entry."""
        return {"label": self.label, "filename": self.filename, "frontend-open": self.is_open()}

    # -- for subclasses -----------------------------------------------------------------------
    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=f"{self.label}-{name}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _join(self) -> None:
        me = threading.current_thread()
        for thread in self._threads:
            if thread is not me:
                thread.join(timeout=2.0)

    def _deliver(self, data: bytes) -> None:
        """Hand ``data`` to the receiver, waiting while it has no room."""
        while data and not self.closed:
            receiver = self._receiver
            if receiver is None:
                return                      # nobody listens: input is dropped
            room = len(data) if self._can_receive is None else self._can_receive()
            if room <= 0:
                self._room.clear()
                # re-check after clearing so an accept_input() in between is not lost
                if self._can_receive is not None and self._can_receive() <= 0:
                    self._room.wait(0.05)
                continue
            receiver(data[:room])
            data = data[room:]

    def _warn_once(self, problem: str) -> None:
        """Report a host-side output failure once; the guest's output is then dropped
        (a full disk under a serial log must not stop the VM)."""
        if not self._warned:
            self._warned = True
            print(f"pyvm: {self.label}: {problem}; serial output is dropped", file=sys.stderr)

    def _quit_requested(self) -> None:
        if self._on_quit is not None:
            self._on_quit()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [], POLL_S)
            continue
        view = view[written:]


class NullBackend(CharBackend):
    """``null``: a sink; QEMU reports it as never opened."""

    kind = "null"

    def is_open(self) -> bool:
        return False


class FileBackend(CharBackend):
    """``file:PATH``: guest output appended to a file created (or truncated) at start-up."""

    kind = "file"

    def __init__(self, label: str, path: str) -> None:
        super().__init__(label)
        self.path = path
        try:
            self._fd = create_private(path)      # guest output: mode 0600 (private_files.py)
        except OSError as err:
            raise ConfigError(f"Could not open '{path}': {err.strerror}") from err
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._fd < 0:
                return
            try:
                _write_all(self._fd, data)
            except OSError as err:
                self._warn_once(f"write to '{self.path}' failed: {err.strerror}")

    def close(self) -> None:
        super().close()
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


class StdioBackend(CharBackend):
    """``stdio``: the controlling terminal (or whatever stdin/stdout are)."""

    kind = "stdio"

    def __init__(self, label: str, in_fd: int = 0, out_fd: int = 1,
                 on_quit: Callable[[], None] | None = None) -> None:
        super().__init__(label, on_quit)
        self.in_fd = in_fd
        self.out_fd = out_fd
        self._lock = threading.Lock()
        self._saved_tty: list[Any] | None = None
        self._escapes = EscapeDecoder()
        self.interactive = os.isatty(in_fd)

    def start(self) -> None:
        if self.interactive and self._saved_tty is None:
            self._saved_tty = termios.tcgetattr(self.in_fd)
            termios.tcsetattr(self.in_fd, termios.TCSANOW, _raw_mode(self._saved_tty))
            atexit.register(self._restore_tty)
        self._spawn(self._reader, "stdin")

    def _restore_tty(self) -> None:
        saved, self._saved_tty = self._saved_tty, None
        if saved is not None:
            try:
                termios.tcsetattr(self.in_fd, termios.TCSANOW, saved)
            except termios.error:
                pass

    def close(self) -> None:
        super().close()
        self._restore_tty()
        self._join()

    def write(self, data: bytes) -> None:
        with self._lock:
            try:
                _write_all(self.out_fd, data)
            except OSError as err:
                if err.errno not in (errno.EPIPE, errno.EBADF):   # stdout gone: drop quietly
                    self._warn_once(f"write to stdout failed: {err.strerror}")

    def _reader(self) -> None:
        while not self.closed:
            try:
                ready, _, _ = select.select([self.in_fd], [], [], POLL_S)
                if not ready:
                    continue
                data = os.read(self.in_fd, READ_CHUNK)
            except (OSError, ValueError):
                return
            if not data:
                return                      # end of input: stop reading, keep running
            if self.interactive:
                data, actions = self._escapes.feed(data)
                for action in actions:
                    if action == "help":
                        self.write(HELP_TEXT)
                    elif action == "quit":
                        self.write(TERMINATED_TEXT)
                        self._quit_requested()
            self._deliver(data)


def _raw_mode(saved: list[Any]) -> list[Any]:
    """Terminal attributes for a serial console: raw input, output post-processing kept,
    signals kept so that Ctrl-C still interrupts pyvm (QEMU's stdio ``signal=on``)."""
    iflag, oflag, cflag, lflag = (int(x) for x in saved[:4])
    iflag &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
               | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON)
    oflag |= termios.OPOST
    lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.IEXTEN)
    cflag &= ~(termios.CSIZE | termios.PARENB)
    cflag |= termios.CS8
    cc = list(saved[6])
    cc[termios.VMIN] = 1
    cc[termios.VTIME] = 0
    attrs: list[Any] = [iflag, oflag, cflag, lflag, saved[4], saved[5], cc]
    return attrs


class SocketBackend(CharBackend):
    """``unix:`` and ``tcp:``: a listening server (one client at a time) or a client."""

    def __init__(self, label: str, family: int, address: Any, server: bool, wait: bool,
                 tls: "tuple[TlsCreds, AuthzSimple | AuthzList | None] | None" = None) -> None:
        super().__init__(label)
        self.family = family
        self.address = address
        self.server = server
        self.wait = wait and server
        self._tls = tls                         # (credentials, authz) for tls-creds=
        self._pump: TlsPump | None = None       # the TLS session of the current client
        self._client: socket.socket | None = None
        self._peer = ""
        self._lock = threading.Lock()           # guards _client and _peer
        self._write_lock = threading.Lock()     # serialises sends
        self._connected = threading.Event()
        self._want_write = threading.Event()    # the UART waits for the client to read
        self._listener: socket.socket | None = None
        self._unix_inode: tuple[int, int] | None = None
        if server:
            self._listen()
        else:
            self._connect()

    # -- naming -----------------------------------------------------------------------------
    def _address_text(self) -> str:
        suffix = ",server=on" if self.server else ""
        if self.family == socket.AF_UNIX:
            return f"unix:{self.address}{suffix}"
        host, port = self.address[0], self.address[1]
        host = f"[{host}]" if ":" in host else host
        return f"tcp:{host}:{port}{suffix}"

    @property
    def filename(self) -> str:
        with self._lock:
            if self._client is None:
                return "disconnected:" + self._address_text()
            if self.family == socket.AF_UNIX:
                return self._address_text()
            return f"{self._address_text()} <-> {self._peer}"

    def is_open(self) -> bool:
        with self._lock:
            return self._client is not None

    # -- set-up -----------------------------------------------------------------------------
    def _listen(self) -> None:
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            if self.family == socket.AF_UNIX:
                path = self.address
                sock.close()
                try:
                    sock = bind_unix_listener(path, 1)
                except FileExistsError:
                    raise ConfigError(f"Failed to bind socket to {path}: "
                                      "Address already in use") from None
                st = os.stat(path)
                self._unix_inode = (st.st_dev, st.st_ino)
            else:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(self.address)
                self.address = sock.getsockname()[:2]   # the real port when 0 was asked for
            sock.listen(1)
        except OSError as err:
            sock.close()
            where = self.address if self.family == socket.AF_UNIX else \
                f"{self.address[0]}:{self.address[1]}"
            raise ConfigError(f"Failed to bind socket to {where}: {err.strerror}") from err
        self._listener = sock

    def _connect(self) -> None:
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            sock.connect(self.address)
        except OSError as err:
            sock.close()
            where = self.address if self.family == socket.AF_UNIX else \
                f"{self.address[0]}:{self.address[1]}"
            raise ConfigError(f"Failed to connect to '{where}': {err.strerror}") from err
        if self._tls is not None:
            try:
                sock = self._tls_session(sock)
            except TlsError as err:
                raise ConfigError(str(err)) from err
        self._set_client(sock)

    def _tls_session(self, sock: socket.socket) -> socket.socket:
        """Handshake on ``sock`` (chardev/char-socket.c tcp_chr_tls_init: the server
        endpoint when listening, else the client one, checking the host name); the plain
        end of the session's pump, or TlsError with QEMU's text (``sock`` closed)."""
        assert self._tls is not None
        creds, authz = self._tls
        try:
            engine = engine_for(creds, self.server, None if self.server else self.address[0])
            handshake(sock, engine, authz if self.server else None,
                      aborted=lambda: self.closed)
        except BaseException:
            sock.close()
            raise
        self._pump = TlsPump(sock, engine, f"{self.label}-tls")
        return self._pump.plain

    def _set_client(self, sock: socket.socket | None, peer: str = "") -> None:
        with self._lock:
            self._client = sock
            self._peer = peer
        if sock is not None:
            self._connected.set()
        else:
            self._connected.clear()

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._spawn(self._watch_writable, "writable")
        if self.server:
            self._spawn(self._serve, "accept")
            if self.wait:
                print(f"pyvm waiting for connection on: {self.filename}", file=sys.stderr)
                while not self._connected.wait(POLL_S):
                    if self.closed:
                        return
        else:
            self._spawn(self._client_reader, "reader")
        atexit.register(self.close)

    def close(self) -> None:
        if self.closed and self._listener is None and self._client is None:
            return
        super().close()
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            _shutdown(client)
        self._join()
        if client is not None:
            with self._write_lock:
                client.close()
        self._end_pump()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            if self.family == socket.AF_UNIX:
                self._unlink_own_socket()

    def _unlink_own_socket(self) -> None:
        try:
            st = os.stat(self.address)
            if (st.st_dev, st.st_ino) == self._unix_inode:
                os.unlink(self.address)
        except OSError:
            pass

    # -- data -----------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        with self._lock:
            client = self._client
        if client is None:
            return                          # no client: output is dropped
        with self._write_lock:
            try:
                client.sendall(data)
            except OSError:
                _shutdown(client)           # the reader sees EOF and drops the client

    def write_some(self, data: bytes) -> int:
        with self._lock:
            client = self._client
        if client is None:
            return len(data)                # no client: output is dropped
        with self._write_lock:
            try:
                return client.send(data, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return 0                    # the client is not reading: retry later
            except OSError:
                _shutdown(client)           # the reader sees EOF and drops the client
                return len(data)

    def want_writable(self) -> None:
        self._want_write.set()

    def _watch_writable(self) -> None:
        """Tell the UART when the client's socket takes output again (or is gone, so that
        the output is dropped instead of waiting for ever)."""
        while not self.closed:
            if not self._want_write.wait(POLL_S):
                continue
            with self._lock:
                client = self._client
            if client is not None:
                try:
                    _, ready, _ = select.select([], [client], [], POLL_S)
                except (OSError, ValueError):
                    ready = [client]        # closed under us: let write_some drop
                if not ready:
                    continue
            self._want_write.clear()
            fn = self._on_writable
            if fn is not None and not self.closed:
                fn()

    def _serve(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self.closed:
            try:
                ready, _, _ = select.select([listener], [], [], POLL_S)
                if not ready:
                    continue
                sock, peer = listener.accept()
            except (OSError, ValueError):
                if self.closed:
                    return
                continue
            peer_text = ""
            if self.family != socket.AF_UNIX:
                host = f"[{peer[0]}]" if ":" in peer[0] else peer[0]
                peer_text = f"{host}:{peer[1]}"
            if self._tls is not None:
                try:
                    sock = self._tls_session(sock)
                except TlsError as err:
                    # refused (no or a wrong certificate, authz): the client is dropped,
                    # the port keeps listening and the guest keeps running
                    if not self.closed:
                        print(f"pyvm: {self.label}: {err}", file=sys.stderr, flush=True)
                    continue
            self._set_client(sock, peer_text)
            self._read_from(sock)
            self._drop_client(sock)

    def _client_reader(self) -> None:
        with self._lock:
            sock = self._client
        if sock is not None:
            self._read_from(sock)
            self._drop_client(sock)

    def _read_from(self, sock: socket.socket) -> None:
        while not self.closed:
            try:
                ready, _, _ = select.select([sock], [], [], POLL_S)
                if not ready:
                    continue
                data = sock.recv(READ_CHUNK)
            except (OSError, ValueError):
                return
            if not data:
                return
            self._deliver(data)

    def _drop_client(self, sock: socket.socket) -> None:
        with self._lock:
            if self._client is sock:
                self._client = None
                self._peer = ""
        self._connected.clear()
        _shutdown(sock)                     # wakes a writer blocked in sendall
        with self._write_lock:
            sock.close()
        self._end_pump()

    def _end_pump(self) -> None:
        """Let the TLS session say goodbye (the plain end is shut), then join its thread."""
        pump, self._pump = self._pump, None
        if pump is not None:
            pump.join(2.0)
            if pump.alive:
                pump.stop()
                pump.join()


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


# -- parsing --------------------------------------------------------------------------------
_UNSUPPORTED = ("vc", "pty", "pipe", "udp", "telnet", "mon", "braille", "msmouse",
                "tty", "parport", "spicevmc", "spiceport", "serial")


def _split_options(text: str) -> list[str]:
    """Split at commas; ``,,`` stands for a literal comma (QEMU option syntax)."""
    parts: list[str] = []
    current = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            if text[i + 1:i + 2] == ",":
                current.append(",")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    return parts


def _bool_option(spec: str, key: str, value: str) -> bool:
    if value in ("on", "yes", "true"):
        return True
    if value in ("off", "no", "false"):
        return False
    raise ConfigError(f"-serial {spec}: Parameter '{key}' expects 'on' or 'off'")


def _socket_options(spec: str, options: list[str]) -> tuple[bool, bool, dict[str, str]]:
    server, wait = False, True
    tls: dict[str, str] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep:
            # legacy short forms: "server", "nowait", "noserver", "wait"
            if key.startswith("no") and key[2:] in ("server", "wait"):
                key, value = key[2:], "off"
            else:
                value = "on"
        if key == "server":
            server = _bool_option(spec, key, value)
        elif key == "wait":
            wait = _bool_option(spec, key, value)
        elif key in ("tls-creds", "tls-authz"):
            tls[key] = value
        elif key in ("nodelay", "telnet", "websocket", "reconnect"):
            if key in ("telnet", "websocket") and _bool_option(spec, key, value):
                raise ConfigError(f"-serial {spec}: '{key}' is not supported by pyvm")
        else:
            raise ConfigError(f"-serial {spec}: Invalid parameter '{key}'")
    return server, wait, tls


def _tls_setup(spec: str, kind: str, server: bool, tls: dict[str, str],
               objects: ObjectRegistry | None
               ) -> "tuple[TlsCreds, AuthzSimple | AuthzList | None] | None":
    """The credentials and authz object of ``tls-creds=``/``tls-authz=``
    (chardev/char-socket.c qmp_chardev_validate_socket and tcp_chr_tls_init texts)."""
    creds_id, authz_id = tls.get("tls-creds"), tls.get("tls-authz")
    if creds_id is None and authz_id is None:
        return None
    if kind != "tcp":
        raise ConfigError(f"-serial {spec}: TLS can only be used over TCP socket")
    if creds_id is None:
        raise ConfigError(f"-serial {spec}: 'tls_authz' option requires 'tls_creds' option")
    if objects is None:
        objects = ObjectRegistry()
    try:
        creds = objects.creds(creds_id, "server" if server else "client")
        authz = objects.authz(authz_id) if authz_id is not None else None
    except TlsError as err:
        raise ConfigError(f"-serial {spec}: {err}") from err
    return creds, authz


def _parse_tcp(spec: str, rest: str) -> tuple[str, int]:
    if rest.startswith("["):
        host, sep, tail = rest[1:].partition("]")
        if not sep or not tail.startswith(":"):
            raise ConfigError(f"-serial {spec}: error parsing IPv6 address '{rest}'")
        port_text = tail[1:]
    else:
        host, sep, port_text = rest.rpartition(":")
        if not sep:
            raise ConfigError(f"-serial {spec}: error parsing address '{rest}'")
    try:
        port = parse_port(port_text)
    except PortError:
        raise ConfigError(f"-serial {spec}: error parsing port in address '{rest}'") from None
    return host or "127.0.0.1", port


def resolve_chardev(spec: str, chardevs: list[str]) -> str:
    """``-serial chardev:ID`` as the ``-serial`` form of the ``-chardev`` named ID
    (``socket`` with ``host``/``port`` or ``path``, ``file``, ``stdio``, ``null``); any
    other SPEC is returned as it is.  QEMU's text when no ``-chardev`` has that id."""
    kind, sep, ident = spec.partition(":")
    if kind != "chardev" or not sep:
        return spec
    for value in chardevs:
        backend, *options = _split_options(value)
        pairs = dict(o.partition("=")[::2] for o in options)
        if "=" in backend:                     # "backend=socket,id=..." form
            key, _, val = backend.partition("=")
            pairs[key] = val
            backend = pairs.pop("backend", "")
        if pairs.get("id") != ident:
            continue
        opts = [f"{k}={v}".replace(",", ",,") for k, v in pairs.items()
                if k not in ("id", "host", "port", "path")]
        if backend == "socket":
            if "path" in pairs:
                return ",".join([f"unix:{pairs['path']}".replace(",", ",,"), *opts])
            host = pairs.get("host", "")
            host = f"[{host}]" if ":" in host else host
            return ",".join([f"tcp:{host}:{pairs.get('port', '')}", *opts])
        if backend == "file" and "path" in pairs:
            return f"file:{pairs['path']}"
        if backend in ("stdio", "null"):
            return backend
        raise ConfigError(f"-chardev {value}: character device '{backend}' cannot be a "
                          "serial port in pyvm")
    raise ConfigError(f"could not connect serial device to character device '{spec}'")


def parse_serial(spec: str, label: str, on_quit: Callable[[], None] | None = None,
                 tls_objects: ObjectRegistry | None = None) -> CharBackend | None:
    """Build the backend for ``-serial SPEC``; None for ``none`` (no serial port).

    Raises :class:`ConfigError` with one line naming the problem.  Files and sockets are
    opened here so that a bad path fails at start-up; :meth:`CharBackend.start` begins I/O.
    """
    if spec == "none":
        return None
    if spec in ("stdio", "mon:stdio"):
        return StdioBackend(label, on_quit=on_quit)
    if spec == "null":
        return NullBackend(label)
    kind, sep, rest = spec.partition(":")
    if kind == "file" and sep:
        if not rest:
            raise ConfigError(f"-serial {spec}: file name is missing")
        return FileBackend(label, rest)
    if kind in ("unix", "tcp") and sep:
        address, *options = _split_options(rest)
        server, wait, tls_opts = _socket_options(spec, options)
        tls = _tls_setup(spec, kind, server, tls_opts, tls_objects)
        if kind == "unix":
            if not address:
                raise ConfigError(f"-serial {spec}: unix socket path is missing")
            if len(os.fsencode(address)) > UNIX_PATH_MAX:
                raise ConfigError(f"-serial {spec}: UNIX socket path '{address}' is too long")
            return SocketBackend(label, socket.AF_UNIX, address, server, wait)
        host, port = _parse_tcp(spec, address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            return SocketBackend(label, family, (host, port), server, wait, tls)
        except ConfigError as err:
            if tls is None:
                raise
            raise ConfigError(f"-serial {spec}: {err}") from err
    if kind in _UNSUPPORTED or (kind == "file" and not sep):
        raise ConfigError(f"-serial {spec}: character device '{kind}' is not supported by pyvm")
    raise ConfigError(f"-serial {spec}: '{spec}' is not a valid char driver")
