"""pyvm-lab validate's accuracy: real migrations against the simulation of their traces.

For each workload and run: one calibration (pyvm.lab.validate.calibrate), then for each
policy a recording, ``--migrations`` real migrations and ``--replays`` simulations of
each (pyvm.lab.validate.validate), compared by their medians.  Prints every
validation's table (medians and ranges of both sides), then per workload and policy the
median and range of the errors (predicted / measured - 1) over the runs, and how many
are within the documented targets (time and bytes 10%, downtime 20%).

    flock /tmp/pyvm-bench.lock .venv/bin/python bench/lab_validate.py [--runs 1]
        [--migrations 3] [--replays 5]
        [--workload "start=2 size=16 pattern=1 rate=200"] [--workload linux:dd-tmpfs:mb=8]
        [--policy qemu ...] [--duration 5] [--max-bandwidth 20MB] [--scale-speed]

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
from pyvm.lab.validate import calibrate, report, validate  # noqa: E402

WORKLOADS = ["start=2 size=16 pattern=1 rate=100", "start=2 size=16 pattern=0 rate=100"]
#: the hot/cold guest at rate=200 leaves about as many pages after round 0 as fit in
#: downtime-limit at max-bandwidth: a knife edge (docs/lab.md, section 7); run it with
#: --workload "start=2 size=16 pattern=1 rate=200"
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
    ap.add_argument("--runs", type=int, default=1, help="validations per workload and policy")
    ap.add_argument("--migrations", type=int, default=3, help="real migrations per validation")
    ap.add_argument("--replays", type=int, default=5, help="simulations per real migration")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--max-bandwidth", default="20MB")
    ap.add_argument("--downtime-limit", type=int, default=300)
    ap.add_argument("--timeout", type=float, default=60.0,
                    help="cancel a real migration (and end its simulation) after this long")
    ap.add_argument("--scale-speed", action="store_true")
    args = ap.parse_args()
    workloads, policies = args.workload or WORKLOADS, args.policy or POLICIES
    bw = int(parse_rate(args.max_bandwidth))
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    errors: dict[tuple[str, str], list[dict[str, float]]] = {}
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
                    v = validate(kernel, append, ram, pol, bw, duration=args.duration,
                                 speed=args.scale_speed, downtime_limit_ms=args.downtime_limit,
                                 workload=workload, calibration=cal, timeout=args.timeout,
                                 runs=args.migrations, replays=args.replays,
                                 workdir=os.path.join(tmp, pol))
                    print(report(v), flush=True)
                    errors.setdefault((wl, pol), []).append(v.errors())
    print("\nuptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    summarize("errors of the medians" + (" (trace time scaled by the guest's speed)"
                                         if args.scale_speed else ""), errors)
    return 0


if __name__ == "__main__":
    sys.exit(main())
