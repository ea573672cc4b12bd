"""Helpers of the monitor tests: a raw line client, polling, and real pyvm processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from typing import Any

import pytest

from tests.waiting import wait_until


def has_invalid_text(text: str) -> bool:
    """True when ``text`` holds a surrogate or one of Unicode's 66 noncharacters
    (U+FDD0..U+FDEF, U+xxFFFE, U+xxFFFF): QEMU's JSON parser rejects such a string and its
    writer prints U+FFFD instead (util/unicode.c)."""
    return any(0xD800 <= cp <= 0xDFFF or 0xFDD0 <= cp <= 0xFDEF or cp & 0xFFFE == 0xFFFE
               for cp in map(ord, text))


class RawClient:
    """A plain socket speaking QMP line by line (no client library in the way)."""

    def __init__(self, address: Any, family: int = socket.AF_UNIX) -> None:
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(address)
        self.buf = b""
        self.events: list[dict[str, Any]] = []

    def raw_line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("monitor closed the connection")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def line(self) -> dict[str, Any]:
        return json.loads(self.raw_line())

    def send(self, data: bytes | str | dict[str, Any]) -> None:
        if isinstance(data, dict):
            data = json.dumps(data)
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def reply(self) -> dict[str, Any]:
        """The next non-event message; events seen on the way are kept in .events."""
        while True:
            msg = self.line()
            if "event" in msg:
                self.events.append(msg)
                continue
            return msg

    def cmd(self, name: str, args: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        req: dict[str, Any] = {"execute": name}
        if args is not None:
            req["arguments"] = args
        req.update(extra)
        self.send(req)
        return self.reply()

    def negotiate(self) -> dict[str, Any]:
        greeting = self.line()
        assert self.cmd("qmp_capabilities") == {"return": {}}
        return greeting

    def close(self) -> None:
        self.sock.close()


def wait_for(predicate: Any, timeout: float = 5.0) -> bool:
    """Whether ``predicate()`` came true within ``timeout`` s (polled every 5 ms)."""
    try:
        wait_until(predicate, timeout, interval=0.005)
        return True
    except AssertionError:
        return bool(predicate())


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GUEST = os.path.join(ROOT, "pyvm", "guests", "store-loop.elf")
COUNTER = 0x100000


def pyvm_runs() -> bool:
    try:
        out = subprocess.run([sys.executable, "-m", "pyvm", "-version"], cwd=ROOT,
                             capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and os.path.exists(GUEST)



def start_pyvm(*monitor_args: str, stdin: Any = subprocess.DEVNULL,
               extra: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-X", "faulthandler", "-m", "pyvm", "-display", "none", "-m", "32",
           "-kernel", GUEST,
           "-append", "start=1 size=1", *extra, *monitor_args]
    return subprocess.Popen(cmd, cwd=ROOT, stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen[bytes], timeout: float = 30) -> tuple[bytes, bytes]:
    """Wait for pyvm to exit; on a hang, have it dump its threads and fail with that."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        _, err = proc.communicate()
        pytest.fail("pyvm did not exit:\n" + err.decode(errors="replace")[-8000:])
