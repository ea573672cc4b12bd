"""Fixtures for the monitor tests: a FakeVm, a running MonitorService, raw clients."""

from __future__ import annotations

import os
from typing import Any, Iterator

import pytest

from fake_vm import FakeVm
from pyvm.qmp.options import parse_monitor_options
from pyvm.qmp.server import MonitorService
from qmp_helpers import RawClient


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
