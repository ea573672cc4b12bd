"""Regression: connecting to a unix listener whose backlog is full retried with a poll for
POLLOUT, which an unconnected unix socket reports at once; the connecting thread (a
``migrate`` to ``unix:``) spun at full CPU until the listener accepted or it was aborted.
It now waits out each retry period, or less if aborted."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

from pyvm.migration.transports import AbortSignal
from pyvm.migration.transports.socket_transport import UNIX_RETRY_SECONDS, connect_unix
from tests.full_backlog import full_unix_listener
from tests.waiting import wait_until

RETRIES_OBSERVED = 10                 # the window spans this many retry periods


def _thread_cpu_seconds(thread: threading.Thread) -> float:
    """utime + stime of ``thread`` (/proc/self/task/<tid>/stat fields 14 and 15)."""
    fields = Path(f"/proc/self/task/{thread.native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_connecting_thread_sleeps_while_the_backlog_is_full(tmp_path: Path, monkeypatch) -> None:
    path = str(tmp_path / "full.sock")
    full, queued = full_unix_listener(path)
    abort = AbortSignal()
    attempts = [0]
    outcome: list[BaseException] = []
    real_connect_ex = socket.socket.connect_ex

    def counting_connect_ex(self: socket.socket, address: object) -> int:
        if address == path.encode() or address == path:
            attempts[0] += 1
        return real_connect_ex(self, address)

    def connect() -> None:
        try:
            connect_unix(path, abort=abort)
        except BaseException as err:  # noqa: B902 - handed to the test
            outcome.append(err)
    monkeypatch.setattr(socket.socket, "connect_ex", counting_connect_ex)
    thread = threading.Thread(target=connect)
    try:
        thread.start()
        wait_until(lambda: attempts[0] >= 2, 10, "a retried connect")
        cpu_before, started, attempts_before = _thread_cpu_seconds(thread), time.monotonic(), attempts[0]
        wait_until(lambda: attempts[0] >= attempts_before + RETRIES_OBSERVED, 30,
                   f"{RETRIES_OBSERVED} more retries")
        window = time.monotonic() - started
        cpu = _thread_cpu_seconds(thread) - cpu_before
        assert thread.is_alive() and not outcome
        # a spinning loop makes thousands of attempts and burns most of the window
        assert attempts[0] - attempts_before <= 2 * window / UNIX_RETRY_SECONDS + 2, attempts
        assert cpu < 0.25 * window + 0.05, (cpu, window)
    finally:
        abort.trigger()
        thread.join(10)
        abort.close()
        for sock in queued:
            sock.close()
        full.close()
    assert len(outcome) == 1 and "Operation canceled" in str(outcome[0])
