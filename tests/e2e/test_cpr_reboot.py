"""cpr-reboot: save, quit, restart with the same arguments plus -incoming, resume."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import guest
from tests.vmproc import QmpFailed


def _args(ram_path: Path, *extra: str) -> list[str]:
    return ["-object", f"memory-backend-file,id=ram0,size=32M,mem-path={ram_path},share=on",
            "-machine", "memory-backend=ram0", "-kernel", guest("memcheck.elf"),
            "-append", "start=1 size=4", "-display", "none", *extra]


@pytest.mark.parametrize("ignore_shared", [True, False])
def test_cpr_reboot_save_quit_restart(vms, tmp_shm: Path, tmp_path: Path, ignore_shared: bool) -> None:
    ram, state = tmp_shm / "ram", tmp_path / "vm.state"
    src = vms("src", *_args(ram))
    src.wait_serial("memcheck gen 2 ok")
    caps = [{"capability": "x-ignore-shared", "state": ignore_shared}]
    src.cmd("migrate-set-parameters", mode="cpr-reboot")
    src.cmd("migrate-set-capabilities", capabilities=caps)
    with pytest.raises(QmpFailed, match="cpr-reboot"):
        src.cmd("migrate", uri="tcp:127.0.0.1:1")
    src.cmd("migrate", uri=f"file:{state}")
    assert src.wait_migration()["status"] == "completed"
    assert src.status() == "postmigrate"
    src.cmd("quit")
    src.wait_exit()
    size = state.stat().st_size
    if ignore_shared:
        assert size < 64 * 1024, size           # no guest RAM in the file
    else:
        assert size > 4 << 20, size             # the non-zero RAM is in the file
    dst = vms("dst", *_args(ram, "-incoming", "defer"))
    dst.cmd("migrate-set-parameters", mode="cpr-reboot")
    dst.cmd("migrate-set-capabilities", capabilities=caps)
    dst.cmd("migrate-incoming", uri=f"file:{state}")
    dst.wait_migration(("completed",))
    assert dst.status() == "running"
    out = dst.wait_serial(" ok\r\n", count=2)
    assert "FAIL" not in out
    src_gens = [line for line in src.serial().split("\r\n")[:-1] if line.startswith("memcheck gen ")]
    last = int(src_gens[-1].split()[2])
    assert f"memcheck gen {last + 1} ok" in src.serial()[-40:] + out


def test_capability_mismatch(vms, tmp_shm: Path, tmp_path: Path) -> None:
    import subprocess
    import sys
    ram, state = tmp_shm / "ram", tmp_path / "vm.state"
    src = vms("src", *_args(ram))
    src.cmd("migrate-set-parameters", mode="cpr-reboot")
    src.cmd("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])
    src.cmd("migrate", uri=f"file:{state}")
    src.wait_migration()
    src.cmd("quit")
    src.wait_exit()
    r = subprocess.run([sys.executable, "-m", "pyvm", *_args(ram, "-incoming", f"file:{state}")],
                       capture_output=True, timeout=30)
    assert r.returncode == 1
    assert b"Capability x-ignore-shared is off, but received capability is on" in r.stderr
    r = subprocess.run([sys.executable, "-m", "pyvm", "-m", "64M", "-kernel", guest("memcheck.elf"),
                        "-display", "none", "-incoming", f"file:{state}"], capture_output=True, timeout=30)
    assert r.returncode == 1 and b"load of migration failed" in r.stderr


def test_writeback_disk_blocks_normal_not_cpr(vms, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    args = ["-m", "32M", "-kernel", guest("memcheck.elf"), "-append", "start=1 size=2",
            "-drive", f"file={img},format=raw,cache=writeback", "-display", "none"]
    src = vms("src", *args)
    info = src.cmd("query-migrate")
    assert any("cache=writeback" in r for r in info["blocked-reasons"])
    with pytest.raises(QmpFailed, match="cache=writeback"):
        src.cmd("migrate", uri=f"file:{tmp_path / 'x'}")
    src.cmd("migrate-set-parameters", mode="cpr-reboot")
    src.cmd("migrate", uri=f"file:{tmp_path / 'x'}")
    assert src.wait_migration()["status"] == "completed"


def test_memfd_with_ignore_shared_refused(vms, tmp_path: Path) -> None:
    src = vms("src", "-object", "memory-backend-memfd,id=m,size=32M", "-machine", "memory-backend=m",
              "-kernel", guest("memcheck.elf"), "-display", "none")
    src.cmd("migrate-set-parameters", mode="cpr-reboot")
    src.cmd("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])
    with pytest.raises(QmpFailed, match="does not survive its process"):
        src.cmd("migrate", uri=f"file:{tmp_path / 'x'}")


def test_paused_at_save_stays_paused_and_missing_file(vms, tmp_shm: Path, tmp_path: Path) -> None:
    import subprocess
    import sys
    ram, state = tmp_shm / "ram", tmp_path / "vm.state"
    src = vms("src", *_args(ram))
    src.wait_serial("memcheck gen 1 ok")
    src.cmd("stop")
    src.cmd("migrate-set-parameters", mode="cpr-reboot")
    src.cmd("migrate", uri=f"file:{state}")
    assert src.wait_migration()["status"] == "completed"
    src.cmd("quit")
    src.wait_exit()
    dst = vms("dst", *_args(ram, "-incoming", f"file:{state}"))
    dst.wait_migration(("completed",))
    assert dst.status() == "paused"
    dst.cmd("quit")
    r = subprocess.run([sys.executable, "-m", "pyvm", *_args(ram, "-incoming", f"file:{tmp_path / 'nope'}")],
                       capture_output=True, timeout=30)
    assert r.returncode == 1 and b"Could not open" in r.stderr and b"Traceback" not in r.stderr


def test_disk_written_before_save_is_there_after_restart(vms, tmp_path: Path) -> None:
    """disk-rw writes its pattern through a write-back cache; cpr-reboot, quit (flush),
    restart: the image holds the data."""
    img = tmp_path / "disk.img"
    boot = open(guest("disk-rw.img"), "rb").read()
    img.write_bytes(boot.ljust(512, b"\0")[:512] + b"cpr disk".ljust(512, b"\0") + bytes(2048))
    args = ["-m", "16M", "-drive", f"file={img},format=raw,cache=writeback", "-display", "none"]
    src = vms("src", *args)
    src.wait_serial("disk ok")
    state = tmp_path / "vm.state"
    src.cmd("migrate-set-parameters", mode="cpr-reboot")
    src.cmd("migrate", uri=f"file:{state}")
    assert src.wait_migration()["status"] == "completed"
    src.cmd("quit")
    src.wait_exit()
    assert img.read_bytes()[1024:1536] == bytes(range(256)) * 2      # flushed at quit
    dst = vms("dst", *args, "-incoming", f"file:{state}")
    assert dst.wait_migration(("completed", "failed"))["status"] == "completed", dst.stderr()
    assert img.read_bytes()[1024:1536] == bytes(range(256)) * 2
