"""The incoming migration's thread: every failure ends in a reported state, and its owner
stops and joins it.

A real :class:`IncomingMigration` and :class:`MigrationManager` over a minimal machine;
the channels are real objects (a listening socket, a channel that breaks mid-stream).
"""

from __future__ import annotations

import struct
import threading
from typing import Any

import pytest

from pyvm.events import EventBus
from pyvm.migration.control.incoming import IncomingMigration
from pyvm.migration.control.manager import MigrationManager
from pyvm.migration.control.status import MigrationStatus
from pyvm.migration.stream.constants import QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION
from pyvm.migration.transports import Listener

JOIN = 10.0


class MiniMachine:
    """What the destination side touches before the first section arrives."""

    machine_type = "pc-i440fx-8.2"

    def __init__(self) -> None:
        self.events = EventBus()
        self.exit_codes: list[int] = []
        self.exited = threading.Event()

    def migratable(self) -> list[Any]:
        return []

    def request_exit(self, code: int, reason: str | None = None) -> None:
        self.exit_codes.append(code)
        self.exited.set()


class BreakingChannel:
    """Gives the stream header, then fails the way no transport is expected to."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.reads = 0
        self.closed = False

    def readinto(self, buf: Any) -> int:
        self.reads += 1
        if self.reads == 1:
            header = struct.pack(">II", QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION)
            memoryview(buf)[:len(header)] = header
            return len(header)
        raise self.error

    def read(self, n: int) -> bytes:
        raise AssertionError("the loader reads with readinto")

    def shutdown(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def _statuses(mgr: MigrationManager) -> list[MigrationStatus]:
    seen: list[MigrationStatus] = []
    mgr.on_status.append(seen.append)
    return seen


@pytest.mark.parametrize("exit_on_error", [True, False])
def test_unexpected_exception_ends_in_failed_with_error_desc(
        exit_on_error: bool, capsys: pytest.CaptureFixture[str]) -> None:
    machine = MiniMachine()
    mgr = MigrationManager(machine)  # type: ignore[arg-type]
    seen = _statuses(mgr)
    channel = BreakingChannel(KeyError("no such thing"))
    inc = IncomingMigration(mgr, machine, lambda: channel,  # type: ignore[arg-type]
                            exit_on_error=exit_on_error)
    mgr.incoming = inc
    inc.start()
    inc.join(JOIN)
    assert not inc.thread.is_alive()
    assert seen == [MigrationStatus.ACTIVE, MigrationStatus.FAILED]
    info = mgr.query()
    assert info["status"] == "failed"
    assert info["error-desc"] == "KeyError: 'no such thing'"
    assert channel.closed
    assert machine.exit_codes == ([1] if exit_on_error else [])
    err = capsys.readouterr().err
    assert "internal error while loading the migration stream: KeyError" in err
    assert "load of migration failed" in err and "Traceback" not in err


def test_failure_while_opening_is_reported_too() -> None:
    machine = MiniMachine()
    mgr = MigrationManager(machine)  # type: ignore[arg-type]

    def opener() -> Any:
        raise ZeroDivisionError("division by zero")
    inc = IncomingMigration(mgr, machine, opener, exit_on_error=True)  # type: ignore[arg-type]
    mgr.incoming = inc
    inc.start()
    assert machine.exited.wait(JOIN)
    inc.join(JOIN)
    assert mgr.query()["status"] == "failed"
    assert mgr.query()["error-desc"] == "ZeroDivisionError: division by zero"
    assert machine.exit_codes == [1]


def test_shutdown_stops_and_joins_a_thread_waiting_for_its_peer() -> None:
    machine = MiniMachine()
    mgr = MigrationManager(machine)  # type: ignore[arg-type]
    listener = Listener.inet("127.0.0.1", 0)
    waiting = threading.Event()

    def accept() -> Any:
        waiting.set()
        return listener.accept()
    inc = IncomingMigration(mgr, machine, accept, on_close=listener.close)  # type: ignore[arg-type]
    mgr.incoming = inc
    inc.start()
    assert waiting.wait(JOIN)
    mgr.shutdown(timeout=JOIN)
    assert not inc.thread.is_alive()
    assert machine.exit_codes == []          # closing the VM is not a migration failure
