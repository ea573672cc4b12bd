"""The pure-Python twins (pyvm/fastpath_py.py, pyvm/pagestream_py.py, and
``VCpu.deliver_python`` for interrupt delivery) end to end: ``PYVM_PURE_PYTHON=1`` pyvm
processes boot, migrate live over tcp, save to and restore from a file, and go through
cpr-reboot.

Each process is checked to really run the twins: the native extension modules never
get loaded into it (its /proc/PID/maps lists no ``_fastpath``/``_pagestream``/``_delivery`` shared
object), while a process started without the variable does load them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import DEBUG_EXIT, guest, run_pyvm
from tests.vmproc import VmProcess

PURE = {"PYVM_PURE_PYTHON": "1"}
NATIVE = ("_fastpath.", "_pagestream.", "_delivery.")
RAM = 32 << 20
# 1 MiB of memcheck: the twin's write tracking is a Python callback per guest store
MEMCHECK = ["-m", "32M", "-kernel", guest("memcheck.elf"), "-append", "start=1 size=1",
            "-display", "none"]

pytestmark = pytest.mark.slow


def native_modules_loaded(vm: VmProcess) -> list[str]:
    maps = Path(f"/proc/{vm.proc.pid}/maps").read_text()
    return sorted({line.rsplit("/", 1)[-1] for line in maps.splitlines()
                   if any(name in line for name in NATIVE)})


def pure(vms, name: str, *args: str) -> VmProcess:
    vm = vms(name, *args, env=PURE)
    assert native_modules_loaded(vm) == [], f"{name} loaded the native modules"
    return vm


def _continues(dst: VmProcess) -> None:
    out = dst.wait_serial(" ok\r\n", count=2, timeout=60)
    assert "FAIL" not in out, out


def test_the_check_sees_native_modules(vms) -> None:
    """The control: without the variable the same check finds the native modules."""
    vm = vms("native", *MEMCHECK)
    vm.wait_serial("memcheck gen 1 ok")
    assert len(native_modules_loaded(vm)) == 3, native_modules_loaded(vm)


def test_boot_and_guests_finish() -> None:
    r = run_pyvm("-m", "16M", "-kernel", guest("timer-pm.elf"), "-serial", "stdio", *DEBUG_EXIT,
                 env=PURE)
    assert "timer pm ok" in r.stdout.decode() and r.returncode == 0x21, r.stderr
    r = run_pyvm("-m", "32M", "-kernel", guest("memcheck.elf"), "-append", "start=1 size=1 gens=2",
                 "-serial", "stdio", *DEBUG_EXIT, env=PURE, timeout=60)
    assert "memcheck gen 2 ok" in r.stdout.decode() and r.returncode == 1, r.stderr


def test_live_migration_over_tcp(vms) -> None:
    src = pure(vms, "src", *MEMCHECK)
    src.wait_serial("memcheck gen 1 ok", timeout=60)
    dst = pure(vms, "dst", *MEMCHECK, "-S", "-incoming", "tcp:127.0.0.1:0")
    port = dst.cmd("query-migrate")["socket-address"][0]["port"]
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    done = src.wait_migration(timeout=120)
    assert done["status"] == "completed", done
    assert done["ram"]["dirty-sync-count"] >= 2            # it was live: dirty pages tracked
    assert dst.wait_migration(("completed", "failed"))["status"] == "completed", dst.stderr()
    assert src.pmem(RAM) == dst.pmem(RAM)
    dst.cmd("cont")
    _continues(dst)


def test_file_save_and_restore(vms, tmp_path: Path) -> None:
    state = tmp_path / "vm.state"
    src = pure(vms, "src", *MEMCHECK)
    src.wait_serial("memcheck gen 1 ok", timeout=60)
    src.cmd("migrate", uri=f"file:{state}")
    assert src.wait_migration(timeout=120)["status"] == "completed"
    ram = src.pmem(RAM)
    src.cmd("quit")
    dst = pure(vms, "dst", *MEMCHECK, "-S", "-incoming", f"file:{state}")
    assert dst.wait_migration(("completed", "failed"), timeout=120)["status"] == "completed", dst.stderr()
    assert dst.pmem(RAM) == ram
    dst.cmd("cont")
    _continues(dst)


def test_cpr_reboot(vms, tmp_shm: Path, tmp_path: Path) -> None:
    ram_file, state = tmp_shm / "ram", tmp_path / "vm.state"
    args = ["-object", f"memory-backend-file,id=ram0,size=32M,mem-path={ram_file},share=on",
            "-machine", "memory-backend=ram0", *MEMCHECK[2:]]
    src = pure(vms, "src", *args)
    src.wait_serial("memcheck gen 1 ok", timeout=60)
    src.cmd("migrate-set-parameters", mode="cpr-reboot")
    src.cmd("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])
    src.cmd("migrate", uri=f"file:{state}")
    assert src.wait_migration(timeout=120)["status"] == "completed"
    src.cmd("quit")
    src.wait_exit()
    dst = pure(vms, "dst", *args, "-incoming", "defer")
    dst.cmd("migrate-set-parameters", mode="cpr-reboot")
    dst.cmd("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])
    dst.cmd("migrate-incoming", uri=f"file:{state}")
    assert dst.wait_migration(("completed", "failed"), timeout=120)["status"] == "completed"
    assert dst.status() == "running"
    _continues(dst)
