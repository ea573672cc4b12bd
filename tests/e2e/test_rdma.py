"""rdma: migration between two real pyvm processes over libfabric (tcp provider, loopback)."""

from __future__ import annotations


import pytest

from pyvm.migration.transports import fabric
from tests.conftest import guest
from tests.ports import free_port
from tests.waiting import wait_until

RAM = 32 << 20
ARGS = ["-m", "32M", "-kernel", guest("memcheck.elf"), "-append", "start=1 size=4", "-display", "none"]


def test_libfabric_binding_is_built() -> None:
    # The README's set-up installs libfabric-dev and builds the binding.
    assert fabric.available(), "pyvm's libfabric binding is not built"


@pytest.fixture
def rdma_vms(vms):
    """VMs forced onto libfabric's tcp provider (no RDMA NIC here)."""
    return lambda name, *args: vms(name, *args, env={"PYVM_RDMA_PROVIDER": "tcp"})


@pytest.mark.parametrize("form,pin_all", [("uri", False), ("channels", True)])
def test_rdma_migration(rdma_vms, form: str, pin_all: bool) -> None:
    vms = rdma_vms
    port = free_port()
    src = vms("src", *ARGS)
    src.wait_serial("memcheck gen 1 ok")
    dst = vms("dst", *ARGS, "-S", "-incoming", f"rdma:127.0.0.1:{port}")
    for vm in (src, dst):
        vm.cmd("migrate-set-capabilities", capabilities=[{"capability": "rdma-pin-all", "state": pin_all}])
    if form == "uri":
        src.cmd("migrate", uri=f"rdma:127.0.0.1:{port}")
    else:
        src.cmd("migrate", channels=[{"channel-type": "main", "addr": {
            "transport": "rdma", "host": "127.0.0.1", "port": str(port)}}])
    info = src.wait_migration()
    assert info["status"] == "completed", info
    assert dst.wait_migration(("completed", "failed"))["status"] == "completed", dst.stderr()
    assert src.pmem(RAM) == dst.pmem(RAM)
    dst.cmd("cont")
    assert "FAIL" not in dst.wait_serial(" ok\r\n", count=2)


def test_rdma_refused(rdma_vms) -> None:
    vms = rdma_vms
    src = vms("src", *ARGS)
    src.cmd("migrate", uri=f"rdma:127.0.0.1:{free_port()}")
    info = src.wait_migration()
    assert info["status"] == "failed" and "RDMA" in info["error-desc"], info
    assert src.status() == "running"


def test_rdma_destination_killed_mid_transfer(rdma_vms) -> None:
    vms = rdma_vms
    args = ["-m", "64M", "-kernel", guest("memcheck.elf"), "-append", "start=1 size=32",
            "-display", "none"]
    port = free_port()
    src = vms("src", *args)
    dst = vms("dst", *args, "-incoming", f"rdma:127.0.0.1:{port}")
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 4 << 20})
    src.cmd("migrate", uri=f"rdma:127.0.0.1:{port}")
    src.wait_migration(("active",))
    wait_until(lambda: src.cmd("query-migrate")["ram"]["transferred"] > 1 << 20, 30,
               "1 MiB transferred")
    dst.proc.kill()
    info = src.wait_migration(timeout=90)
    assert info["status"] == "failed" and info["error-desc"], info
    assert src.status() == "running"


def test_rdma_idle_guest(rdma_vms) -> None:
    """A guest that mostly sleeps (hello, 100 Hz timer): zero chunks go as COMPRESS messages."""
    vms = rdma_vms
    args = ["-m", "32M", "-display", "none"]            # no boot option: the hello guest
    port = free_port()
    src = vms("src", *args)
    src.wait_serial("tick 1")
    dst = vms("dst", *args, "-incoming", f"rdma:127.0.0.1:{port}")
    src.cmd("migrate", uri=f"rdma:127.0.0.1:{port}")
    info = src.wait_migration()
    assert info["status"] == "completed", info
    assert info["ram"]["duplicate"] > info["ram"]["normal"]
    dst.wait_migration(("completed",))
    last = [line for line in src.serial().splitlines() if line.startswith("tick")][-1]
    n = int(last.split()[1])
    dst.wait_serial(f"tick {n + 1}\r\n", timeout=10)
