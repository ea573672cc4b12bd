"""Hardening, end to end: streams that cannot load half-right, cancel that always cancels,
a monitor with limits, and files holding guest state created 0600."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import guest
from tests.waiting import wait_stalled, wait_until
from tests.stream_mutations import flip, page_data_offsets, split_stream
from tests.vmproc import VmProcess

RAM = 32 << 20
MEMCHECK = ["-m", "32M", "-kernel", guest("memcheck.elf"), "-append", "start=1 size=4",
            "-display", "none"]
# 16 MiB of guest data: more than every buffer between pyvm and a peer that never reads
MEMCHECK_BIG = ["-m", "32M", "-kernel", guest("memcheck.elf"), "-append", "start=1 size=16",
                "-display", "none"]
CANCEL_BOUND = 1.0          # seconds from migrate_cancel to 'cancelled'


def _checksum(vm: VmProcess, on: bool = True) -> None:
    vm.cmd("migrate-set-capabilities", capabilities=[{"capability": "x-checksum", "state": on}])


def _save(vms, path: Path, checksum: bool = False) -> VmProcess:
    src = vms("src", *MEMCHECK)
    src.wait_serial("memcheck gen 1 ok")
    if checksum:
        _checksum(src)
    src.cmd("migrate", uri=f"file:{path}")
    assert src.wait_migration()["status"] == "completed"
    return src


def _load(vms, name: str, path: Path, checksum: bool = False) -> tuple[VmProcess, dict]:
    dst = vms(name, *MEMCHECK, "-incoming", "defer")
    if checksum:
        _checksum(dst)
    dst.cmd("migrate-incoming", uri=f"file:{path}", **{"exit-on-error": False})
    return dst, dst.wait_migration(("completed", "failed"))


def _progresses(vm: VmProcess) -> None:
    n = vm.serial().count(" ok")
    deadline = time.monotonic() + 15
    while vm.serial().count(" ok") <= n:
        assert time.monotonic() < deadline, vm.serial()[-300:]
        time.sleep(0.1)
    assert "FAIL" not in vm.serial()


# -- streams that cannot load half-right -----------------------------------------------------

def test_checksummed_stream_restores_and_analyzes(vms, tmp_path: Path) -> None:
    state = tmp_path / "sum.state"
    _save(vms, state, checksum=True)
    split = split_stream(state.read_bytes())
    assert sum(1 for s in split.sections if s.idstr == "ram") > 4      # one per page batch
    dst, info = _load(vms, "dst", state, checksum=True)
    assert info["status"] == "completed", info
    assert dst.status() == "running"
    _progresses(dst)
    r = subprocess.run([sys.executable, "-m", "pyvm.analyze", "-f", str(state)],
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert b'"cpu (' in r.stdout and b'"globalstate (' in r.stdout


@pytest.mark.parametrize("edit", ["drop cpu", "drop globalstate", "duplicate serial"])
def test_incomplete_stream_fails_naming_the_device(vms, tmp_path: Path, edit: str) -> None:
    state = tmp_path / "vm.state"
    _save(vms, state)
    split = split_stream(state.read_bytes())
    action, idstr = edit.split()
    index = next(i for i, s in enumerate(split.sections) if s.opens and s.idstr == idstr)
    bad = tmp_path / "bad.state"
    bad.write_bytes(split.without(index) if action == "drop" else split.duplicated(index))
    dst, info = _load(vms, "dst", bad)
    assert info["status"] == "failed", info
    assert f"'{idstr}' instance 0" in info["error-desc"]
    assert dst.status() == "inmigrate"                       # never reported running
    assert "Traceback" not in dst.stderr()


def test_checksum_refuses_a_flipped_page_bit(vms, tmp_path: Path) -> None:
    state = tmp_path / "sum.state"
    _save(vms, state, checksum=True)
    data = state.read_bytes()
    split = split_stream(data)
    # page data, which alone no other check covers
    pages = page_data_offsets(split)
    assert len(pages) > 100
    bad = tmp_path / "bad.state"
    bad.write_bytes(flip(data, pages[len(pages) // 2] + 1234, 3))
    dst, info = _load(vms, "dst", bad, checksum=True)
    assert info["status"] == "failed"
    assert "Checksum mismatch in section" in info["error-desc"]
    assert dst.status() == "inmigrate"


def test_stream_without_checksums_refused_when_asked_for(vms, tmp_path: Path) -> None:
    state = tmp_path / "vm.state"
    _save(vms, state)
    _, info = _load(vms, "dst", state, checksum=True)
    assert info["status"] == "failed"
    assert "Capability x-checksum is on, but received capability is off" in info["error-desc"]


# -- cancel that always cancels --------------------------------------------------------------

def _cancel_within_bound(src: VmProcess) -> float:
    start = time.monotonic()
    src.cmd("migrate_cancel")
    info = src.wait_migration(("cancelled", "failed", "completed"), timeout=10, poll=0.01)
    elapsed = time.monotonic() - start
    assert info["status"] == "cancelled", info
    assert elapsed < CANCEL_BOUND, f"cancel took {elapsed:.2f}s"
    return elapsed


def _then_migrates(src: VmProcess, tmp_path: Path) -> None:
    assert src.status() == "running"
    src.cmd("migrate", uri=f"file:{tmp_path / 'after.state'}")
    assert src.wait_migration()["status"] == "completed"


def test_cancel_of_a_migration_into_a_fifo_nobody_reads(vms, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    src = vms("src", *MEMCHECK)
    src.cmd("migrate", uri=f"file:{fifo}")
    # the migration thread waits for a reader: nothing is ever sent, the status stays setup
    wait_stalled(lambda: src.cmd("query-migrate")["status"], what="a migration waiting for a reader",
                 interval=0.3)
    assert src.cmd("query-migrate")["status"] == "setup"
    _cancel_within_bound(src)
    _progresses(src)
    _then_migrates(src, tmp_path)


class _Sink:
    """A peer that accepts a connection (or opens a FIFO) and never reads from it."""

    def __init__(self, kind: str, tmp: Path) -> None:
        self.kind = kind
        self.keep: list[object] = []
        if kind == "tcp":
            self.lsock = socket.create_server(("127.0.0.1", 0))
            self.uri = f"tcp:127.0.0.1:{self.lsock.getsockname()[1]}"
        elif kind == "unix":
            path = str(tmp / "sink.sock")
            self.lsock = socket.socket(socket.AF_UNIX)
            self.lsock.bind(path)
            self.lsock.listen()
            self.uri = f"unix:{path}"
        elif kind == "fifo":
            path = tmp / "sink.fifo"
            os.mkfifo(path)
            self.keep.append(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
            self.uri = f"file:{path}"
        else:                                         # a command that never reads its input
            self.uri = "exec:sleep 60"
        if kind in ("tcp", "unix"):
            # a small receive buffer (inherited by the accepted socket): writes block sooner
            self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            self.lsock.settimeout(10)
            threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        try:
            conn, _ = self.lsock.accept()
            self.keep.append(conn)
        except OSError:
            pass

    def close(self) -> None:
        for k in self.keep:
            if isinstance(k, int):
                os.close(k)
            else:
                k.close()  # type: ignore[attr-defined]
        if self.kind in ("tcp", "unix"):
            self.lsock.close()


@pytest.mark.parametrize("kind", ["fifo", "exec", "tcp", "unix"])
def test_cancel_of_a_blocked_write_on_every_transport(vms, tmp_path: Path, kind: str) -> None:
    """The file transport is the FIFO case (a regular file never blocks a write)."""
    src = vms("src", *MEMCHECK_BIG)
    src.wait_serial("memcheck gen 1 ok")
    sink = _Sink(kind, tmp_path)
    try:
        src.cmd("migrate", uri=sink.uri)
        src.wait_migration(("active",), timeout=10)
        # the writes fill every buffer on the way and block: the byte count stops moving
        wait_stalled(lambda: src.cmd("query-migrate")["ram"]["transferred"],
                     what="writes blocked by a peer that never reads", interval=0.3)
        assert src.cmd("query-migrate")["status"] == "active"
        _cancel_within_bound(src)
    finally:
        sink.close()
    _progresses(src)
    _then_migrates(src, tmp_path)


# -- files holding guest state ----------------------------------------------------------------

def test_files_holding_guest_state_are_private(vms, tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        log = tmp_path / "pyvm.log"
        src = vms("src", *MEMCHECK, "-d", "guest_errors", "-D", str(log))
    finally:
        os.umask(old)
    src.wait_serial("memcheck gen 1 ok")
    src.cmd("pmemsave", val=0, size=4096, filename=str(tmp_path / "p.bin"))
    src.cmd("memsave", val=0, size=4096, filename=str(tmp_path / "v.bin"))
    src.cmd("migrate", uri=f"file:{tmp_path / 'm.state'}")
    assert src.wait_migration()["status"] == "completed"
    paths = [src.serial_path, tmp_path / "p.bin", tmp_path / "v.bin", tmp_path / "m.state",
             log, Path(src.sock)]
    for p in paths:
        mode = stat.S_IMODE(os.stat(p).st_mode)
        assert mode & 0o077 == 0, f"{p.name} is {oct(mode)}"


# -- a monitor with limits --------------------------------------------------------------------

def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_huge_memory_dump_is_refused_quickly(vms) -> None:
    vm = vms("vm", *MEMCHECK)
    before = _rss_kib(vm.proc.pid)
    start = time.monotonic()
    out = vm.hmp("xp /4000000xb 0")
    assert time.monotonic() - start < 1.0
    assert out.strip() == "xp: at most 4096 values per command (asked for 4000000)"
    assert vm.hmp("x /5000i 0").strip().startswith("x: at most 128 instructions")
    lines = vm.hmp("xp /4096xb 0").splitlines()
    assert len(lines) == 512 and lines[-1].startswith("0000000000000ff8:")
    assert len(vm.hmp("xp /4096xg 0").splitlines()) == 2048
    assert _rss_kib(vm.proc.pid) - before < 64 << 10          # KiB: far below hundreds of MB


def test_deep_expressions_give_a_clear_error(vms) -> None:
    vm = vms("vm", *MEMCHECK)
    assert vm.hmp("p " + "(" * 60 + "7" + ")" * 60).strip() == "0x7"
    for expr in ("(" * 300 + "1" + ")" * 300, "-" * 5000 + "1", "~(" * 200 + "0" + ")" * 200):
        out = vm.hmp("p " + expr)
        assert out.splitlines()[0] == "expression nested too deeply (at most 64 levels)", out[:200]
    big = "1+" * 40000 + "1"                         # 80 KB: beyond the command line bound
    start = time.monotonic()
    assert vm.hmp("p " + big).strip() == "command line too long (limit 65536 bytes)"
    assert time.monotonic() - start < 1.0
    assert vm.hmp("p " + "1+" * 30000 + "1").strip() == "0x7531"
    assert "Traceback" not in vm.stderr() and "internal error" not in vm.stderr()
    assert vm.status() == "running"


def test_a_busy_client_does_not_starve_stop(vms, tmp_path: Path) -> None:
    busy_sock = str(tmp_path / "busy.qmp")
    vm = vms("vm", *MEMCHECK, "-qmp", f"unix:{busy_sock},server=on,wait=off")
    busy = socket.socket(socket.AF_UNIX)
    busy.connect(busy_sock)
    reader = busy.makefile("rb")
    reader.readline()                                   # greeting
    busy.sendall(b'{"execute": "qmp_capabilities"}\n')
    assert b"return" in reader.readline()
    done = threading.Event()
    calls = [0]
    request = (json.dumps({"execute": "human-monitor-command",
                           "arguments": {"command-line": "xp /4096c 0"}}) + "\n").encode()

    def hammer() -> None:
        while not done.is_set():
            busy.sendall(request)
            while b'"event"' in (line := reader.readline()):
                pass                                    # STOP/RESUME of the other client
            assert b'"return"' in line, line
            calls[0] += 1
    t = threading.Thread(target=hammer)
    t.start()
    try:
        wait_until(lambda: calls[0] >= 2, what="the busy client's first dumps")
        latencies = []
        for _ in range(5):
            start = time.monotonic()
            vm.cmd("stop")
            latencies.append(time.monotonic() - start)
            vm.cmd("cont")
        assert max(latencies) < 1.0, latencies
    finally:
        done.set()
        t.join(30)
        reader.close()
        busy.close()
