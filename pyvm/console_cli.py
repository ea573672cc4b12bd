"""``pyvm-console``: a guest's serial port on a socket, from this terminal or from a script.

    pyvm-console console.sock                   interactive: this terminal is the serial port
                                                (Ctrl-] quits)
    pyvm-console console.sock --wake            press Enter until the guest shows a prompt
    pyvm-console console.sock --type 'uname -r' type a line, print everything up to the
                                                next prompt
    pyvm-console console.sock --until 'login:'  print what the guest sends until REGEX
    echo 'ls /' | pyvm-console console.sock     each line of stdin is typed like --type

The serial port is the one pyvm puts on a socket with ``-serial unix:PATH,server=on``
(or ``tcp:HOST:PORT,server=on``); SOCKET is ``PATH``, ``unix:PATH`` or ``HOST:PORT``.
A port with ``tls-creds=`` is reached with ``--tls-creds DIR``: a directory in QEMU's
layout for a client (``ca-cert.pem``, and ``client-cert.pem`` + ``client-key.pem`` when
the port verifies its peers); the port's certificate must match ``--tls-hostname``
(default: HOST).
A ``wait=off`` port drops what the guest writes while nobody is connected, so a script
first wakes the shell (``--wake``) and then types.  A prompt is the last line of output,
unfinished, matching ``--prompt`` (``[#$>] $`` by default: busybox's and most shells').
Lines are typed with a carriage return, as a terminal's Enter key sends.  Output is
printed as received, with the terminal's CR LF line ends made plain LF and terminal
control sequences (ESC [ ...) left out.

Exit status: 0 when every wait ended as asked; 1 on a timeout (``--timeout`` seconds for
each wait, the connection included) or a closed port.
"""

from __future__ import annotations

import argparse
import os
import re
import select
import socket
import sys
import termios
import time
import tty
from typing import Iterable

from pyvm.tls import TlsCredsX509, TlsError
from pyvm.tls_pump import TlsPump, engine_for, handshake

QUIT_KEY = b"\x1d"            # Ctrl-]
WAKE_INTERVAL = 2.0           # seconds of silence before --wake presses Enter again
DEFAULT_PROMPT = r"[#$>] $"
#: Terminal control sequences (CSI ... final byte) a shell sends to a terminal, such as
#: busybox's cursor-position query ESC [ 6 n after each prompt; a script does not want them.
CSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
#: The start of one, cut off at the end of what has arrived so far.
CSI_START = re.compile(r"\x1b(\[[0-9;?]*[ -/]*)?\Z")


class ConsoleError(Exception):
    """A one-line failure (timeout, closed port); no traceback."""


def _address(text: str) -> tuple[int, str | tuple[str, int]]:
    if text.startswith("unix:"):
        return socket.AF_UNIX, text[5:].split(",")[0]
    if text.startswith("tcp:"):
        text = text[4:].split(",")[0]
    elif os.path.exists(text) or ":" not in text:
        return socket.AF_UNIX, text
    host, _, port = text.rpartition(":")
    if not port.isdigit():
        raise ConsoleError(f"'{text}' is neither a socket path nor HOST:PORT")
    return socket.AF_INET6 if ":" in host else socket.AF_INET, (host or "localhost", int(port))


def connect(text: str, timeout: float) -> socket.socket:
    """Connect to the serial socket, retrying while pyvm is still starting."""
    family, address = _address(text)
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.connect(address)
            return sock
        except OSError as err:
            sock.close()
            if time.monotonic() > deadline:
                raise ConsoleError(f"cannot connect to {text}: {err.strerror or err}") from None
        time.sleep(0.1)


def start_tls(sock: socket.socket, creds_dir: str, hostname: str,
              timeout: float) -> TlsPump:
    """The TLS session with the port (its plain end is ``.plain``); ConsoleError when
    refused (sock is closed then)."""
    creds = TlsCredsX509("console", creds_dir, "client", verify_peer=True)
    try:
        engine = engine_for(creds, False, hostname)
        handshake(sock, engine, timeout=timeout)
    except TlsError as err:
        sock.close()
        raise ConsoleError(f"TLS with the serial port failed: {err}") from None
    return TlsPump(sock, engine, "console-tls")


class Console:
    """The client end of one serial socket: type lines and wait for text."""

    def __init__(self, sock: socket.socket, out: "Output") -> None:
        self.sock = sock
        self.out = out
        self.text = ""             # everything received since the last mark()
        self._held = ""            # a control sequence cut in two by the socket
        self._last_rx = time.monotonic()

    def type(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\r")

    def mark(self) -> None:
        self.text = ""

    def _receive(self, wait: float) -> None:
        ready, _, _ = select.select([self.sock], [], [], wait)
        if not ready:
            return
        data = self.sock.recv(65536)
        if not data:
            raise ConsoleError("the serial port closed the connection")
        self._last_rx = time.monotonic()
        chunk = self._held + data.decode(errors="replace")
        cut = CSI_START.search(chunk)
        self._held = chunk[cut.start():] if cut else ""
        chunk = chunk[:cut.start()] if cut else chunk
        chunk = CSI.sub("", chunk.replace("\r\n", "\n").replace("\r", ""))
        self.text += chunk
        self.out.write(chunk)

    def wait_prompt(self, prompt: "re.Pattern[str]", timeout: float, wake: bool = False,
                    after: str | None = None) -> None:
        """Until the unfinished last line matches ``prompt``.

        ``after``: a line just typed; the prompt counts only once the guest has echoed it
        (a shell wraps a long line, so newlines inside the echo are skipped), so that a
        prompt left over from earlier input, or a line of the command ending in ``> ``,
        is not taken for the answer.  ``wake`` presses Enter after every
        :data:`WAKE_INTERVAL` seconds of silence (and once at the start), then lets the
        prompts of the extra Enters go by.
        """
        deadline = time.monotonic() + timeout
        if wake:
            self.type("")
        start: int | None = 0 if after is None else None
        while True:
            if start is None:
                start = _echo_end(self.text, after or "")
            if start is not None and prompt.search(self.text[start:].rpartition("\n")[2]):
                break
            now = time.monotonic()
            if now > deadline:
                raise ConsoleError(f"no prompt matching '{prompt.pattern}' within {timeout:g} s")
            if wake and now - self._last_rx > WAKE_INTERVAL:
                self._last_rx = now
                self.type("")
            self._receive(min(0.2, deadline - now))
        if wake:
            quiet_until = min(deadline, time.monotonic() + 3.0)
            while time.monotonic() < quiet_until and time.monotonic() - self._last_rx < 0.5:
                self._receive(0.1)

    def wait_for(self, pattern: "re.Pattern[str]", timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not pattern.search(self.text):
            now = time.monotonic()
            if now > deadline:
                raise ConsoleError(f"'{pattern.pattern}' not seen within {timeout:g} s")
            self._receive(min(0.2, deadline - now))


def _echo_end(text: str, line: str) -> int | None:
    """Where the echo of ``line`` ends in ``text`` (newlines in the echo skipped), or None."""
    if not line:
        return 0 if text else None
    first = line[0]
    for begin in (i for i, ch in enumerate(text) if ch == first):
        j, k = begin, 0
        while j < len(text) and k < len(line):
            if text[j] == "\n":
                j += 1
                continue
            if text[j] != line[k]:
                break
            j, k = j + 1, k + 1
        if k == len(line):
            return j
    return None


class Output:
    """stdout, flushed as it comes (a script sees the guest's answer as it is printed)."""

    def write(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()


def interactive(sock: socket.socket) -> int:
    """This terminal, raw, copied both ways until Ctrl-] or the port closes."""
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    print("pyvm-console: connected; Ctrl-] quits", file=sys.stderr, flush=True)
    try:
        tty.setraw(fd)
        while True:
            ready, _, _ = select.select([sock, fd], [], [])
            if sock in ready:
                data = sock.recv(65536)
                if not data:
                    return 0
                os.write(sys.stdout.fileno(), data)
            if fd in ready:
                keys = os.read(fd, 1024)
                if not keys or QUIT_KEY in keys:
                    return 0
                sock.sendall(keys)
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        print("", file=sys.stderr)


def scripted(con: Console, lines: Iterable[str], wake: bool, until: "re.Pattern[str] | None",
             prompt: "re.Pattern[str]", timeout: float) -> None:
    if wake:
        con.wait_prompt(prompt, timeout, wake=True)
    typed = False
    for line in lines:
        con.mark()
        con.type(line)
        con.wait_prompt(prompt, timeout, after=line)
        typed = True
    if until is not None:
        if typed:
            con.mark()
        con.wait_for(until, timeout)
    if con.text and not con.text.endswith("\n"):
        con.out.write("\n")       # the prompt line, ended, so the shell's next prompt is clean


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="pyvm-console", description=__doc__.splitlines()[0],
        epilog="Without --type, --wake or --until, and with a terminal on stdin: interactive.")
    ap.add_argument("socket", help="the serial port's socket: PATH, unix:PATH or HOST:PORT")
    ap.add_argument("--type", action="append", default=[], metavar="LINE",
                    help="type LINE and Enter, then wait for the prompt (repeatable)")
    ap.add_argument("--wake", action="store_true",
                    help="first press Enter until a prompt appears (a guest still booting)")
    ap.add_argument("--until", metavar="REGEX", help="at the end, wait until REGEX is received")
    ap.add_argument("--prompt", metavar="REGEX", default=DEFAULT_PROMPT,
                    help=f"what the prompt looks like (default '{DEFAULT_PROMPT}')")
    ap.add_argument("--timeout", type=float, default=60.0,
                    help="seconds each wait (and the connection) may take (default 60)")
    ap.add_argument("--tls-creds", metavar="DIR",
                    help="speak TLS, with the client credentials in DIR (ca-cert.pem, "
                         "client-cert.pem, client-key.pem)")
    ap.add_argument("--tls-hostname", metavar="NAME",
                    help="the name the port's certificate must carry (default: HOST)")
    args = ap.parse_args(argv)
    try:
        prompt, until = re.compile(args.prompt), re.compile(args.until) if args.until else None
    except re.error as err:
        ap.error(f"bad regular expression: {err}")
    lines: Iterable[str] = args.type
    script = bool(args.type or args.wake or until)
    if not script and not sys.stdin.isatty():
        lines, script = (line.rstrip("\n") for line in sys.stdin), True
    pump: TlsPump | None = None
    try:
        sock = connect(args.socket, args.timeout)
        if args.tls_creds:
            family, address = _address(args.socket)
            if family == socket.AF_UNIX:
                sock.close()
                raise ConsoleError("TLS can only be used over TCP socket")
            assert isinstance(address, tuple)
            pump = start_tls(sock, args.tls_creds, args.tls_hostname or address[0],
                             args.timeout)
            sock = pump.plain
        with sock:
            if not script:
                return interactive(sock)
            scripted(Console(sock, Output()), lines, args.wake, until, prompt, args.timeout)
            return 0
    except ConsoleError as err:
        print(f"\npyvm-console: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if pump is not None:
            pump.join(2.0)          # the plain end is closed: close_notify, then the end
            if pump.alive:
                pump.stop()
                pump.join()


if __name__ == "__main__":
    sys.exit(main())
