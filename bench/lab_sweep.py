"""Simulated migrations per second: a pyvm-lab sweep on Dask vs. one core in-process.

    .venv/bin/python bench/lab_sweep.py [--migrations 10000] [--workers 2] [--baseline 1000]

Builds a grid of the five shipped policies x four synthetic 32 MiB workloads x five
links x start times, enough cells for ``--migrations`` simulated migrations.  First, as
the baseline in the same run, the first ``--baseline`` cells run serially in this
process (one core); then all cells run on a fresh Dask LocalCluster of ``--workers``
single-threaded processes (timed without and with the cluster's start-up).  Each is repeated
``--repeat`` times, interleaved; medians and spread are printed, and the last line is
``rate=<migrations/s on the cluster> ratio=<cluster rate / one-core rate>``.  The CPU
time per migration, in-process and summed over the workers, is printed too: on a
machine that other work shares it says more than the wall-clock rates.
"""

from __future__ import annotations

import argparse
import statistics
import time

from pyvm.lab.sweep import dask_client, grid, run_cells, run_sweep
from pyvm.migration.policy import BUILTIN_POLICIES, Limits

WORKLOADS = ["uniform:ram=32M,seconds=4,rate=4000", "zipf:ram=32M,seconds=4,rate=15000",
             "sweep:ram=32M,seconds=4,rate=3000", "phases:ram=32M,seconds=4,rate=8000"]
LINKS = ["10Gbit", "1Gbit", "500Mbit", "200Mbit,rtt=10ms", "100Mbit,rtt=20ms,loss=0.01"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--migrations", type=int, default=10000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--baseline", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    per_start = len(BUILTIN_POLICIES) * len(WORKLOADS) * len(LINKS)
    starts = -(-args.migrations // per_start)
    cells = grid(list(BUILTIN_POLICIES), WORKLOADS, LINKS, starts)[:args.migrations]
    # the baseline takes every k-th cell so that it sees the same mix of policies/links
    step = max(1, len(cells) // args.baseline)
    sample = cells[::step][:args.baseline]
    limits = Limits()
    one, many, many_cold, boot, cpu_one, cpu_many = [], [], [], [], [], []
    for _ in range(args.repeat):
        t, c = time.perf_counter(), time.process_time()
        run_cells(sample, limits)
        one.append(len(sample) / (time.perf_counter() - t))
        cpu_one.append((time.process_time() - c) / len(sample) * 1e3)
        t0 = time.perf_counter()
        with dask_client(workers=args.workers) as client:
            before = client.run(time.process_time)
            t1 = time.perf_counter()
            rows = run_sweep(cells, limits, client=client)
            t2 = time.perf_counter()
            after = client.run(time.process_time)
        boot.append(t1 - t0)
        many.append(len(rows) / (t2 - t1))
        many_cold.append(len(rows) / (t2 - t0))
        cpu_many.append(sum(after[w] - before[w] for w in after) / len(rows) * 1e3)
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    print(f"grid: {len(cells)} migrations ({len(BUILTIN_POLICIES)} policies x "
          f"{len(WORKLOADS)} workloads x {len(LINKS)} links x {starts} starts); "
          f"outcomes {statuses}")
    print(f"one core in-process ({len(sample)} cells): median {statistics.median(one):.0f}/s "
          f"(min {min(one):.0f}, max {max(one):.0f})")
    print(f"Dask LocalCluster, {args.workers} workers ({len(cells)} cells): "
          f"median {statistics.median(many):.0f}/s (min {min(many):.0f}, max {max(many):.0f}); "
          f"with the cluster's start-up (median {statistics.median(boot):.1f} s) "
          f"{statistics.median(many_cold):.0f}/s")
    print(f"CPU time per migration: in-process median {statistics.median(cpu_one):.2f} ms, "
          f"in the workers median {statistics.median(cpu_many):.2f} ms "
          "(wall-clock rates depend on what else the cores run; these do less)")
    print(f"rate={statistics.median(many):.0f} "
          f"ratio={statistics.median(many) / statistics.median(one):.2f}")


if __name__ == "__main__":
    main()
