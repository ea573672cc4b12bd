"""Debian 12's stock kernel (linux-image-amd64) boots to a busybox shell in pyvm."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.linux import BOOT_TIMEOUT, PROMPT, SerialConsole, linux_args

pytestmark = pytest.mark.slow


def _boot(vms, tmp_path: Path, name: str, *extra: str):
    sock = tmp_path / f"{name}.serial.sock"
    vm = vms(name, *linux_args(), *extra, "-serial", f"unix:{sock},server=on,wait=off",
             serial=False)
    return vm, SerialConsole(sock)


def test_boots_to_a_shell_and_answers(vms, tmp_path: Path) -> None:
    vm, con = _boot(vms, tmp_path, "linux")
    try:
        con.expect(PROMPT, BOOT_TIMEOUT)
        assert "Linux version 6.1" in con.out
        a, b = random.randint(100, 999), random.randint(100, 999)
        con.run(f"echo $(({a}*{b}))", str(a * b))
        # The kernel saw what pyvm gave it: the e820 RAM, the initrd, no local APIC.
        con.run("grep -c ^processor /proc/cpuinfo", "1")
        con.run("grep -q ' apic ' /proc/cpuinfo || echo no-apic", "no-apic")
        con.run("cat /proc/cmdline", "console=ttyS0")
        assert vm.status() == "running"
    finally:
        con.close()
