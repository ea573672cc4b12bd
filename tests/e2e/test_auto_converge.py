"""auto-converge end to end: the hot guest that plain precopy cannot move at 8 MiB/s
completes once its vCPU is throttled, and the throttle goes when the migration ends."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.hot_guest import HOT_ARGS, ONE_PASS, progress_rate, words_stored
from tests.vmproc import VmProcess
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

#: half of the 8 MiB/s of bench/convergence.py: store-loop's 32 MiB stays hotter than the
#: link even when a loaded host slows the guest down
LINK = 4 << 20


def _pair(tmp: Path, **params: Any) -> tuple[VmProcess, VmProcess, str]:
    dst = VmProcess(tmp, "dst", *HOT_ARGS, "-incoming", "tcp:127.0.0.1:0")
    port = dst.cmd("query-migrate")["socket-address"][0]["port"]
    src = VmProcess(tmp, "src", *HOT_ARGS)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": LINK, **params})
    src.cmd("migrate-set-capabilities",
            capabilities=[{"capability": "auto-converge", "state": True}])
    return src, dst, f"tcp:127.0.0.1:{port}"


def _started(vm: VmProcess) -> None:
    """One whole pass done: all 32 MiB are non-zero, so none goes as a cheap zero page."""
    wait_until(lambda: words_stored(vm) > ONE_PASS, 60, "store-loop's first pass", interval=0.2)


def test_hot_guest_completes_with_auto_converge(tmp_path: Path) -> None:
    src, dst, uri = _pair(tmp_path, **{"cpu-throttle-initial": 50,
                                       "cpu-throttle-increment": 20})
    try:
        _started(src)
        free = progress_rate(src, 1.5)
        src.cmd("migrate", uri=uri)
        peak, throttled, t0 = 0, None, time.monotonic()
        while True:
            info = src.cmd("query-migrate")
            pct = info.get("cpu-throttle-percentage", 0)
            if pct and throttled is None:
                throttled = (pct, progress_rate(src, 1.5))
                continue
            peak = max(peak, pct)
            if info["status"] not in ("setup", "active", "device"):
                break
            assert time.monotonic() - t0 < 150, info
            time.sleep(0.2)
        assert info["status"] == "completed", info
        assert "cpu-throttle-percentage" not in info          # removed at the end
        assert throttled is not None and peak >= 50, (throttled, peak)
        assert info["downtime"] <= 300 * 2, info
        dst.wait_migration(("completed",), timeout=60)
        assert dst.status() == "running"
        w = words_stored(dst)
        wait_until(lambda: words_stored(dst) > w, 30, "store-loop running on the destination")
        # the guest's own counter: at >= 50 % it made at most about half its free progress.
        # A crowded host swings wall-clock rates too, so the free rate is the better of the
        # one before the migration and the one after it, on the destination.
        free = max(free, progress_rate(dst, 1.5))
        assert throttled[1] < 0.8 * free, (free, throttled)
    finally:
        src.close()
        dst.close()


def test_throttle_is_removed_when_the_migration_is_cancelled(tmp_path: Path) -> None:
    src, dst, uri = _pair(tmp_path, **{"cpu-throttle-initial": 70})
    try:
        _started(src)
        src.cmd("migrate", uri=uri)
        def throttling() -> bool:
            info = src.cmd("query-migrate")
            assert info["status"] in ("setup", "active"), info
            return bool(info.get("cpu-throttle-percentage", 0) >= 70)
        wait_until(throttling, 90, "the throttle to start", interval=0.1)
        throttled = progress_rate(src, 1.5)
        assert "\ncpu throttle percentage: " in src.hmp("info migrate").replace("\r\n", "\n")
        src.cmd("migrate_cancel")
        info = src.wait_migration(timeout=60)
        assert info["status"] == "cancelled", info
        assert src.status() == "running"
        after = progress_rate(src, 1.5)
        # 70 % throttled runs at ~0.3 of free speed: free again, it is well above that
        assert after > 1.8 * throttled, (throttled, after)
    finally:
        src.close()
        dst.close()
