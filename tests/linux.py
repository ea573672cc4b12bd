"""Debian's Linux + busybox guest for tests: fetched once (pyvm.linux_guest) and a
serial console to type on."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from pyvm import linux_guest

PROMPT: str = linux_guest.PROMPT
CMDLINE: str = linux_guest.CMDLINE
BOOT_TIMEOUT = 240.0          # seconds to the prompt on a loaded 2-core machine


def linux_files() -> tuple[Path, Path]:
    """(kernel, initrd), fetched through apt on first use; skips when apt cannot fetch."""
    try:
        return linux_guest.fetch(linux_guest.DEFAULT_DIR)
    except SystemExit as err:
        pytest.skip(f"Debian's kernel/busybox could not be fetched: {err}")
        raise


def linux_args(ram: str = "512M") -> list[str]:
    kernel, initrd = linux_files()
    return ["-m", ram, "-kernel", str(kernel), "-initrd", str(initrd), "-append", CMDLINE,
            "-display", "none"]


class SerialConsole:
    """The client end of ``-serial unix:PATH,server=on,wait=off``: read and type."""

    def __init__(self, path: Path, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.sock.settimeout(0.2)
        self.out = ""

    def _pump(self) -> None:
        try:
            data = self.sock.recv(65536)
        except (socket.timeout, BlockingIOError):
            return
        if not data:
            raise AssertionError(f"serial console closed; output so far: {self.out[-500:]!r}")
        self.out += data.decode(errors="replace")

    def expect(self, text: str, timeout: float, start: int = 0) -> int:
        """Wait for ``text`` at or after ``start`` in the output; returns the index after it."""
        deadline = time.monotonic() + timeout
        while True:
            i = self.out.find(text, start)
            if i >= 0:
                return i + len(text)
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not on the serial console within {timeout} s; "
                                     f"last output: {self.out[-800:]!r}")
            self._pump()

    def run(self, command: str, answer: str, timeout: float = 60) -> None:
        """Type ``command`` and wait for ``answer`` on a line of its own, then the prompt."""
        start = len(self.out)
        self.sock.sendall(command.encode() + b"\r")
        end = self.expect("\n" + answer + "\r\n", timeout, start)
        self.expect(PROMPT, timeout, end)

    def close(self) -> None:
        self.sock.close()
