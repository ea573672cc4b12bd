"""Host CPU used by an idle guest (HLT loop woken by a 100 Hz timer).

    .venv/bin/python bench/idle_cpu.py [--seconds 5] [--hz 100]

Boots the ``hello`` guest (it sleeps in HLT between PIT interrupts), lets it settle, then
reads the pyvm process's CPU time from /proc over a window.  Prints the share of one core
(target < 5%) and, for scale, the same for a guest that never halts (store-loop) in the
same run: ``ratio=<idle/busy>``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from pyvm.guests import guest_path


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks       # utime + stime


def measure(args: list[str], settle: float, seconds: float) -> float:
    proc = subprocess.Popen([sys.executable, "-m", "pyvm", *args], stdout=subprocess.DEVNULL)
    try:
        time.sleep(settle)
        c0, t0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(seconds)
        c1, t1 = cpu_seconds(proc.pid), time.monotonic()
    finally:
        proc.terminate()
        proc.wait(10)
    return (c1 - c0) / (t1 - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--hz", type=int, default=100)
    a = ap.parse_args()
    idle = measure(["-m", "32M", "-kernel", guest_path("hello.elf"), "-append", f"hz={a.hz}",
                    "-serial", "null"], 2.0, a.seconds)
    busy = measure(["-m", "32M", "-kernel", guest_path("store-loop.elf"), "-append", "start=2 size=4",
                    "-serial", "null"], 2.0, a.seconds)
    print(f"idle guest (HLT, {a.hz} Hz timer): {idle * 100:5.1f}% of a core")
    print(f"busy guest (store loop):        {busy * 100:5.1f}% of a core")
    print(f"ratio={idle / busy:.3f}")


if __name__ == "__main__":
    main()
