"""The ``mapped-ram`` capability between real pyvm processes.

A guest that keeps writing is saved live to a file for a while: the file never grows past
RAM plus its metadata (pages dirtied again overwrite their slot), and a destination
started with ``-incoming defer`` and mapped-ram restores it byte for byte.
``memcheck.elf`` checks every page itself after the restore.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.conftest import guest
from tests.vmproc import QmpFailed, VmProcess
from tests.waiting import wait_until

RAM = 128 << 20
DIRTY = ["-m", "128M", "-kernel", guest("dirty.elf"), "-append", "start=1 size=16 rate=0",
         "-display", "none"]
MEMCHECK = ["-m", "128M", "-kernel", guest("memcheck.elf"), "-append", "start=1 size=8",
            "-display", "none"]
#: seconds of live saving in make test (bench/migration.py runs the 30 s case)
LIVE_SECONDS = float(os.environ.get("PYVM_MAPPED_RAM_SECONDS", "5"))


def _mapped_ram(vm: VmProcess) -> None:
    vm.cmd("migrate-set-capabilities", capabilities=[{"capability": "mapped-ram", "state": True}])


def _restore(vms, args: list[str], state: Path) -> VmProcess:
    dst = vms("dst", *args, "-S", "-incoming", "defer")
    _mapped_ram(dst)
    dst.cmd("migrate-incoming", uri=f"file:{state}")
    assert dst.wait_migration(("completed", "failed"))["status"] == "completed", dst.stderr()
    return dst


def test_live_save_stays_within_ram_and_restores(vms, tmp_path: Path) -> None:
    state = tmp_path / "live.state"
    src = vms("src", *DIRTY)
    src.wait_serial("dirty pattern=")
    # the guest is writing (a round that finds no dirty page would meet even a 0 limit)
    first = src.pmem(RAM)
    wait_until(lambda: src.pmem(RAM, "later.bin") != first, 20, "the guest writes")
    _mapped_ram(src)
    # slow enough that the guest dirties its 16 MiB again in every round, and a downtime
    # limit no round meets: the save goes on until the limit is raised
    src.cmd("migrate-set-parameters", **{"downtime-limit": 0, "max-bandwidth": 32 << 20})
    src.cmd("migrate", uri=f"file:{state}")
    deadline = time.monotonic() + LIVE_SECONDS
    sizes = []
    while time.monotonic() < deadline:
        info = src.cmd("query-migrate")
        assert info["status"] in ("setup", "active"), info
        if state.exists():
            sizes.append(state.stat().st_size)
        time.sleep(0.2)
    live = src.cmd("query-migrate")
    assert live["ram"]["dirty-sync-count"] >= 3, live
    # every round rewrote the guest's pages: far more page bytes went out than fit the file
    assert live["ram"]["normal-bytes"] > 2 * (16 << 20), live
    src.cmd("migrate-set-parameters", **{"downtime-limit": 10000, "max-bandwidth": 0})
    done = src.wait_migration()
    assert done["status"] == "completed", done
    size = state.stat().st_size
    assert max(sizes + [size]) <= RAM * 1.01, (sizes, size)
    dst = _restore(vms, DIRTY, state)
    assert src.pmem(RAM) == dst.pmem(RAM)


def test_restore_is_checked_by_the_guest(vms, tmp_path: Path) -> None:
    state = tmp_path / "m.state"
    src = vms("src", *MEMCHECK)
    src.wait_serial("memcheck gen 2 ok")
    _mapped_ram(src)
    src.cmd("migrate", uri=f"file:{state}")
    assert src.wait_migration()["status"] == "completed"
    dst = _restore(vms, MEMCHECK, state)
    assert src.pmem(RAM) == dst.pmem(RAM)
    dst.cmd("cont")
    out = dst.wait_serial(" ok\r\n", count=2)
    assert "FAIL" not in out, out


def test_refusals_use_qemu_texts(vms, tmp_path: Path) -> None:
    src = vms("src", *MEMCHECK)
    _mapped_ram(src)
    with pytest.raises(QmpFailed, match=r"^Migration requires seekable transport \(e\.g\. file\)$"):
        src.cmd("migrate", uri="tcp:127.0.0.1:1")
    with pytest.raises(QmpFailed, match="^Mapped-ram migration is incompatible with xbzrle$"):
        src.cmd("migrate-set-capabilities",
                capabilities=[{"capability": "xbzrle", "state": True}])
    src.cmd("migrate-set-parameters", **{"multifd-compression": "zlib"})
    with pytest.raises(QmpFailed, match="^Mapped-ram only available for non-compressed non-TLS "
                                        "multifd migration$"):
        src.cmd("migrate", uri=f"file:{tmp_path / 'x.state'}")
    assert src.status() == "running"
    dst = vms("dst", *MEMCHECK, "-incoming", "defer")
    _mapped_ram(dst)
    with pytest.raises(QmpFailed, match=r"^Migration requires seekable transport \(e\.g\. file\)$"):
        dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")


def test_plain_file_cannot_be_loaded_as_mapped_ram(vms, tmp_path: Path) -> None:
    state = tmp_path / "plain.state"
    src = vms("src", *MEMCHECK)
    src.cmd("migrate", uri=f"file:{state}")
    assert src.wait_migration()["status"] == "completed"
    dst = vms("dst", *MEMCHECK, "-incoming", "defer")
    _mapped_ram(dst)
    dst.cmd("migrate-incoming", uri=f"file:{state}")
    wait_until(lambda: dst.wait_exit(20) is not None, 30, "destination exits")
    assert "Capability mapped-ram is on, but received capability is off" in dst.stderr()


@pytest.mark.parametrize("direct_io", [False, True])
def test_mapped_ram_with_multifd_threads(vms, tmp_path: Path, direct_io: bool) -> None:
    """QEMU allows mapped-ram with multifd: the channels' threads write the pages in place.
    Skipped on a build whose multifd capability is not implemented yet."""
    state = tmp_path / "mt.state"
    src = vms("src", *MEMCHECK)
    try:
        src.cmd("migrate-set-capabilities",
                capabilities=[{"capability": "multifd", "state": True}])
    except QmpFailed as err:
        pytest.skip(f"multifd: {err}")
    src.wait_serial("memcheck gen 2 ok")
    _mapped_ram(src)
    src.cmd("migrate-set-parameters", **{"multifd-channels": 4, "direct-io": direct_io})
    src.cmd("migrate", uri=f"file:{state}")
    done = src.wait_migration()
    assert done["status"] == "completed", done
    dst = vms("dst", *MEMCHECK, "-S", "-incoming", "defer")
    dst.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
    _mapped_ram(dst)
    dst.cmd("migrate-incoming", uri=f"file:{state}")
    assert dst.wait_migration(("completed", "failed"))["status"] == "completed", dst.stderr()
    assert src.pmem(RAM) == dst.pmem(RAM)
    dst.cmd("cont")
    out = dst.wait_serial(" ok\r\n", count=2)
    assert "FAIL" not in out, out


def _saved_memcheck(vms, state: Path) -> VmProcess:
    src = vms("src", *MEMCHECK)
    src.wait_serial("memcheck gen 2 ok")
    _mapped_ram(src)
    src.cmd("migrate", uri=f"file:{state}")
    assert src.wait_migration()["status"] == "completed"
    return src


def _parallel_restore(vms, state: Path, channels: int, name: str = "dst",
                      direct_io: bool = False) -> VmProcess:
    dst = vms(name, *MEMCHECK, "-S", "-incoming", "defer")
    dst.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
    _mapped_ram(dst)
    dst.cmd("migrate-set-parameters", **{"multifd-channels": channels, "direct-io": direct_io})
    dst.cmd("migrate-incoming", uri=f"file:{state}")
    return dst


def test_parallel_restore_with_1_2_4_channels(vms, tmp_path: Path) -> None:
    """With multifd on the destination, multifd-channels threads read the pages regions
    (QEMU 9 read_ramblock_mapped_ram): RAM byte-equal whatever the number of channels."""
    state = tmp_path / "p.state"
    src = _saved_memcheck(vms, state)
    want = src.pmem(RAM)
    for channels in (1, 2, 4):
        # 2 channels read through O_DIRECT descriptors (direct-io, QEMU 9.1)
        dst = _parallel_restore(vms, state, channels, f"dst{channels}", direct_io=channels == 2)
        assert dst.wait_migration(("completed", "failed"))["status"] == "completed", dst.stderr()
        assert dst.pmem(RAM) == want, channels
        if channels == 4:
            dst.cmd("cont")
            out = dst.wait_serial(" ok\r\n", count=2)
            assert "FAIL" not in out, out
        dst.close()


def test_parallel_restore_of_a_cut_file_gives_qemu_texts(vms, tmp_path: Path) -> None:
    """A pages region cut short: the channel that reads the missing piece fails the load
    with QEMU's texts (ram.c read_ramblock_mapped_ram, file.c multifd_file_recv_data)."""
    state = tmp_path / "cut.state"
    _saved_memcheck(vms, state)
    # the first block's pages start at the first 1 MiB boundary: keep 3 MiB of them
    with open(state, "r+b") as f:
        f.truncate(4 << 20)
    dst = _parallel_restore(vms, state, 2)
    assert dst.wait_exit(60) == 1
    err = dst.stderr()
    assert "(pc.ram) failed to read page " in err, err
    assert "from file offset " in err and ": multifd recv (" in err, err
    assert ", expected 0x100000" in err, err
    assert "load of migration failed: Input/output error" in err, err
