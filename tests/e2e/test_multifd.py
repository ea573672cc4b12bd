"""multifd between real pyvm processes: page channels beside the main one, with and without
zlib/zstd, over tcp and unix; destination RAM byte-equal to the source's at switchover; and
the failures (QEMU's texts, the source guest runs on, the destination fails cleanly)."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest

from tests.conftest import guest
from tests.vmproc import QmpFailed, VmProcess
from tests.waiting import wait_until

RAM = 32 << 20
MEMCHECK = ["-m", "32M", "-kernel", guest("memcheck.elf"), "-append", "start=1 size=4",
            "-display", "none"]


def _multifd(vm: VmProcess, channels: int, compression: str) -> None:
    vm.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
    vm.cmd("migrate-set-parameters", **{"multifd-channels": channels,
                                        "multifd-compression": compression})


def _pair(vms, tmp_path: Path, transport: str, channels: int, compression: str,
          src_args: tuple[str, ...] = ()) -> tuple[VmProcess, VmProcess, str]:
    src = vms("src", *MEMCHECK, *src_args)
    dst = vms("dst", *MEMCHECK, "-S", "-incoming", "defer")
    _multifd(src, channels, compression)
    _multifd(dst, channels, compression)
    if transport == "tcp":
        dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
        uri = f"tcp:127.0.0.1:{dst.cmd('query-migrate')['socket-address'][0]['port']}"
    else:
        path = tmp_path / "mig.sock"
        dst.cmd("migrate-incoming", uri=f"unix:{path}")
        uri = f"unix:{path}"
    return src, dst, uri


def _migrate_and_compare(src: VmProcess, dst: VmProcess, uri: str) -> dict:
    src.wait_serial("memcheck gen 2 ok")
    src.cmd("migrate", uri=uri)
    done = src.wait_migration()
    assert done["status"] == "completed", done
    assert dst.wait_migration(("completed", "failed"))["status"] == "completed", dst.stderr()
    assert src.status() == "postmigrate"
    assert dst.status() == "paused"
    assert src.pmem(RAM) == dst.pmem(RAM)       # byte-equal at switchover
    dst.cmd("cont")
    out = dst.wait_serial(" ok\r\n", count=2)
    assert "FAIL" not in out
    assert "Traceback" not in dst.stderr() + src.stderr()
    return done


@pytest.mark.parametrize("transport,channels,compression", [
    ("tcp", 2, "none"), ("unix", 1, "none"), ("tcp", 4, "zlib"), ("unix", 2, "zstd"),
    ("tcp", 1, "zstd"), ("unix", 4, "none"),
])
def test_multifd_migration_is_byte_equal(vms, tmp_path, transport, channels, compression) -> None:
    src, dst, uri = _pair(vms, tmp_path, transport, channels, compression)
    done = _migrate_and_compare(src, dst, uri)
    ram = done["ram"]
    assert ram["multifd-bytes"] > 0
    if compression == "none":
        # every non-zero page travelled on a page channel, with its offsets beside it
        assert ram["multifd-bytes"] >= ram["normal"] * 4096
