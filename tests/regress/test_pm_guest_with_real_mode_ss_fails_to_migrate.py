"""Regression: a boot sector that enters protected mode and reloads only DS (SS and ES keep
their real-mode selector 0 and hidden base/limit) failed every migration on the destination
with "error while loading state for instance 0x0 of device 'cpu'" / "Invalid argument": the
cpu section carried selectors only and the destination reloaded them through Unicorn, which
refuses a null SS in protected mode.  Live over tcp, through a file, and across cpr-reboot,
the guest must run on."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.conftest import guest
from tests.vmproc import VmProcess

BOOT = ["-m", "16M", "-hda", guest("pm-realss.img"), "-display", "none"]


def _ticks(vm: VmProcess) -> list[int]:
    return [int(n) for n in re.findall(r"pm tick (\d+)\r\n", vm.serial())]


def _prove_the_situation(vm: VmProcess) -> None:
    """The guest really is in 32-bit protected mode with a real-mode SS (and ES) right now."""
    vm.cmd("stop")
    regs = vm.hmp("info registers")
    vm.cmd("cont")
    cr0 = int(re.search(r"CR0=([0-9a-f]{8})", regs).group(1), 16)
    assert cr0 & 1, regs                                                  # PE
    assert re.search(r"CS =0008 00000000 ffffffff 00cf9b00 DPL=0 CS32", regs), regs
    assert re.search(r"DS =0010 00000000 ffffffff 00cf9300", regs), regs
    # Selector 0 with real-mode contents: a protected-mode load of a null SS would #GP.
    assert re.search(r"SS =0000 00000000 0000ffff 00009300", regs), regs
    assert re.search(r"ES =0000 00000000 0000ffff 00009300", regs), regs


def _runs_on(src: VmProcess, dst: VmProcess) -> None:
    last = max(_ticks(src))
    deadline = time.monotonic() + 30
    while not [t for t in _ticks(dst) if t > last + 1]:
        assert "FAIL" not in dst.serial()
        assert dst.proc.poll() is None, dst.stderr()
        assert time.monotonic() < deadline, (dst.serial()[-200:], dst.stderr())
        time.sleep(0.05)
    got = _ticks(dst)
    assert got == list(range(got[0], got[0] + len(got))) and got[0] <= last + 1
    assert "FAIL" not in dst.serial() and "error" not in dst.stderr()


def _start(vms, name: str, *extra: str) -> VmProcess:
    vm = vms(name, *BOOT, *extra)
    vm.wait_serial("pm tick 2")
    _prove_the_situation(vm)
    return vm


def test_live_over_tcp(vms) -> None:
    src = _start(vms, "src")
    dst = vms("dst", *BOOT, "-incoming", "tcp:127.0.0.1:0")
    port = dst.cmd("query-migrate")["socket-address"][0]["port"]
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    assert src.wait_migration()["status"] == "completed"
    info = dst.wait_migration(("completed", "failed"))
    assert info["status"] == "completed", (info, dst.stderr())
    assert dst.status() == "running"
    _runs_on(src, dst)
    _prove_the_situation(dst)


def test_saved_to_a_file_and_restored(vms, tmp_path: Path) -> None:
    src = _start(vms, "src")
    state = tmp_path / "vm.state"
    src.cmd("migrate", uri=f"file:{state}")
    assert src.wait_migration()["status"] == "completed"
    src.cmd("quit")
    src.wait_exit()
    dst = vms("dst", *BOOT, "-incoming", f"file:{state}")
    info = dst.wait_migration(("completed", "failed"))
    assert info["status"] == "completed", (info, dst.stderr())
    _runs_on(src, dst)
    _prove_the_situation(dst)


def test_cpr_reboot(vms, tmp_shm: Path, tmp_path: Path) -> None:
    ram, state = tmp_shm / "ram", tmp_path / "vm.state"
    mem = ["-object", f"memory-backend-file,id=ram0,size=16M,mem-path={ram},share=on",
           "-machine", "memory-backend=ram0"]
    caps = [{"capability": "x-ignore-shared", "state": True}]
    src = _start(vms, "src", *mem)
    src.cmd("migrate-set-parameters", mode="cpr-reboot")
    src.cmd("migrate-set-capabilities", capabilities=caps)
    src.cmd("migrate", uri=f"file:{state}")
    assert src.wait_migration()["status"] == "completed"
    src.cmd("quit")
    src.wait_exit()
    dst = vms("dst", *BOOT, *mem, "-incoming", "defer")
    dst.cmd("migrate-set-parameters", mode="cpr-reboot")
    dst.cmd("migrate-set-capabilities", capabilities=caps)
    dst.cmd("migrate-incoming", uri=f"file:{state}")
    info = dst.wait_migration(("completed", "failed"))
    assert info["status"] == "completed", (info, dst.stderr())
    _runs_on(src, dst)
    _prove_the_situation(dst)
