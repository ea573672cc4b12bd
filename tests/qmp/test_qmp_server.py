"""The monitor service over real sockets, driven by raw clients."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from typing import Any

import pytest

from qmp_helpers import RawClient, wait_for
from fake_vm import FakeVm
from pyvm.errors import ConfigError
from pyvm.qmp.json_stream import JsonLimits
from pyvm.qmp.options import parse_monitor_options
from pyvm.qmp.core import build_tables
from pyvm.qmp.server import MonitorService
from pyvm.runstate import RunState


def test_greeting_and_crlf(service: MonitorService, sock_path: str) -> None:
    c = RawClient(sock_path)
    assert c.raw_line() == (b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, '
                            b'"major": 8}, "package": "pyvm 0.1.0"}, "capabilities": []}}\r\n')
    c.send(b'{"execute": "qmp_capabilities"}')
    assert c.raw_line() == b'{"return": {}}\r\n'
    c.send(b'{"execute": "query-version", "id": 1}')
    assert c.raw_line() == (b'{"return": {"qemu": {"micro": 0, "minor": 2, "major": 8}, '
                            b'"package": "pyvm 0.1.0"}, "id": 1}\r\n')


def test_socket_mode_0600_and_removed_at_close(vm: FakeVm, tmp_path: Any) -> None:
    path = os.path.join(str(tmp_path), "m.sock")
    old = os.umask(0)
    try:
        svc = MonitorService(vm, parse_monitor_options([f"unix:{path},server=on,wait=off"],
                                                       [], [], []))
        svc.start()
    finally:
        os.umask(old)
    mode = os.stat(path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    svc.close()
    assert not os.path.exists(path)


def test_stale_socket_replaced_but_regular_file_kept(vm: FakeVm, tmp_path: Any) -> None:
    path = os.path.join(str(tmp_path), "s.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()
    svc = MonitorService(vm, parse_monitor_options([f"unix:{path},server=on"], [], [], []))
    svc.start()
    RawClient(path).line()
    svc.close()
    other = os.path.join(str(tmp_path), "file")
    open(other, "w").close()
    svc = MonitorService(vm, parse_monitor_options([f"unix:{other},server=on"], [], [], []))
    with pytest.raises(ConfigError, match="Failed to bind socket to .*file: File exists"):
        svc.start()
    assert os.path.isfile(other)


def test_tcp_defaults_to_loopback(vm: FakeVm) -> None:
    specs = parse_monitor_options(["tcp::0,server=on,wait=off"], [], [], [])
    svc = MonitorService(vm, specs)
    svc.start()
    try:
        host, port = svc.addresses["compat_monitor0"]
        assert host == "127.0.0.1" and port > 0
        c = RawClient((host, port), socket.AF_INET)
        c.negotiate()
        assert c.cmd("query-status")["return"]["running"] is True
    finally:
        svc.close()


def test_split_and_concatenated_requests(client: RawClient) -> None:
    msg = b'{"execute": "query-name", "id": "split"}'
    for byte in msg:
        client.send(bytes([byte]))
        time.sleep(0.001)
    assert client.reply() == {"return": {}, "id": "split"}
    client.send(b'{"execute": "query-kvm", "id": 1}{"execute": "query-uuid", "id": 2}\n'
                b'{"execute": "query-name", "id": 3}')
    assert [client.reply()["id"] for _ in range(3)] == [1, 2, 3]


def test_parse_errors_and_recovery(client: RawClient) -> None:
    client.send(b'{"execute": query-status}\n{"execute": "query-kvm", "id": 9}')
    assert client.reply() == {"error": {"class": "GenericError",
                                        "desc": "JSON parse error, stray '-s'"}}
    assert client.reply() == {"error": {"class": "GenericError",
                                        "desc": "JSON parse error, expecting value"}}
    assert client.reply()["id"] == 9


def test_size_cap_keeps_connection_usable(vm: FakeVm, sock_path: str) -> None:
    specs = parse_monitor_options([f"unix:{sock_path},server=on"], [], [], [])
    svc = MonitorService(vm, specs, limits=JsonLimits(max_message_bytes=64 << 10))
    svc.start()
    try:
        c = RawClient(sock_path)
        c.negotiate()
        c.send(b'{"execute": "query-status", "arguments": {"x": "' + b"A" * (1 << 20) + b'"}}\n')
        c.send(b'{"execute": "query-status", "id": "after"}\n')
        first = c.reply()
        assert first == {"error": {"class": "GenericError",
                                   "desc": "JSON token size limit exceeded"}}
        while True:
            msg = c.reply()
            if msg.get("id") == "after":
                assert msg["return"]["status"] == "running"
                break
            assert "error" in msg and "id" not in msg
    finally:
        svc.close()


def test_default_cap_with_huge_message(client: RawClient) -> None:
    client.send(b'{"execute": "query-status", "arguments": {"x": "'
                + b"B" * ((8 << 20) + 100) + b'"}}\n')
    assert client.reply()["error"]["desc"] == "JSON token size limit exceeded"
    client.send(b'\n{"execute": "query-status", "id": 1}\n')
    while (msg := client.reply()).get("id") != 1:
        pass
    assert msg["return"]["running"] is True


def test_events_only_after_negotiation_with_timestamps(service: MonitorService,
                                                       sock_path: str, vm: FakeVm) -> None:
    early = RawClient(sock_path)
    early.line()
    late = RawClient(sock_path)
    late.negotiate()
    before = time.time()
    assert late.cmd("stop", id="s") == {"return": {}, "id": "s"}
    [stop] = late.events
    assert stop["event"] == "STOP" and "data" not in stop
    ts = stop["timestamp"]
    assert set(ts) == {"seconds", "microseconds"} and 0 <= ts["microseconds"] < 1_000_000
    assert abs(ts["seconds"] + ts["microseconds"] / 1e6 - before) < 5
    late.cmd("cont")
    assert [e["event"] for e in late.events] == ["STOP", "RESUME"]
    vm.events.emit("RESET", {"reason": "host-qmp-system-reset", "guest": False})
    raw = late.raw_line()
    assert raw.startswith(b'{"timestamp": {"seconds": ')
    assert raw.endswith(b'"event": "RESET", "data": {"guest": false, '
                        b'"reason": "host-qmp-system-reset"}}\r\n')
    early.send(b'{"execute": "qmp_capabilities", "id": "e"}')
    assert early.line() == {"return": {}, "id": "e"}     # no event queued before it


def test_several_clients_and_reconnect(service: MonitorService, sock_path: str) -> None:
    clients = [RawClient(sock_path) for _ in range(5)]
    for c in clients:
        c.negotiate()
    clients[0].cmd("stop")
    for c in clients[1:]:
        assert c.line()["event"] == "STOP"
    for c in clients:
        c.close()
    for _ in range(20):
        c = RawClient(sock_path)
        c.negotiate()
        assert c.cmd("query-status")["return"]["status"] == "paused"
        c.close()


def test_several_monitors(vm: FakeVm, tmp_path: Any) -> None:
    a, b = os.path.join(str(tmp_path), "a"), os.path.join(str(tmp_path), "b")
    specs = parse_monitor_options([f"unix:{a},server=on"], [],
                                  [f"socket,id=mon1,path={b},server=on,wait=off"],
                                  ["chardev=mon1,mode=control,pretty=on"])
    svc = MonitorService(vm, specs)
    svc.start()
    try:
        ca, cb = RawClient(a), RawClient(b)
        ca.negotiate()
        def pretty_message() -> bytes:
            text = cb.raw_line()
            while not text.endswith(b"\n}\r\n"):
                text += cb.raw_line()
            return text

        greeting = pretty_message()
        assert greeting.startswith(b'{\r\n    "QMP": {\r\n        "version": {\r\n')
        assert json.loads(greeting)["QMP"]["capabilities"] == []
        cb.send(b'{"execute": "qmp_capabilities"}')
        assert pretty_message() == b'{\r\n    "return": {\r\n    }\r\n}\r\n'
        labels = {d["label"] for d in ca.cmd("query-chardev")["return"]}
        assert labels == {"serial0", "compat_monitor0", "mon1"}
    finally:
        svc.close()


def test_replies_in_order_and_guest_keeps_running(vm: FakeVm, sock_path: str) -> None:
    gate = threading.Event()
    tables = build_tables()
    table = tables.qmp

    def slow(ctx: Any, args: Any) -> dict[str, Any]:
        gate.wait(5)
        return {"slow": True}
    table.register("x-slow", None, "any", slow)
    specs = parse_monitor_options([f"unix:{sock_path},server=on"], [], [], [])
    svc = MonitorService(vm, specs, tables)
    svc.start()
    try:
        a, b = RawClient(sock_path), RawClient(sock_path)
        a.negotiate()
        b.negotiate()
        a.send(b'{"execute": "x-slow", "id": 1}{"execute": "query-status", "id": 2}')
        ticks = vm.ticks
        # Another connection is served while the slow command runs; the guest runs on.
        assert b.cmd("query-status", id="b")["return"]["running"] is True
        assert wait_for(lambda: vm.ticks > ticks + 20)
        gate.set()
        assert a.reply() == {"return": {"slow": True}, "id": 1}
        assert a.reply()["id"] == 2
    finally:
        gate.set()
        svc.close()


def test_quit_replies_then_quits(client: RawClient, vm: FakeVm) -> None:
    assert client.cmd("quit", id="q") == {"return": {}, "id": "q"}
    assert vm.quit_called.wait(5)
    shutdown = client.line()
    assert shutdown["event"] == "SHUTDOWN"
    assert shutdown["data"] == {"guest": False, "reason": "host-qmp-quit"}


def test_commands_reach_the_vm(client: RawClient, vm: FakeVm) -> None:
    assert client.cmd("system_reset") == {"return": {}}
    assert client.cmd("system_powerdown") == {"return": {}}
    assert [e["event"] for e in client.events] == ["RESET", "POWERDOWN"]
    assert vm.calls == ["system_reset", "system_powerdown"]
    assert client.cmd("query-cpus-fast")["return"][1] == {
        "cpu-index": 1, "qom-path": "/machine/unattached/device[1]", "thread-id": 4243,
        "props": {"core-id": 0, "thread-id": 0, "socket-id": 1}, "target": "x86_64"}
    assert client.cmd("query-memdev")["return"][0]["size"] == len(vm.ram)
    assert client.cmd("query-uuid") == {"return": {"UUID": "00000000-0000-0000-0000-000000000000"}}
    vm.name = "guest1"
    assert client.cmd("query-name") == {"return": {"name": "guest1"}}


def test_pmemsave_and_memsave(client: RawClient, vm: FakeVm, tmp_path: Any) -> None:
    from fake_vm import VIRT_OFFSET
    out = os.path.join(str(tmp_path), "p.bin")
    assert client.cmd("pmemsave", {"val": 0x100, "size": 0x3000, "filename": out}) == \
        {"return": {}}
    assert open(out, "rb").read() == bytes(vm.ram[0x100:0x3100])
    tail = os.path.join(str(tmp_path), "t.bin")
    client.cmd("pmemsave", {"val": len(vm.ram) - 16, "size": 32, "filename": tail})
    assert open(tail, "rb").read() == bytes(vm.ram[-16:]) + bytes(16)
    virt = os.path.join(str(tmp_path), "v.bin")
    # 'val' is an int64: a canonical high address is passed as a negative number.
    assert client.cmd("memsave", {"val": VIRT_OFFSET + 0x200, "size": 1, "filename": virt}) == {
        "error": {"class": "GenericError",
                  "desc": "Invalid parameter type for 'val', expected: integer"}}
    assert client.cmd("memsave", {"val": VIRT_OFFSET + 0x200 - (1 << 64), "size": 100,
                                  "filename": virt, "cpu-index": 1}) == {"return": {}}
    assert open(virt, "rb").read() == bytes(vm.ram[0x200:0x264])
    assert client.cmd("memsave", {"val": 0, "size": 16, "filename": virt, "cpu-index": 7}) == {
        "error": {"class": "GenericError", "desc": "Parameter 'cpu-index' expects a CPU number"}}
    assert client.cmd("memsave", {"val": 0x10, "size": 16, "filename": virt}) == {
        "error": {"class": "GenericError",
                  "desc": "Invalid addr 0x0000000000000010/size 16 specified"}}
    assert client.cmd("pmemsave", {"val": 0, "size": 1, "filename": "/nonexistent/dir/f"}) == {
        "error": {"class": "GenericError",
                  "desc": "Could not open '/nonexistent/dir/f': No such file or directory"}}
    assert client.cmd("pmemsave", {"val": 0, "size": "1", "filename": out})["error"]["desc"] == \
        "Invalid parameter type for 'size', expected: integer"


def test_slow_reader_is_dropped_not_the_vm(vm: FakeVm, sock_path: str,
                                            monkeypatch: Any) -> None:
    import pyvm.qmp.connections as connections
    monkeypatch.setattr(connections, "MAX_OUTPUT_BUFFER", 256 << 10)
    specs = parse_monitor_options([f"unix:{sock_path},server=on"], [], [], [])
    svc = MonitorService(vm, specs)
    svc.start()
    try:
        lazy = RawClient(sock_path)
        lazy.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        lazy.negotiate()
        big = json.dumps({"execute": "query-qmp-schema"}).encode() * 400
        lazy.send(big)                      # ~400 large replies that are never read
        assert wait_for(lambda: len(svc.connections) == 0, 10)   # the lazy one is dropped
        good = RawClient(sock_path)
        good.negotiate()
        assert good.cmd("query-status")["return"]["running"] is True
        assert vm.runstate.state is RunState.RUNNING
    finally:
        svc.close()


def test_unencodable_result_is_an_error_reply(vm: FakeVm, sock_path: str) -> None:
    tables = build_tables()
    table = tables.qmp
    table.register("x-bad", None, "any", lambda ctx, args: {"a": object()})
    specs = parse_monitor_options([f"unix:{sock_path},server=on"], [], [], [])
    svc = MonitorService(vm, specs, tables)
    svc.start()
    try:
        c = RawClient(sock_path)
        c.negotiate()
        reply = c.cmd("x-bad", id=4)
        assert reply["id"] == 4
        assert reply["error"]["desc"].startswith("internal error: the reply cannot be encoded")
        assert c.cmd("query-status")["return"]["running"] is True
    finally:
        svc.close()


def test_held_service_greets_but_runs_nothing_until_released(vm: FakeVm,
                                                              sock_path: str) -> None:
    specs = parse_monitor_options([f"unix:{sock_path},server=on"], [], [], [])
    svc = MonitorService(vm, specs, hold=True)
    svc.start()
    try:
        c = RawClient(sock_path)
        assert "QMP" in c.line()
        c.send(b'{"execute": "qmp_capabilities"}{"execute": "stop", "id": 1}')
        c.sock.settimeout(0.3)
        with pytest.raises(socket.timeout):
            c.raw_line()
        assert vm.calls == []
        c.sock.settimeout(10)
        svc.release()
        assert c.line() == {"return": {}}
        assert c.reply() == {"return": {}, "id": 1}
        assert vm.calls == ["stop"]
    finally:
        svc.close()
