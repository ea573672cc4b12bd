"""postcopy-preempt between real pyvm processes: requested pages on a channel of their own.

The hot memcheck guest (see test_postcopy.py) runs on the destination while its pages are
still arriving; with ``postcopy-preempt`` on both sides the source connects a second
channel to the same address and sends every requested page there.
"""

from __future__ import annotations

import pytest

from tests.conftest import guest
from tests.vmproc import VmProcess
from tests.waiting import wait_until
from pyvm.userfault import unavailable_reason

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=unavailable_reason() or "")

RAM = 32 << 20
HOT = ["-m", "32M", "-kernel", guest("memcheck.elf"), "-append", "start=1 size=16",
       "-display", "none"]
CAPS = [{"capability": "postcopy-ram", "state": True},
        {"capability": "postcopy-preempt", "state": True},
        {"capability": "postcopy-blocktime", "state": True}]


def _start(vms, *dst_extra: str, background: int = 0) -> tuple[VmProcess, VmProcess]:
    src = vms("src", *HOT, "-d", "migration")
    src.wait_serial("memcheck gen 2 ok", timeout=60)
    dst = vms("dst", *HOT, *dst_extra, "-d", "migration", "-incoming", "defer")
    for vm in (src, dst):
        vm.cmd("migrate-set-capabilities", capabilities=CAPS)
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    port = dst.cmd("query-migrate")["socket-address"][0]["port"]
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 4 << 20,
                                         "max-postcopy-bandwidth": background})
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    wait_until(lambda: int(src.cmd("query-migrate").get("ram", {}).get("dirty-sync-count", 0)) >= 2,
               60, "two syncs")
    return src, dst


def _gens(text: str) -> list[int]:
    return [int(line.split()[2]) for line in text.split("\r\n")[:-1]
            if line.startswith("memcheck gen ") and line.endswith(" ok")]


def test_postcopy_preempt_serves_requests_and_the_guest_keeps_its_memory(vms) -> None:
    src, dst = _start(vms, background=4 << 20)
    src.cmd("migrate-start-postcopy")
    done = src.wait_migration(("completed", "failed", "postcopy-paused"), timeout=90)
    assert done["status"] == "completed", done
    dinfo = dst.wait_migration(("completed", "failed", "postcopy-paused"))
    assert dinfo["status"] == "completed", dinfo
    requests = done["ram"]["postcopy-requests"]
    assert requests > 0, done
    # every request was answered on the preempt channel, one page each
    assert (f"migration: postcopy: {requests} page requests, {requests} pages sent on the "
            "preempt channel") in src.stderr(), src.stderr()[-2000:]
    assert dst.status() == "running"
    last_src = max(_gens(src.serial()))
    out = dst.wait_serial(" ok\r\n", count=2, timeout=60)
    assert "FAIL" not in out, out
    gens = _gens(out)
    assert gens and gens[0] == last_src + 1, (last_src, gens)
    # blocktime with preempt: the vCPU waited, but less than the whole postcopy phase
    assert 0 < dinfo["postcopy-blocktime"] <= done["total-time"], (dinfo, done)


@pytest.mark.postcopy_full
def test_postcopy_preempt_ram_equals_the_source(vms) -> None:
    src, dst = _start(vms, "-S")
    src.cmd("migrate-start-postcopy")
    assert src.wait_migration(timeout=90)["status"] == "completed"
    assert dst.wait_migration(("completed", "failed", "postcopy-paused"))["status"] == "completed"
    assert src.pmem(RAM) == dst.pmem(RAM)
    dst.cmd("cont")
    out = dst.wait_serial(" ok\r\n", count=2, timeout=60)
    assert "FAIL" not in out, out


@pytest.mark.postcopy_full
def test_postcopy_preempt_pause_and_recover(vms) -> None:
    """migrate-pause drops both channels; a recovery connects a new preempt channel to the
    migrate-recover address and completes, the guest's check intact."""
    src, dst = _start(vms, background=256 << 10)
    src.cmd("migrate-start-postcopy")
    src.wait_migration(("postcopy-active",), timeout=60)
    wait_until(lambda: src.cmd("query-migrate")["ram"]["postcopy-requests"] > 0, 30, "a request")
    src.cmd("migrate-pause")
    assert src.wait_migration(("postcopy-paused",), timeout=30)["status"] == "postcopy-paused"
    assert dst.wait_migration(("postcopy-paused",), timeout=30)["status"] == "postcopy-paused"
    dst.cmd("migrate-recover", uri="tcp:127.0.0.1:0")
    port = dst.cmd("query-migrate")["socket-address"][0]["port"]
    src.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": 1 << 20})
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}", resume=True)
    done = src.wait_migration(("completed", "postcopy-paused", "failed"), timeout=60)
    assert done["status"] == "completed", (done, dst.stderr()[-2000:])
    assert dst.wait_migration(("completed", "postcopy-paused", "failed"))["status"] == "completed"
    last_src = max(_gens(src.serial()))
    out = dst.wait_serial(" ok\r\n", count=2, timeout=60)
    assert "FAIL" not in out, out
    assert _gens(out)[0] == last_src + 1
    # the destination completed on the preempt channel connected by the recovery: it
    # read that channel to its end (EOS) before completing
    assert "migration: postcopy preempt channel ended: " in dst.stderr(), dst.stderr()[-2000:]


def _mean_wait_ms(vms, name: str, preempt: bool) -> tuple[float, int]:
    """One postcopy of a 2 MiB hot set with background pages at 256 KiB/s: the mean time
    the guest waited per page request (postcopy-blocktime / postcopy-requests)."""
    hot = ["-m", "32M", "-kernel", guest("memcheck.elf"), "-append", "start=1 size=2",
           "-display", "none"]
    caps = [{"capability": "postcopy-ram", "state": True},
            {"capability": "postcopy-blocktime", "state": True}]
    if preempt:
        caps.append({"capability": "postcopy-preempt", "state": True})
    src = vms(f"{name}-src", *hot)
    src.wait_serial("memcheck gen 2 ok", timeout=60)
    dst = vms(f"{name}-dst", *hot, "-incoming", "defer")
    for vm in (src, dst):
        vm.cmd("migrate-set-capabilities", capabilities=caps)
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    port = dst.cmd("query-migrate")["socket-address"][0]["port"]
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 2 << 20,
                                         "max-postcopy-bandwidth": 256 << 10})
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    wait_until(lambda: int(src.cmd("query-migrate").get("ram", {}).get("dirty-sync-count", 0)) >= 2,
               60, "two syncs")
    src.cmd("migrate-start-postcopy")
    done = src.wait_migration(("completed", "failed", "postcopy-paused"), timeout=120)
    assert done["status"] == "completed", done
    info = dst.wait_migration(("completed", "failed", "postcopy-paused"))
    requests = done["ram"]["postcopy-requests"]
    assert requests > 0, done
    src.close()
    dst.close()
    return info["postcopy-blocktime"] / requests, requests


@pytest.mark.postcopy_full
def test_requested_pages_overtake_the_background_queue(vms) -> None:
    """Background pages held back by max-postcopy-bandwidth delay a request on the main
    channel until the next batch; on the preempt channel it goes at once."""
    plain, n_plain = _mean_wait_ms(vms, "plain", preempt=False)
    fast, n_fast = _mean_wait_ms(vms, "preempt", preempt=True)
    print(f"mean wait per request: plain {plain:.1f} ms ({n_plain} requests), "
          f"preempt {fast:.1f} ms ({n_fast} requests)")
    assert fast * 3 < plain, (plain, fast)
