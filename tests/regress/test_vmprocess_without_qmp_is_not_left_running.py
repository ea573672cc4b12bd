"""A ``VmProcess`` whose QMP socket never appears raises from its constructor; the process
it spawned must then be killed and reaped there, since no fixture ever holds the object
(it was left running before)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.vmproc import VmProcess


def test_constructor_failure_kills_and_reaps_the_process(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    # a stand-in for a pyvm that never opens its QMP socket: records its pid, then sleeps
    prefix = ("sh", "-c", f'echo $$ > "{pidfile}"; exec sleep 300')
    with pytest.raises(AssertionError, match="QMP socket"):
        VmProcess(tmp_path, "silent", prefix=prefix, connect_timeout=1.0)
    pid = int(pidfile.read_text())
    # killed and waited for: not running, and not even a zombie
    assert not os.path.exists(f"/proc/{pid}"), open(f"/proc/{pid}/stat").read()
