#!/usr/bin/env python3
"""Seconds from start to the busybox prompt: pyvm next to QEMU's TCG, same kernel.

    bench/linux_boot.py [--runs N] [--idle SECONDS] [--no-qemu] [--python-delivery]
                        [--python-idle]

Boots Debian 12's kernel and the initramfs of pyvm-linux-guest (pyvm/linux_guest.py) with
``-m 512M -append console=ttyS0`` in pyvm and in Debian's ``qemu-system-x86_64 -accel
tcg`` (package qemu-system-x86, installed here with apt-get when missing), alternating the
two, N times each.  For each run: wall-clock seconds from process start to the prompt on
the serial port, then the CPU share (user + system time of the process over wall time)
while the guest sits idle at the prompt.  Prints medians with min..max and pyvm/QEMU.
``--python-delivery`` adds a third variant, ``pyvm-py``: pyvm with ``PYVM_DELIVERY=python``
(the Python twins of the native delivery, IN/OUT hooks and 8259A hot paths: the tick path
as it was before them), interleaved with the others, and prints pyvm/pyvm-py.
``--python-idle`` adds ``pyvm-pyidle``: pyvm with ``PYVM_IDLE=python`` (every native path
but the idle tick of pyvm/_idle.pyx), and prints pyvm/pyvm-pyidle.  The CPU time is read
from /proc/PID/task/*/schedstat (nanoseconds; bench/idle_cpu.py's reader).  ``uptime`` is
printed before and after.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from pyvm import linux_guest  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from idle_cpu import cpu_seconds  # noqa: E402

QEMU = "qemu-system-x86_64"
RAM = "512M"


def ensure_qemu() -> str | None:
    if shutil.which(QEMU) is None:
        print("bench: installing qemu-system-x86 (Debian's QEMU) with apt-get", file=sys.stderr)
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(sudo + ["apt-get", "install", "-y", "-qq", "qemu-system-x86"], env=env,
                       stdout=subprocess.DEVNULL, check=False)
    path = shutil.which(QEMU)
    if path is None:
        return None
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0] if out else path


def command(which: str, kernel: Path, initrd: Path, ram: str = RAM,
            serial: str | None = "stdio") -> list[str]:
    """The pyvm or QEMU command line booting the guest; ``serial=None`` leaves out -serial."""
    common = ["-m", ram, "-kernel", str(kernel), "-initrd", str(initrd),
              "-append", linux_guest.CMDLINE, "-display", "none"]
    common += ["-serial", serial] if serial else []
    if which == "pyvm":
        return [str(ROOT / ".venv" / "bin" / "python"), "-m", "pyvm", *common]
    return [QEMU, "-accel", "tcg", "-monitor", "none", "-no-reboot", *common]


def one_run(which: str, kernel: Path, initrd: Path, idle_s: float,
            timeout: float = 600) -> tuple[float, float]:
    start = time.monotonic()
    env = dict(os.environ)
    if which == "pyvm-py":
        env["PYVM_DELIVERY"] = "python"
    if which == "pyvm-pyidle":
        env["PYVM_IDLE"] = "python"
    proc = subprocess.Popen(command("pyvm" if which.startswith("pyvm") else which, kernel, initrd),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, cwd=ROOT, env=env)
    assert proc.stdout is not None
    out = b""
    prompt = linux_guest.PROMPT.encode()
    try:
        while prompt not in out:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"{which} exited before the prompt: {out[-300:]!r}")
            out += chunk
            if time.monotonic() - start > timeout:
                raise RuntimeError(f"{which}: no prompt within {timeout} s")
        boot_s = time.monotonic() - start
        c0, t0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(idle_s)          # the quantity measured is the CPU used while idle
        share = (cpu_seconds(proc.pid) - c0) / (time.monotonic() - t0)
        return boot_s, share
    finally:
        proc.kill()
        proc.wait()


def summary(xs: list[float]) -> str:
    return f"{statistics.median(xs):7.2f}  ({min(xs):.2f}..{max(xs):.2f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--idle", type=float, default=5.0, help="seconds of idle CPU measurement")
    ap.add_argument("--no-qemu", action="store_true")
    ap.add_argument("--python-delivery", action="store_true",
                    help="also pyvm with PYVM_DELIVERY=python (the tick path's Python twins)")
    ap.add_argument("--python-idle", action="store_true",
                    help="also pyvm with PYVM_IDLE=python (the Python idle loop alone)")
    args = ap.parse_args()
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    kernel, initrd = linux_guest.fetch(linux_guest.DEFAULT_DIR)
    qemu = None if args.no_qemu else ensure_qemu()
    variants = ((["pyvm-py"] if args.python_delivery else [])
                + (["pyvm-pyidle"] if args.python_idle else []) + ["pyvm"] + (["qemu"] if qemu else []))
    boot: dict[str, list[float]] = {v: [] for v in variants}
    idle: dict[str, list[float]] = {v: [] for v in variants}
    for i in range(args.runs):
        for v in variants if i % 2 == 0 else variants[::-1]:      # interleaved
            b, s = one_run(v, kernel, initrd, args.idle)
            boot[v].append(b)
            idle[v].append(s)
            print(f"run {i + 1} {v:11s} prompt after {b:6.2f} s, idle CPU {100 * s:5.1f} %",
                  flush=True)
    print(f"\nkernel {(linux_guest.DEFAULT_DIR / 'VERSION').read_text().strip()}, -m {RAM}, "
          f"{args.runs} runs each, median (min..max)")
    if qemu:
        print(f"baseline: {qemu}, -accel tcg")
    for v in variants:
        print(f"{v:11s} seconds to prompt {summary(boot[v])}   idle CPU % "
              f"{summary([100 * s for s in idle[v]])}")
    if args.python_delivery:
        print(f"pyvm/pyvm-py time to prompt: "
              f"{statistics.median(boot['pyvm']) / statistics.median(boot['pyvm-py']):.2f}, "
              f"idle CPU: {statistics.median(idle['pyvm']) / statistics.median(idle['pyvm-py']):.2f}")
    if args.python_idle:
        print(f"pyvm/pyvm-pyidle time to prompt: "
              f"{statistics.median(boot['pyvm']) / statistics.median(boot['pyvm-pyidle']):.2f}, "
              f"idle CPU: {statistics.median(idle['pyvm']) / statistics.median(idle['pyvm-pyidle']):.2f}")
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    if qemu:
        ratio = statistics.median(boot["pyvm"]) / statistics.median(boot["qemu"])
        print(f"pyvm/QEMU time to prompt: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
