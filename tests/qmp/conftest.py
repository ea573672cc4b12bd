"""Fixtures for the monitor tests: a FakeVm, a running MonitorService, raw clients."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Any, Iterator

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from fake_vm import FakeVm  # noqa: E402
from pyvm.qmp.options import parse_monitor_options  # noqa: E402
from pyvm.qmp.server import MonitorService  # noqa: E402


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
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


@pytest.fixture
def vm() -> Iterator[FakeVm]:
    fake = FakeVm()
    fake.start_guest()
    yield fake
    fake.stop_guest()


@pytest.fixture
def sock_path(tmp_path: Any) -> str:
    # AF_UNIX paths are limited to ~108 bytes: keep it short.
    return os.path.join(str(tmp_path), "q.sock")


@pytest.fixture
def service(vm: FakeVm, sock_path: str) -> Iterator[MonitorService]:
    specs = parse_monitor_options([f"unix:{sock_path},server=on,wait=off"], [], [], [])
    svc = MonitorService(vm, specs)
    svc.start()
    yield svc
    svc.close()


@pytest.fixture
def client(service: MonitorService, sock_path: str) -> Iterator[RawClient]:
    c = RawClient(sock_path)
    c.negotiate()
    yield c
    c.close()
