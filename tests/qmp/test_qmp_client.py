"""pyvm's monitor driven by QEMU's own client library: QMPClient and the legacy class."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

from fake_vm import FakeVm
from pyvm.qmp.server import MonitorService


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_async_client(service: MonitorService, sock_path: str, vm: FakeVm) -> None:
    async def session() -> None:
        qmp: Any = QMPClient("pyvm-test")
        await qmp.connect(sock_path)
        assert qmp.greeting is not None
        assert qmp.greeting.QMP.version["qemu"]["major"] == 8
        assert qmp.greeting.QMP.capabilities == []
        assert await qmp.execute("query-status") == \
            {"status": "running", "singlestep": False, "running": True}
        await qmp.execute("stop")
        event = await asyncio.wait_for(qmp.events.get(), 5)
        assert event["event"] == "STOP" and "seconds" in event["timestamp"]
        await qmp.execute("cont")
        assert (await asyncio.wait_for(qmp.events.get(), 5))["event"] == "RESUME"
        with pytest.raises(ExecuteError) as info:
            await qmp.execute("query-status", {"verbose": True})
        assert str(info.value) == "Parameter 'verbose' is unexpected"
        assert info.value.error_class == "GenericError"
        with pytest.raises(ExecuteError) as info:
            await qmp.execute("no-such-command")
        assert info.value.error_class == "CommandNotFound"
        version = await qmp.execute("query-version")
        assert version == {"qemu": {"major": 8, "minor": 2, "micro": 0},
                           "package": "pyvm 0.1.0"}
        schema = await qmp.execute("query-qmp-schema")
        assert {"query-status", "STOP"} <= {e["name"] for e in schema}
        text = await qmp.execute("human-monitor-command", {"command-line": "info status"})
        assert text == "VM status: running\r\n"
        # Concurrent requests on one connection come back matched by id.
        results = await asyncio.gather(*(qmp.execute("query-uuid") for _ in range(50)))
        assert all(r == {"UUID": vm.uuid} for r in results)
        await qmp.disconnect()

    run(session())


def test_reconnect_with_async_client(service: MonitorService, sock_path: str) -> None:
    async def session() -> None:
        qmp: Any = QMPClient("again")
        for _ in range(5):
            await qmp.connect(sock_path)
            assert (await qmp.execute("query-kvm")) == {"enabled": False, "present": False}
            await qmp.disconnect()

    run(session())


def test_legacy_sync_client(service: MonitorService, sock_path: str, vm: FakeVm) -> None:
    qmp = QEMUMonitorProtocol(sock_path)
    greeting = qmp.connect(negotiate=True)
    assert greeting is not None and greeting["QMP"]["version"]["package"] == "pyvm 0.1.0"
    status: Any = qmp.cmd("query-status")
    assert status["status"] == "running"
    assert qmp.cmd("stop") == {}
    event = qmp.pull_event(wait=5.0)
    assert event is not None and event["event"] == "STOP"
    raw = qmp.cmd_raw("stop")
    assert raw == {"return": {}}
    assert qmp.cmd_raw("cont", {"now": True}) == {
        "error": {"class": "GenericError", "desc": "Parameter 'now' is unexpected"}}
    assert qmp.cmd_obj({"execute": "query-name", "id": "mine"}) == {"return": {}, "id": "mine"}
    qmp.cmd("cont")
    events = qmp.get_events(wait=5.0)
    assert [e["event"] for e in events] == ["RESUME"]
    qmp.close()


def test_legacy_quit(service: MonitorService, sock_path: str, vm: FakeVm) -> None:
    qmp = QEMUMonitorProtocol(sock_path)
    qmp.connect()
    assert qmp.cmd("quit") == {}
    assert vm.quit_called.wait(5)
    event = qmp.pull_event(wait=5.0)
    assert event is not None and event["event"] == "SHUTDOWN"
    qmp.close()
