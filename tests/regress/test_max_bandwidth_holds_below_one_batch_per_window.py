"""max-bandwidth below 10 MiB/s was exceeded about 2.5 times: a batch of 256 pages
(1 MiB) is more than one 100 ms window's budget, and the limiter waited one window
whatever the overshoot."""

from __future__ import annotations

import time
from pathlib import Path

from tests.vmproc import VmProcess


def test_max_bandwidth_holds_below_one_batch_per_window(tmp_path: Path) -> None:
    bw = 2 << 20
    vm = VmProcess(tmp_path, "src", "-m", "16M", "-kernel", "store-loop", "-append",
                   "size=4 iters=1", "-display", "none", serial=False)
    try:
        # after its one pass the guest has 4 MiB of non-zero pages and halts
        regs = ""
        for _ in range(400):
            regs = vm.hmp("info registers")
            if "HLT=1" in regs:
                break
            time.sleep(0.05)
        assert "HLT=1" in regs, regs
        vm.cmd("migrate-set-parameters", **{"max-bandwidth": bw})
        vm.cmd("migrate", uri=f"file:{tmp_path / 'vm.state'}")
        info = vm.wait_migration(timeout=60)
        assert info["status"] == "completed", info
        sent = info["ram"]["transferred"]
        assert sent > 4 << 20
        # the pages cannot have gone faster than the limit (10 % slack for timing)
        assert info["total-time"] >= 0.9 * sent / bw * 1000, info
    finally:
        vm.close()
