"""A real pyvm process driven over QMP with QEMU's own client library (tests only)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from qemu.qmp.legacy import QEMUMonitorProtocol
from qemu.qmp.protocol import ConnectError

from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent


class VmProcess:
    """``pyvm ARGS -qmp unix:... -serial file:...`` with helpers for tests."""

    def __init__(self, tmp: Path, name: str, *args: str, serial: bool = True,
                 env: dict[str, str] | None = None, connect_timeout: float = 20,
                 launcher: Any = None, prefix: tuple[str, ...] = ()) -> None:
        self.tmp = tmp
        self.name = name
        self.sock = str(tmp / f"{name}.qmp")
        self.serial_path = tmp / f"{name}.serial"
        if os.path.exists(self.sock):
            os.unlink(self.sock)          # a stale socket of an earlier VM of that name
        cmd = [sys.executable, "-m", "pyvm", *args, "-qmp", f"unix:{self.sock},server=on,wait=off"]
        if serial:
            cmd += ["-serial", f"file:{self.serial_path}"]
        self.stderr_path = tmp / f"{name}.stderr"
        e = dict(os.environ)
        e.update(env or {})
        self._stderr = open(self.stderr_path, "wb")
        self.proc: Any
        if launcher is not None and not prefix:  # forked from a pre-imported pyvm (tests/torture/launcher.py)
            with open(os.devnull, "wb") as out:
                self.proc = launcher.spawn(cmd[3:], out.fileno(), self._stderr.fileno(), e, ROOT)
        else:
            # ``prefix``: a command that runs pyvm, e.g. ("ip", "netns", "exec", NAME)
            self.proc = subprocess.Popen([*prefix, *cmd], stdout=subprocess.DEVNULL,
                                         stderr=self._stderr, cwd=ROOT, env=e)
        try:
            self.qmp = self._connect(connect_timeout)
        except BaseException:
            # nobody gets this object to close: a VM that never answered must not outlive it
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
            self._stderr.close()
            raise

    def _connect(self, timeout: float) -> QEMUMonitorProtocol:
        def connected() -> QEMUMonitorProtocol | None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.stderr()}")
            if os.path.exists(self.sock):
                q = QEMUMonitorProtocol(self.sock)
                try:
                    q.connect()
                    return q
                except (OSError, ConnectError):
                    pass
            return None
        return wait_until(connected, timeout, f"{self.name}: QMP socket", interval=0.05)

    def cmd(self, name: str, **args: Any) -> Any:
        """Run a command; returns the 'return' value or raises AssertionError with the error."""
        resp = self.qmp.cmd_raw(name, args or None)
        if "error" in resp:
            raise QmpFailed(resp["error"]["desc"], resp["error"]["class"])
        return resp["return"]

    def hmp(self, line: str) -> str:
        return str(self.cmd("human-monitor-command", **{"command-line": line}))

    def status(self) -> str:
        return str(self.cmd("query-status")["status"])

    def wait_migration(self, states: tuple[str, ...] = ("completed", "failed", "cancelled"),
                       timeout: float = 60, poll: float = 0.05) -> dict[str, Any]:
        last: list[dict[str, Any]] = [{}]

        def reached() -> dict[str, Any] | None:
            last[0] = self.cmd("query-migrate")
            return last[0] if last[0].get("status") in states else None
        try:
            return wait_until(reached, timeout, f"{self.name}: migration in {states}", poll)
        except AssertionError:
            raise AssertionError(f"{self.name}: migration still {last[0]}") from None

    def wait_serial(self, text: str, timeout: float = 20, count: int = 1) -> str:
        """The serial output once it holds ``text`` at least ``count`` times."""
        try:
            return wait_until(lambda: (out := self.serial()).count(text) >= count and out,
                              timeout, f"{self.name}: {text!r} x{count}", 0.05)
        except AssertionError:
            raise AssertionError(f"{self.name}: {text!r} not {count} times in serial output "
                                 f"{self.serial()[-300:]!r}") from None

    def events_until(self, done: Callable[[list[dict[str, Any]]], bool],
                     timeout: float = 20) -> list[dict[str, Any]]:
        """QMP events as they arrive, until ``done(events so far)`` holds."""
        got: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while not done(got):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{self.name}: events so far {got}")
            try:
                event = self.qmp.pull_event(wait=remaining)
            except asyncio.TimeoutError:
                continue
            if event is not None:
                got.append(dict(event))
        return got

    def halted(self) -> bool:
        """Whether vCPU 0 sits in HLT (``info registers`` reports HLT=1)."""
        return "HLT=1" in self.hmp("info registers")

    def serial(self) -> str:
        try:
            return self.serial_path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_bytes().decode(errors="replace")

    def pmem(self, size: int, name: str = "ram.bin") -> bytes:
        path = self.tmp / f"{self.name}-{name}"
        self.cmd("pmemsave", val=0, size=size, filename=str(path))
        return path.read_bytes()

    def wait_exit(self, timeout: float = 20) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        try:
            self.qmp.close()
        except Exception:  # noqa: BLE001 - the VM may already be gone
            pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._stderr.close()


class QmpFailed(Exception):
    def __init__(self, desc: str, error_class: str) -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class
