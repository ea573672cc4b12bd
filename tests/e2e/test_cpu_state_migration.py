"""The register-torture guest (firmware/torture.s) migrated in the middle of its run: it
put every register pyvm carries to an unusual value, is stopped while it spins, moves
to a second pyvm (over tcp, or through a file), and on the destination compares every
register with what it recorded before the move."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DEBUG_EXIT, ROOT, guest
from tests.vmproc import VmProcess

TORTURE = ["-m", "32M", "-kernel", guest("torture.elf"), "-append", "spin=3",
           "-display", "none", *DEBUG_EXIT]
PASS_STATUS = (0x10 << 1) | 1


def _stopped_mid_run(vms) -> VmProcess:
    src = vms("src", *TORTURE)
    src.wait_serial("torture: set")
    src.cmd("stop")
    assert "torture: check" not in src.serial(), "the guest finished before it was stopped"
    regs = src.hmp("info registers")
    # The situation: each of these is state no plain selector reload would give back.
    for pattern in (r"CR0=00050033 CR2=deadbee0 CR3=00abc000 CR4=00000708",
                    r"ES =1234 00012340 ffffffff 00cf9300",       # unreal: 4 GiB in real-mode form
                    r"SS =0000 00000000 ffffffff 00cf9300",       # null SS in protected mode
                    r"FS =0028 00123450 00054321 0015f300",       # its descriptor is wiped
                    r"GS =0004 00234560 ffffffff 00cf9300",       # from the LDT
                    r"LDT=0030 [0-9a-f]{8} 00000017 00008200",    # its descriptor is wiped
                    r"TR =0038 [0-9a-f]{8} 00000067 00008900",
                    r"DR0=0000000011111110", r"DR7=0000000000000700",
                    r"EFER=0000000000000001",
                    r"FCW=0b7f FSW=1800 \[ST=3\] FTW=f8 MXCSR=00007f80",
                    r"FPR7=c90fdaa22168c235 4abc",                 # first pushed: FP7
                    r"XMM07=f7d5b3916f4d2b09789abcdf01234566",
                    r"EFL=00040cd7"):
        assert re.search(pattern, regs), (pattern, regs)
    return src


def _passes_on(dst: VmProcess, src: VmProcess) -> None:
    assert dst.status() == "paused"
    # Hidden limits and attributes: guest code cannot see them (QEMU's TCG checks no
    # segment limit), so compare the whole register dump of both sides.
    assert dst.hmp("info registers") == src.hmp("info registers")
    dst.cmd("cont")
    assert dst.wait_exit(60) == PASS_STATUS, (dst.serial(), dst.stderr())
    out = dst.serial()
    assert "torture: check" in out and "torture: pass" in out and "FAIL" not in out, out
    assert "torture: check" not in src.serial()


def test_torture_guest_migrated_over_tcp(vms) -> None:
    src = _stopped_mid_run(vms)
    dst = vms("dst", *TORTURE, "-incoming", "tcp:127.0.0.1:0")
    port = dst.cmd("query-migrate")["socket-address"][0]["port"]
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    assert src.wait_migration()["status"] == "completed"
    assert dst.wait_migration(("completed", "failed"))["status"] == "completed", dst.stderr()
    _passes_on(dst, src)


def test_torture_guest_saved_and_restored(vms, tmp_path: Path) -> None:
    src = _stopped_mid_run(vms)
    state = tmp_path / "vm.state"
    src.cmd("migrate", uri=f"file:{state}")
    assert src.wait_migration()["status"] == "completed"
    dst = vms("dst", *TORTURE, "-S", "-incoming", f"file:{state}")
    assert dst.wait_migration(("completed", "failed"))["status"] == "completed", dst.stderr()
    _passes_on(dst, src)


@pytest.mark.slow
def test_torture_guest_passes_unmigrated(vms) -> None:
    """The control: the same run without a migration passes too (the checks are sound)."""
    vm = vms("solo", *TORTURE)
    assert vm.wait_exit(60) == PASS_STATUS, vm.serial()
    assert "torture: pass" in vm.serial()


def test_qemu_analyzer_reads_the_cpu_section(vms, tmp_path: Path) -> None:
    """QEMU's scripts/analyze-migration.py reads the cpu section through its vmdesc."""
    script = next((p for p in (os.environ.get("PYVM_QEMU_ANALYZE_MIGRATION"),
                               str(ROOT / ".cache" / "qemu" / "analyze-migration.py"))
                   if p and os.path.isfile(p)), None)
    if script is None:
        pytest.skip("QEMU's analyze-migration.py not found: run scripts/fetch_qemu_analyzer.py")
    src = _stopped_mid_run(vms)
    state = tmp_path / "vm.state"
    src.cmd("migrate", uri=f"file:{state}")
    assert src.wait_migration()["status"] == "completed"
    r = subprocess.run([sys.executable, script, "-f", str(state)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    sections = json.loads(r.stdout)
    cpu = next(v for k, v in sections.items() if k.startswith("cpu "))
    # es cs ss ds fs gs ldtr tr: QEMU's SegmentCache order, then LDTR and TR.
    assert [int(s.split()[0], 16) for s in cpu["seg_selector"]][:6] == [0x1234, 8, 0, 0x10, 0x28, 4]
    assert int(cpu["seg_base"][4].split()[0], 16) == 0x123450
    assert int(cpu["seg_limit"][4].split()[0], 16) == 0x54321
    assert int(cpu["lstar"].split()[0], 16) == 0xFFFF800012345678
    assert int(cpu["dr"][0].split()[0], 16) == 0x11111110
    assert int(cpu["hflags"].split()[0], 16) & 3 == int(cpu["cpl"].split()[0], 16) == 0


def test_a_cpu_state_that_cannot_be_applied_names_the_field(vms, tmp_path: Path) -> None:
    """A 64-bit vCPU's state offered to a 32-bit one: the load fails naming the field and
    the reason, on stderr and in error-desc."""
    src = vms("src", "-m", "32M", "-kernel", guest("timer-lm.elf"), "-display", "none")
    src.wait_serial("timer")
    state = tmp_path / "vm.state"
    src.cmd("migrate", uri=f"file:{state}")
    assert src.wait_migration()["status"] == "completed"
    dst = vms("dst", "-m", "32M", "-kernel", guest("timer-pm.elf"), "-display", "none",
              "-incoming", "defer")
    dst.cmd("migrate-incoming", uri=f"file:{state}", **{"exit-on-error": False})
    info = dst.wait_migration(("failed", "completed"))
    reason = "field 'wide': vCPU register width differs"
    assert info["status"] == "failed" and reason in info["error-desc"], info
    err = dst.stderr()
    assert f"pyvm: cpu: post_load failed: {reason}" in err, err
    assert "pyvm: error while loading state for instance 0x0 of device 'cpu'" in err, err
