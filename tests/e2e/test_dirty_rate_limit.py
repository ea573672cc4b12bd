"""calc-dirty-rate against guests whose write rate is known, and the dirty-page-rate limit
(set-vcpu-dirty-limit, and the dirty-limit capability of a migration) end to end."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from pyvm.guests import guest_path
from tests.hot_guest import HOT_ARGS, ONE_PASS, progress_rate, words_stored
from tests.vmproc import QmpFailed, VmProcess
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

MiB = 1 << 20
# dirty.elf, uniform: 10000 random page writes a second over 192 MiB of a 256 MiB guest
RANGE_PAGES = 192 * 256
WRITES = 10000


def _expected_mb_s(seconds: float = 1.0) -> float:
    """Distinct pages hit by WRITES*seconds uniform writes over RANGE_PAGES, in MiB/s."""
    n = RANGE_PAGES
    pages = n * (1 - math.exp(-WRITES * seconds / n))
    return pages * 4096 / MiB / seconds


def _hmp(vm: VmProcess, line: str) -> str:
    return vm.hmp(line).replace("\r\n", "\n")       # the monitor's line ends


def _measure(vm: VmProcess, **args: object) -> dict:
    vm.cmd("calc-dirty-rate", **args)
    return wait_until(lambda: (lambda i: i if i["status"] == "measured" else None)(
        vm.cmd("query-dirty-rate")), 30, "the measurement", interval=0.05)


@pytest.fixture(scope="module")
def dirty_guest(tmp_path_factory: pytest.TempPathFactory):
    vm = VmProcess(tmp_path_factory.mktemp("dr"), "dr", "-m", "256M", "-kernel",
                   guest_path("dirty.elf"), "-append", "start=16 size=192 rate=100",
                   "-display", "none")
    vm.wait_serial("dirty pattern=0", timeout=60)
    yield vm
    vm.close()


def test_unstarted_shape(tmp_path: Path) -> None:
    vm = VmProcess(tmp_path, "idle", "-m", "16M", "-kernel", guest_path("hello.elf"),
                   "-display", "none")
    try:
        assert vm.cmd("query-dirty-rate") == {
            "status": "unstarted", "start-time": 0, "calc-time": 0, "calc-time-unit": "second",
            "sample-pages": 0, "mode": "page-sampling"}
        assert vm.cmd("query-vcpu-dirty-limit") == []
        assert "Dirty rate: (not ready)" in _hmp(vm, "info dirty_rate")
        assert _hmp(vm, "info vcpu_dirty_limit") == "Dirty page limit not enabled!\n"
    finally:
        vm.close()


@pytest.mark.parametrize("args", [
    {"calc-time": 1, "mode": "dirty-bitmap"},
    {"calc-time": 1000, "calc-time-unit": "millisecond", "sample-pages": 16384},
])
def test_dirty_rate_within_20_percent_of_the_known_rate(dirty_guest: VmProcess, args) -> None:
    info = _measure(dirty_guest, **args)
    want = _expected_mb_s()
    assert abs(info["dirty-rate"] - want) <= 0.2 * want, (info, want)
    assert info["calc-time-unit"] == "second" and info["calc-time"] == 1
    ms = dirty_guest.cmd("query-dirty-rate", **{"calc-time-unit": "millisecond"})
    assert ms["calc-time-unit"] == "millisecond" and 1000 <= ms["calc-time"] < 1500, ms
    assert info["sample-pages"] == (0 if args.get("mode") == "dirty-bitmap" else 16384)


@pytest.mark.parametrize("args, text", [
    ({"calc-time": 0}, "Calculation time is out of range [50ms, 60000ms]."),
    ({"calc-time": 49, "calc-time-unit": "millisecond"},
     "Calculation time is out of range [50ms, 60000ms]."),
    ({"calc-time": 61}, "Calculation time is out of range [50ms, 60000ms]."),
    ({"calc-time": 1, "mode": "dirty-ring"},
     "mode dirty-ring is not enabled, use other method instead."),
    ({"calc-time": 1, "sample-pages": 127}, "sample-pages is out of range[128, 16384]."),
    ({"calc-time": 1, "sample-pages": 512, "mode": "dirty-bitmap"},
     "sample-pages is used only in page-sampling mode"),
])
def test_refusals_are_qemus(dirty_guest: VmProcess, args: dict, text: str) -> None:
    with pytest.raises(QmpFailed) as err:
        dirty_guest.cmd("calc-dirty-rate", **args)
    assert str(err.value) == text


def test_hmp_calc_and_info(dirty_guest: VmProcess) -> None:
    assert _hmp(dirty_guest, "calc_dirty_rate -b 1") == (
        "Starting dirty rate measurement with period 1 seconds\n"
        "[Please use 'info dirty_rate' to check results]\n")
    assert _hmp(dirty_guest, "calc_dirty_rate -b 1").startswith("Error: the dirty rate is "
                                                              "already being measured.")
    wait_until(lambda: "Status: measured" in _hmp(dirty_guest, "info dirty_rate"), 30,
               "the measurement")
    out = _hmp(dirty_guest, "info dirty_rate")
    assert "Mode: dirty-bitmap\n" in out and "Period: 1 (sec)\n" in out
    assert "Sample Pages" not in out
    assert _hmp(dirty_guest, "calc_dirty_rate 0") == "Incorrect period length specified!\n"
    assert _hmp(dirty_guest, "calc_dirty_rate -r -b 1") == (
        "Either dirty ring or dirty bitmap can be specified!\n")


def test_vcpu_dirty_limit_slows_the_vcpu_until_under(tmp_path: Path) -> None:
    vm = VmProcess(tmp_path, "hot", *HOT_ARGS)
    try:
        wait_until(lambda: words_stored(vm) > 0, 30, "store-loop running")
        free = progress_rate(vm, 1.5) * 4 / MiB                    # MiB/s the guest writes
        limit = max(1, int(free / 4))
        with pytest.raises(QmpFailed, match="^incorrect cpu index specified$"):
            vm.cmd("set-vcpu-dirty-limit", **{"dirty-rate": limit, "cpu-index": 1})
        vm.cmd("set-vcpu-dirty-limit", **{"dirty-rate": limit})
        wait_until(lambda: 0 < vm.cmd("query-vcpu-dirty-limit")[0]["current-rate"] <= limit,
                   30, "the vCPU under its limit", interval=0.2)
        limited = progress_rate(vm, 2.0) * 4 / MiB
        assert limited <= 1.5 * limit + 0.5 and limited < 0.6 * free, (free, limit, limited)
        assert _hmp(vm, "info vcpu_dirty_limit").startswith(
            f"vcpu[0], limit rate {limit} (MB/s), current rate ")
        assert _hmp(vm, "cancel_vcpu_dirty_limit") == (
            "[Please use 'info vcpu_dirty_limit' to query dirty limit for virtual CPU]\n")
        assert vm.cmd("query-vcpu-dirty-limit") == []
        after = progress_rate(vm, 1.5) * 4 / MiB
        assert after > 1.5 * limited, (limited, after)
    finally:
        vm.close()


def test_hot_guest_completes_with_the_dirty_limit_capability(tmp_path: Path) -> None:
    dst = VmProcess(tmp_path, "dst", *HOT_ARGS, "-incoming", "tcp:127.0.0.1:0")
    port = dst.cmd("query-migrate")["socket-address"][0]["port"]
    src = VmProcess(tmp_path, "src", *HOT_ARGS)
    try:
        src.cmd("migrate-set-parameters", **{"max-bandwidth": 4 * MiB, "vcpu-dirty-limit": 1,
                                             "x-vcpu-dirty-limit-period": 500})
        src.cmd("migrate-set-capabilities",
                capabilities=[{"capability": "dirty-limit", "state": True}])
        wait_until(lambda: words_stored(src) > ONE_PASS, 60, "store-loop's first pass",
                   interval=0.2)
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        limited, t0 = [], time.monotonic()
        while True:
            info = src.cmd("query-migrate")
            lim = src.cmd("query-vcpu-dirty-limit")
            if lim:
                limited.append(lim[0]["limit-rate"])
                with pytest.raises(QmpFailed, match="^can't cancel dirty page rate limit "
                                                    "while migration is running$"):
                    src.cmd("cancel-vcpu-dirty-limit")
            if info["status"] not in ("setup", "active", "device"):
                break
            assert time.monotonic() - t0 < 150, info
            time.sleep(0.2)
        assert info["status"] == "completed", info
        assert limited and set(limited) == {1}
        assert src.cmd("query-vcpu-dirty-limit") == []          # removed at the end
        dst.wait_migration(("completed",), timeout=60)
        w = words_stored(dst)
        wait_until(lambda: words_stored(dst) > w, 30, "store-loop running on the destination")
    finally:
        src.close()
        dst.close()
