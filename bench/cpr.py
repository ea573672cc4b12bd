"""cpr-reboot cost at two RAM sizes, with and without x-ignore-shared.

    .venv/bin/python bench/cpr.py [--small-mib 64] [--large-mib 4096] [--repeat 3]

A running ``memcheck`` guest (``-append "start=1 size=16"``: 16 MiB of RAM in use) with
its RAM on ``memory-backend-file,share=on`` under /dev/shm is saved in ``cpr-reboot``
mode to a state file; the old process quits; a new process started with the same
arguments plus ``-incoming defer`` sets the same mode and capabilities and loads the
file.  Downtime is wall clock from the ``migrate`` command to the new process's
``query-status`` answering ``running``, so it includes the old process's exit and the
new process's start-up.  Each case runs ``--repeat`` times; the median is printed.

Printed per RAM size: state-file size and downtime with ``x-ignore-shared`` (no guest RAM
in the file: the new process maps the same memory) and without (all non-zero RAM saved).
Last line: ``ratio=<large / small downtime with x-ignore-shared>`` (target <= 1.2: the
cost of cpr-reboot must not grow with RAM).  If /dev/shm cannot hold the large guest
(its RAM file fills as the guest runs, so only the pages in use count, but the check is
for the whole size) the large size is scaled down and the bench says so.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # progress as it runs
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.vmproc import VmProcess  # noqa: E402

from pyvm.guests import guest_path  # noqa: E402

GUEST_APPEND = "start=1 size=16"       # memcheck works over 16 MiB from 1 MiB up
SHM = Path("/dev/shm")


def vm_args(ram_file: Path, size_mib: int, *extra: str) -> list[str]:
    return ["-object", f"memory-backend-file,id=ram0,size={size_mib}M,mem-path={ram_file},share=on",
            "-machine", "memory-backend=ram0", "-kernel", guest_path("memcheck.elf"),
            "-append", GUEST_APPEND, "-display", "none", *extra]


def last_generation(serial: str) -> int:
    """N of the last "memcheck gen N ok" line."""
    gens = [int(line.split()[2]) for line in serial.splitlines() if line.endswith(" ok")]
    return gens[-1] if gens else -1


def wait_status(vm: VmProcess, want: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while vm.status() != want:
        if time.monotonic() > deadline:
            raise AssertionError(f"{vm.name}: status {vm.status()}, expected {want}")
        time.sleep(0.005)


def cpr_cycle(tmp: Path, size_mib: int, ignore_shared: bool) -> tuple[int, float]:
    """One save-quit-restart; returns (state-file bytes, downtime in seconds)."""
    ram = SHM / f"{tmp.name}.ram"
    state = tmp / "vm.state"
    state.unlink(missing_ok=True)
    caps = [{"capability": "x-ignore-shared", "state": ignore_shared}]
    src = VmProcess(tmp, "src", *vm_args(ram, size_mib))
    dst = None
    try:
        src.wait_serial("memcheck gen 1 ok", timeout=300)
        src.cmd("migrate-set-parameters", mode="cpr-reboot")
        src.cmd("migrate-set-capabilities", capabilities=caps)
        last_gen = last_generation(src.serial())
        t0 = time.perf_counter()
        src.cmd("migrate", uri=f"file:{state}")
        info = src.wait_migration(timeout=600)
        assert info["status"] == "completed", info
        src.cmd("quit")
        src.wait_exit(60)
        dst = VmProcess(tmp, "dst", *vm_args(ram, size_mib, "-incoming", "defer"))
        dst.cmd("migrate-set-parameters", mode="cpr-reboot")
        dst.cmd("migrate-set-capabilities", capabilities=caps)
        dst.cmd("migrate-incoming", uri=f"file:{state}")
        wait_status(dst, "running")
        downtime = time.perf_counter() - t0
        # the guest carries on from where it was saved, with its RAM intact
        out = dst.wait_serial(" ok\r\n", timeout=120)
        assert "FAIL" not in out and last_generation(out) > last_gen, (last_gen, out[-300:])
        return state.stat().st_size, downtime
    finally:
        src.close()
        if dst is not None:
            dst.close()
        ram.unlink(missing_ok=True)


def measure(tmp: Path, size_mib: int, ignore_shared: bool, repeat: int) -> tuple[int, float]:
    runs = [cpr_cycle(tmp, size_mib, ignore_shared) for _ in range(repeat)]
    return max(r[0] for r in runs), statistics.median(r[1] for r in runs)


def fit_to_shm(want_mib: int) -> int:
    """The largest size <= want_mib whose RAM file /dev/shm can hold (with 256 MiB spare)."""
    free_mib = shutil.disk_usage(SHM).free >> 20
    size = want_mib
    while size > 64 and size + 256 > free_mib:
        size //= 2
    if size != want_mib:
        print(f"/dev/shm has {free_mib} MiB free: large guest scaled down from {want_mib} to {size} MiB")
    return size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small-mib", type=int, default=64)
    ap.add_argument("--large-mib", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    if not SHM.is_dir():
        sys.exit("bench/cpr.py needs /dev/shm for the shared RAM backend")
    large = fit_to_shm(a.large_mib)
    results: dict[tuple[int, bool], tuple[int, float]] = {}
    with tempfile.TemporaryDirectory(prefix="pyvm-cpr-") as d:
        tmp = Path(d)
        for size in (a.small_mib, large):
            for ignore_shared in (True, False):
                nbytes, down = measure(tmp, size, ignore_shared, a.repeat)
                results[(size, ignore_shared)] = (nbytes, down)
                label = "x-ignore-shared on " if ignore_shared else "x-ignore-shared off"
                print(f"{size:5d} MiB, {label}: state file {nbytes / 1024:9.1f} KiB, "
                      f"downtime {down:6.3f} s (median of {a.repeat})")
    for size in (a.small_mib, large):
        on, off = results[(size, True)], results[(size, False)]
        print(f"{size:5d} MiB: x-ignore-shared saves {(off[0] - on[0]) / 1024:.0f} KiB of state "
              f"and {off[1] - on[1]:.3f} s of downtime ({off[1] / on[1]:.2f}x)")
    kib = results[(large, True)][0] / 1024
    print(f"state file at {large} MiB with x-ignore-shared: {kib:.1f} KiB (target <= 64 KiB)")
    print(f"downtime without x-ignore-shared, {large} / {a.small_mib} MiB: "
          f"{results[(large, False)][1] / results[(a.small_mib, False)][1]:.2f}")
    ratio = results[(large, True)][1] / results[(a.small_mib, True)][1]
    print(f"downtime with x-ignore-shared, {large} / {a.small_mib} MiB (target <= 1.2):")
    print(f"ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
