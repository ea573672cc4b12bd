"""pyvm-migrate and pyvm-monitor against real VMs; x-query-ram-pagemap's answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.vmproc import VmProcess

BIN = Path(sys.executable).parent


def _tool(name: str, *args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    exe = BIN / name
    if not exe.exists():
        pytest.fail(f"{exe} is not installed: run make setup")
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_pyvm_migrate_live_to_a_deferred_destination(tmp_path: Path) -> None:
    args = ("-m", "32M", "-kernel", "memcheck", "-append", "size=8", "-display", "none")
    src = VmProcess(tmp_path, "src", *args)
    dst = VmProcess(tmp_path, "dst", *args, "-incoming", "defer")
    try:
        src.wait_serial("memcheck gen 1 ok", timeout=60)
        res = _tool("pyvm-migrate", "--verbose", "--pagemap", "--history", "h.json",
                    "--figures", "figs", "--param", "max-bandwidth=64M", src.sock,
                    f"unix:{tmp_path / 'mig.sock'}", "--dest", dst.sock, cwd=tmp_path)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "Migration status: completed" in res.stdout
        assert "destination: running" in res.stdout
        assert "page map (" in res.stdout
        assert dst.status() == "running" and src.status() == "postmigrate"
        history = json.loads((tmp_path / "h.json").read_text())
        assert history[-1]["status"] == "completed"
        assert [s["t"] for s in history] == sorted(s["t"] for s in history)
        for name in ("remaining.png", "throughput.png", "timeline.png"):
            assert (tmp_path / "figs" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # the guest goes on checking its RAM on the destination
        out = dst.wait_serial("memcheck gen", timeout=60)
        assert "FAIL" not in out and "memcheck start" not in out
    finally:
        src.close()
        dst.close()


def test_pagemap_of_an_idle_guest_and_its_errors(tmp_path: Path) -> None:
    vm = VmProcess(tmp_path, "vm", "-m", "4M", "-kernel", "timer-pm", "-display", "none")
    try:
        vm.wait_serial("timer pm ok")
        info = vm.cmd("x-query-ram-pagemap")
        assert info["pages"] == 1024 and info["pages-per-cell"] == 1
        assert len(info["map"]) == 1024 and set(info["map"]) <= {".", "z"}
        # the image sits at 1 MiB: that page is not zero; the top of RAM is
        assert info["map"][256] == "." and info["map"][-1] == "z"
        small = vm.cmd("x-query-ram-pagemap", cells=10)
        assert small["pages-per-cell"] == 103 and len(small["map"]) == 10
        with pytest.raises(Exception, match="cells"):
            vm.cmd("x-query-ram-pagemap", cells=-1)
    finally:
        vm.close()


def test_pyvm_monitor_until_and_errors(tmp_path: Path) -> None:
    vm = VmProcess(tmp_path, "vm", "-m", "4M", "-kernel", "timer-pm", "-display", "none")
    try:
        res = _tool("pyvm-monitor", vm.sock, "--until", "HLT=1", "--timeout", "30",
                    "info registers", cwd=tmp_path)
        assert res.returncode == 0 and "HLT=1" in res.stdout, res.stderr
        res = _tool("pyvm-monitor", vm.sock, "--until", "never-printed", "--timeout", "0.3",
                    "info status", cwd=tmp_path)
        assert res.returncode == 1 and "not seen within" in res.stderr
        assert "VM status: running" in res.stdout
        res = _tool("pyvm-monitor", str(tmp_path / "missing.sock"), "info status",
                    cwd=tmp_path, timeout=60)
        assert res.returncode == 1 and "cannot connect" in res.stderr
        assert "Traceback" not in res.stderr
    finally:
        vm.close()


def test_documented_bench_commands_import_pyvm() -> None:
    """docs/performance.md runs benches as '.venv/bin/python bench/X.py': with the
    interpreter pyvm is installed in they import, from the checkout's root."""
    import re
    root = Path(__file__).resolve().parents[2]
    text = (root / "docs" / "performance.md").read_text()
    scripts = sorted(set(re.findall(r"\.venv/bin/python (bench/\w+\.py)", text)))
    assert scripts and "python bench/" not in text.replace(".venv/bin/python bench/", "")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for script in scripts:
        res = subprocess.run([sys.executable, script, "--help"], cwd=root, env=env,
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, f"{script}: {res.stderr}"
