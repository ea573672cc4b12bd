"""End to end: the real ``python -m pyvm`` driven over its monitors.

The guest is ``store-loop.elf`` with ``start=1 size=1``: pass n stores n to every word of
1-2 MiB, so the word at 0x100000 keeps growing while the guest runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import time
from typing import Any, Iterator

import pytest
from qemu.qmp import QMPClient

from qmp_helpers import COUNTER, RawClient, finish, start_pyvm, wait_for

# pyvm must run here: a broken build fails these tests rather than skipping them.


@pytest.fixture
def pyvm_unix(tmp_path: Any) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    path = os.path.join(str(tmp_path), "vm.sock")
    proc = start_pyvm("-qmp", f"unix:{path},server=on,wait=off", extra=("-S",))
    assert wait_for(lambda: os.path.exists(path) or proc.poll() is not None, 30)
    yield proc, path
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def counter(reply: str) -> int:
    return int(reply.split(":")[1].strip(), 16)


def test_qmp_client_drives_pyvm(pyvm_unix: tuple[subprocess.Popen[bytes], str]) -> None:
    proc, path = pyvm_unix
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"

    async def session() -> None:
        qmp: Any = QMPClient("e2e")
        await qmp.connect(path)
        hmp = "human-monitor-command"
        xp = {"command-line": f"xp /1xw {COUNTER:#x}"}
        assert (await qmp.execute("query-status"))["status"] == "prelaunch"
        before = counter(await qmp.execute(hmp, xp))
        await qmp.execute("cont")                       # cont from prelaunch starts the guest
        assert (await asyncio.wait_for(qmp.events.get(), 10))["event"] == "RESUME"
        assert (await qmp.execute("query-status"))["status"] == "running"
        deadline = time.monotonic() + 20
        while counter(await qmp.execute(hmp, xp)) in (before, 0):
            assert time.monotonic() < deadline, "the guest does not run"
            await asyncio.sleep(0.05)
        await qmp.execute("stop")
        assert (await asyncio.wait_for(qmp.events.get(), 10))["event"] == "STOP"
        frozen = counter(await qmp.execute(hmp, xp))
        await asyncio.sleep(0.2)
        assert counter(await qmp.execute(hmp, xp)) == frozen
        assert await qmp.execute("stop") == {}                # stop while paused: {}
        dump = os.path.join(os.path.dirname(path), "ram.bin")
        await qmp.execute("pmemsave", {"val": COUNTER, "size": 4096, "filename": dump})
        with open(dump, "rb") as f:
            assert int.from_bytes(f.read(4), "little") == frozen
        await qmp.execute("cont")
        assert await qmp.execute("cont") == {}                # cont while running: {}
        assert (await asyncio.wait_for(qmp.events.get(), 10))["event"] == "RESUME"
        assert (await qmp.execute("query-cpus-fast"))[0]["target"] == "x86_64"
        assert (await qmp.execute(hmp, {"command-line": "info status"})) == \
            "VM status: running\r\n"
        await qmp.execute("quit")
        event = await asyncio.wait_for(qmp.events.get(), 10)
        assert event["event"] == "SHUTDOWN" and event["data"]["reason"] == "host-qmp-quit"
        try:
            await qmp.disconnect()
        except EOFError:            # pyvm exited and closed the socket first (as QEMU does)
            pass

    asyncio.run(asyncio.wait_for(session(), 60))
    finish(proc)
    assert proc.returncode == 0
    assert not os.path.exists(path)


def test_qmp_stdio() -> None:
    proc = start_pyvm("-qmp", "stdio", stdin=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        greeting = json.loads(proc.stdout.readline())
        assert greeting["QMP"]["capabilities"] == []
        proc.stdin.write(b'{"execute": "qmp_capabilities"}\n{"execute": "query-kvm", "id": 1}\n')
        proc.stdin.flush()
        assert proc.stdout.readline() == b'{"return": {}}\r\n'
        assert proc.stdout.readline() == \
            b'{"return": {"enabled": false, "present": false}, "id": 1}\r\n'
        proc.stdin.write(b'{"execute": "quit"}\n')
        proc.stdin.flush()
        out, _ = finish(proc)
        lines = out.splitlines()
        assert lines[0] == b'{"return": {}}'
        assert any(b'"SHUTDOWN"' in line for line in lines)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_hmp_stdio() -> None:
    proc = start_pyvm("-monitor", "stdio", stdin=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdin is not None
        proc.stdin.write(b"info status\nquit\n")
        out, _ = finish(proc)
        text = out.decode()
        assert text.startswith("pyvm 0.1.0 monitor - type 'help' for more information\r\n")
        assert "VM status: " in text and "(qemu) " in text
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_tcp_and_long_form_monitors(tmp_path: Any) -> None:
    path = os.path.join(str(tmp_path), "long.sock")
    proc = start_pyvm("-qmp", "tcp:127.0.0.1:0,server=on,wait=off",
                      "-chardev", f"socket,id=m1,path={path},server=on,wait=off",
                      "-mon", "chardev=m1,mode=control")
    try:
        assert wait_for(lambda: os.path.exists(path) or proc.poll() is not None, 30)
        c = RawClient(path)
        c.negotiate()
        labels = {d["label"] for d in c.cmd("query-chardev")["return"]}
        assert {"compat_monitor0", "m1"} <= labels
        c.cmd("quit")
        finish(proc)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_bad_monitor_option_is_one_line() -> None:
    proc = start_pyvm("-qmp", "unix:/nonexistent-dir/x.sock,server=on,wait=off")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    lines = err.decode().strip().splitlines()
    assert lines == ["pyvm: -qmp unix:/nonexistent-dir/x.sock,server=on,wait=off: "
                     "Failed to bind socket to /nonexistent-dir/x.sock: "
                     "No such file or directory"]


def test_fuzz_real_pyvm_while_guest_runs(pyvm_unix: tuple[subprocess.Popen[bytes], str]) -> None:
    proc, path = pyvm_unix
    c = RawClient(path)
    c.negotiate()
    c.cmd("cont")
    rng = random.Random(1234)
    safe = ["query-status", "query-name", "query-uuid", "query-kvm", "query-commands",
            "query-version", "query-cpus-fast", "query-memdev", "query-chardev",
            "system_powerdown", "no-such-command", 17, None]
    junk = [b"{", b"}", b"[", b"]", b'"', b"'", b"\\", b":", b",", b"nul", b"-", b"1e",
            b"\xff", b"\xc3", b"\x00", b" ", b"\n", b"true", b"{'a'", b"\\u12"]
    xp = {"command-line": f"xp /1xw {COUNTER:#x}"}
    loaded = counter(c.cmd("human-monitor-command", xp)["return"])   # before pass 1
    assert wait_for(lambda: counter(c.cmd("human-monitor-command", xp)["return"])
                    not in (loaded, 0), 20)
    first = counter(c.cmd("human-monitor-command", xp)["return"])
    for round_ in range(200):
        for i in range(10):
            msg: dict[str, Any] = {"execute": rng.choice(safe), "id": [round_, i]}
            if rng.random() < 0.3:
                msg["arguments"] = {rng.choice(["x", "enable", "id"]): rng.choice(
                    [1, "s", None, [1], {"k": -1}, 1.5, 2 ** 64])}
            if rng.random() < 0.1:
                msg[rng.choice(["extra", "exec-oob", "arguments"])] = rng.choice([[], 1, "x"])
            c.send(json.dumps(msg) + "\n")
        for i in range(10):
            reply = c.reply()
            assert reply["id"] == [round_, i]
        c.send(b"".join(rng.choice(junk) for _ in range(rng.randint(1, 30))))
        c.send(b"\x01\n{'execute': 'query-status', 'id': 'sync'}\n")
        while (reply := c.reply()).get("id") != "sync":
            assert "error" in reply
        assert reply["return"]["status"] == "running"
    last = counter(c.cmd("human-monitor-command", xp)["return"])
    assert last > first, "the guest stopped making progress"
    assert c.cmd("query-status")["return"]["running"] is True
    c.cmd("quit")
    finish(proc)
    assert proc.returncode == 0
