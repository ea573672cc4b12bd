"""pyvm-lab validate's accuracy: real migrations against the simulation of their traces.

For each workload and run: one calibration (pyvm.lab.validate.calibrate), then for each
policy a recording, a real migration and its simulation.  Prints every run's errors
(predicted / measured - 1), then per workload and policy the median and range, and how
many runs are within the documented targets (time and bytes 10%, downtime 20%).

    flock /tmp/pyvm-bench.lock .venv/bin/python bench/lab_validate.py [--runs 2]
        [--workload "start=2 size=16 pattern=1 rate=200"] [--workload linux:dd-tmpfs:mb=8]
        [--policy qemu ...] [--duration 5] [--max-bandwidth 20MB]

A workload is a dirty.elf command line, or ``linux:`` and a Linux workload
(pyvm.lab.linux_workloads; each of its migrations boots Linux, so it is slow).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pyvm.guests import guest_path  # noqa: E402
from pyvm.lab.link import parse_rate  # noqa: E402
from pyvm.lab.link import LinkModel  # noqa: E402
from pyvm.lab.simulate import simulate_safely  # noqa: E402
from pyvm.lab.validate import Validation, calibrate, report, validate  # noqa: E402
from pyvm.migration.policy import Limits, load_policy  # noqa: E402

WORKLOADS = ["start=2 size=16 pattern=1 rate=200", "start=2 size=16 pattern=0 rate=100"]
POLICIES = ["qemu", "xen-skip", "auto-converge", "hot-cold"]
TARGETS = {"total_time": 0.10, "bytes_sent": 0.10, "downtime": 0.20}


def summarize(title: str, errors: dict[tuple[str, str], list[dict[str, float]]]) -> None:
    print(f"\n{title}\n{'workload':40} {'policy':14} " + " ".join(
        f"{m:>24}" for m in (*TARGETS, "rounds")))
    within = {m: 0 for m in TARGETS}
    total = 0
    for (wl, pol), runs in errors.items():
        cells = []
        for m in (*TARGETS, "rounds"):
            xs = [r[m] * 100 for r in runs if not math.isnan(r[m])]
            cells.append("-" if not xs else
                         f"{np.median(xs):+.0f}% ({min(xs):+.0f}..{max(xs):+.0f})")
        print(f"{wl:40} {pol:14} " + " ".join(f"{c:>24}" for c in cells))
        for r in runs:
            total += 1
            for m, lim in TARGETS.items():
                within[m] += int(abs(r[m]) <= lim)
    print("within target: " + ", ".join(f"{m} {within[m]}/{total}" for m in TARGETS))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", action="append")
    ap.add_argument("--policy", action="append")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--max-bandwidth", default="20MB")
    ap.add_argument("--downtime-limit", type=int, default=300)
    args = ap.parse_args()
    workloads, policies = args.workload or WORKLOADS, args.policy or POLICIES
    bw = int(parse_rate(args.max_bandwidth))
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    errors: dict[tuple[str, str], list[dict[str, float]]] = {}
    unscaled: dict[tuple[str, str], list[dict[str, float]]] = {}
    for run in range(args.runs):
        for wl in workloads:
            linux = wl.startswith("linux:")
            kernel, append = guest_path("dirty.elf"), "" if linux else wl
            workload = wl[len("linux:"):] if linux else ""
            ram = "256M" if linux else "64M"
            with tempfile.TemporaryDirectory(prefix="pyvm-bench-") as tmp:
                cal = calibrate(kernel, append, ram, tmp, 0.5, bw, args.downtime_limit,
                                workload)
                print(f"\n== run {run + 1}, workload {wl}: {cal.text()}", flush=True)
                for pol in policies:
                    v = validate(kernel, append, ram, pol, bw, duration=args.duration, speed=True,
                                 downtime_limit_ms=args.downtime_limit, workload=workload,
                                 calibration=cal, workdir=os.path.join(tmp, pol))
                    print(report(v), flush=True)
                    errors.setdefault((wl, pol), []).append(v.errors())
                    # the same run simulated without scaling the trace by the guest's speed
                    flat = simulate_safely(v.trace, load_policy(pol), LinkModel(cal.line_rate),
                                           Limits(args.downtime_limit / 1e3, float(bw)),
                                           max_time=120.0,
                                           device_bytes=7600, zero=v.measured.zero,
                                           round_cost=cal.round_cost,
                                           switchover_cost=cal.switchover_cost, spread=True,
                                           setup_cost=cal.setup_cost,
                                           zero_age=v.measured.zero_age)
                    unscaled.setdefault((wl, pol), []).append(
                        Validation(v.measured, flat, v.trace).errors())
    print("\nuptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    for title, table in (("trace time scaled by the guest's speed (--scale-speed)", errors),
                         ("not scaled (validate's default)", unscaled)):
        summarize(title, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
