"""`make demo` runs scripts/demo.py: it must work end to end (boot, echo, QMP, quit)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_demo_script() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py")], capture_output=True,
                       timeout=120, cwd=ROOT)
    out = r.stdout.decode()
    assert r.returncode == 0, (out, r.stderr.decode())
    assert "pyvm hello: guest running" in out and "hello from the host" in out
    assert "speaks QEMU 8.2.0's API" in out and "exited with status 0" in out
