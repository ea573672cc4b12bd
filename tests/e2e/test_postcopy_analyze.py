"""A real postcopy stream, captured on the wire between two pyvm processes, read by
pyvm-analyze to its end; QEMU's analyze-migration.py refuses it (no vmdesc)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.conftest import guest
from tests.waiting import wait_until
from pyvm.userfault import unavailable_reason

pytestmark = [pytest.mark.skipif(unavailable_reason() is not None, reason=unavailable_reason() or ""),
              pytest.mark.postcopy_full]

HOT = ["-m", "32M", "-kernel", guest("memcheck.elf"), "-append", "start=1 size=16",
       "-display", "none"]


ROOT = Path(__file__).resolve().parents[2]


def _qemu_analyzer() -> str | None:
    """QEMU's analyze-migration.py as tests/migration/test_pyvm_analyze.py finds it."""
    for path in (os.environ.get("PYVM_QEMU_ANALYZE_MIGRATION"), shutil.which("analyze-migration.py"),
                 str(ROOT / ".cache" / "qemu" / "analyze-migration.py")):
        if path and os.path.isfile(path):
            return os.path.abspath(path)
    return None


class _Tee:
    """Relays one connection and keeps a copy of what the source sends."""

    def __init__(self, port: int, path: Path) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target, self.path = port, path
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        a, _ = self.listener.accept()
        b = socket.create_connection(("127.0.0.1", self.target))

        def back() -> None:
            try:
                while data := b.recv(65536):
                    a.sendall(data)
            except OSError:
                pass
        threading.Thread(target=back, daemon=True).start()
        with open(self.path, "wb") as out:
            while data := a.recv(65536):
                out.write(data)
                b.sendall(data)
        b.shutdown(socket.SHUT_WR)


def test_pyvm_analyze_reads_a_captured_postcopy_stream(vms, tmp_path: Path) -> None:
    src = vms("src", *HOT)
    src.wait_serial("memcheck gen 2 ok", timeout=60)
    dst = vms("dst", *HOT, "-incoming", "defer")
    for vm in (src, dst):
        vm.cmd("migrate-set-capabilities", capabilities=[{"capability": "postcopy-ram", "state": True}])
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    tee = _Tee(int(dst.cmd("query-migrate")["socket-address"][0]["port"]), tmp_path / "wire")
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 8 << 20})
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{tee.port}")
    wait_until(lambda: int(src.cmd("query-migrate").get("ram", {}).get("dirty-sync-count", 0)) >= 2,
               60, "two syncs")
    src.cmd("migrate-start-postcopy")
    assert src.wait_migration(timeout=60)["status"] == "completed"
    tee.thread.join(30)
    r = subprocess.run([sys.executable, "-m", "pyvm.analyze", "-f", str(tmp_path / "wire")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    state = json.loads(r.stdout)
    names = [c["command"] for c in state["commands"]]
    assert names[:3] == ["OPEN_RETURN_PATH", "PING", "POSTCOPY_ADVISE"]
    assert names[-3:] == ["PACKAGED", "POSTCOPY_LISTEN", "POSTCOPY_RUN"]
    assert "POSTCOPY_RAM_DISCARD" in names
    assert state["cpu (4)"]["size"] > 0 and state["globalstate (11)"] == {"runstate": "running"}
    script = _qemu_analyzer()
    if script is not None:
        q = subprocess.run([sys.executable, script, "-f", str(tmp_path / "wire")],
                           capture_output=True, text=True, timeout=120)
        assert q.returncode != 0 and "No Debug Migration device found" in q.stderr, q.stderr[-1000:]
