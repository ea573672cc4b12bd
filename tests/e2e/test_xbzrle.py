"""The ``xbzrle`` capability between real pyvm processes.

A guest that changes a few bytes of its pages (``dirty.elf``: one word per write) is
migrated live over tcp with xbzrle: pages the cache holds go as small XBZRLE records,
RAM is byte-equal at switchover and the statistics add up.  ``memcheck.elf`` rewrites
whole pages (their encodings overflow and go whole) and checks every page itself on the
destination.
"""

from __future__ import annotations

from pathlib import Path

from tests.conftest import guest
from tests.vmproc import VmProcess
from tests.waiting import wait_until

RAM = 32 << 20
DIRTY = ["-m", "32M", "-kernel", guest("dirty.elf"), "-append", "start=1 size=8 rate=0",
         "-display", "none"]
MEMCHECK = ["-m", "32M", "-kernel", guest("memcheck.elf"), "-append", "start=1 size=4",
            "-display", "none"]


def _port(dst: VmProcess) -> str:
    return str(dst.cmd("query-migrate")["socket-address"][0]["port"])


def _encoded_or_done(src: VmProcess) -> dict | None:
    q = src.cmd("query-migrate")
    if q.get("status") in ("completed", "failed", "cancelled") \
            or q.get("xbzrle-cache", {}).get("pages", 0) > 1000:
        return q
    return None


def _migrate_until_encoded(src: VmProcess, dst: VmProcess) -> dict:
    """Migrate with a downtime limit only a round with no dirty page meets until pages
    went out encoded, then let it converge; returns the final query-migrate."""
    src.cmd("migrate-set-capabilities", capabilities=[{"capability": "xbzrle", "state": True}])
    src.cmd("migrate-set-parameters", **{"downtime-limit": 0, "xbzrle-cache-size": 16 << 20})
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{_port(dst)}")
    live = wait_until(lambda: _encoded_or_done(src), 60, "pages encoded against the cache")
    assert live["xbzrle-cache"]["cache-size"] == 16 << 20
    src.cmd("migrate-set-parameters", **{"downtime-limit": 2000})
    done = src.wait_migration()
    assert done["status"] == "completed", done
    assert dst.wait_migration(("completed", "failed"))["status"] == "completed"
    return done


def test_xbzrle_few_bytes_per_page(vms) -> None:
    src = vms("src", *DIRTY)
    src.wait_serial("dirty pattern=")
    dst = vms("dst", *DIRTY, "-S", "-incoming", "tcp:127.0.0.1:0")
    done = _migrate_until_encoded(src, dst)
    at_switchover = src.pmem(RAM)
    assert at_switchover == dst.pmem(RAM)            # byte-equal at switchover
    cache = done["xbzrle-cache"]
    assert set(cache) == {"cache-size", "bytes", "pages", "cache-miss", "cache-miss-rate",
                          "encoding-rate", "overflow"}
    # one word changed per write: an encoded page costs a few dozen bytes, not 4096
    assert cache["pages"] > 0 and cache["bytes"] < cache["pages"] * 100
    assert cache["cache-miss"] > 0 and cache["overflow"] == 0
    ram = done["ram"]
    # pages encoded or unchanged are neither normal nor duplicate
    assert ram["normal-bytes"] == ram["normal"] * 4096
    assert ram["transferred"] < ram["normal-bytes"] + cache["bytes"] + (8 << 20)
    info = src.hmp("info migrate")
    assert f"cache size: {16 << 20} bytes" in info
    assert f"xbzrle pages: {cache['pages']} pages" in info
    assert "xbzrle encoding rate: " in info and "xbzrle overflow: 0" in info
    dst.cmd("cont")                                  # the guest carries on writing
    wait_until(lambda: dst.pmem(RAM, "later.bin") != at_switchover, 20, "destination guest runs")
    assert dst.status() == "running"


def test_xbzrle_whole_page_rewrites_checked_by_the_guest(vms) -> None:
    src = vms("src", *MEMCHECK)
    src.wait_serial("memcheck gen 2 ok")
    dst = vms("dst", *MEMCHECK, "-S", "-incoming", "tcp:127.0.0.1:0")
    done = _migrate_until_encoded(src, dst)
    assert src.pmem(RAM) == dst.pmem(RAM)
    assert done["xbzrle-cache"]["cache-miss"] > 0, done
    dst.cmd("cont")
    out = dst.wait_serial(" ok\r\n", count=2)          # the guest checks every page itself
    assert "FAIL" not in out, out


def test_xbzrle_save_to_file_and_restore(vms, tmp_path: Path) -> None:
    state = tmp_path / "x.state"
    src = vms("src", *MEMCHECK)
    src.wait_serial("memcheck gen 2 ok")
    src.cmd("migrate-set-capabilities", capabilities=[{"capability": "xbzrle", "state": True}])
    src.cmd("migrate", uri=f"file:{state}")
    assert src.wait_migration()["status"] == "completed"
    dst = vms("dst", *MEMCHECK, "-S", "-incoming", f"file:{state}")
    assert dst.wait_migration(("completed", "failed"))["status"] == "completed"
    assert src.pmem(RAM) == dst.pmem(RAM)
    dst.cmd("cont")
    out = dst.wait_serial(" ok\r\n", count=2)
    assert "FAIL" not in out, out
