"""What running a policy costs the precopy engine per round, against the sync it follows.

    .venv/bin/python bench/lab_engine.py [--ram 4G] [--repeat 15]

Per round the engine syncs the dirty bitmap (``bitmap_to_indices`` per block: the
baseline, measured in the same run) and then, since policies, builds the round state and
asks the policy (``PolicyRunner.decide``) and splits its answer per block
(``PolicyRunner.plan``).  This times both on a RAM of ``--ram`` with 5% of the pages
dirty, for QEMU's default policy and for two that answer with page arrays, interleaved;
it prints medians, the spread (min..max) and the ratio to the baseline.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from pyvm.fastpath import bitmap_to_indices
from pyvm.lab.workloads import parse_size
from pyvm.migration.control.policy_runner import PolicyRunner
from pyvm.migration.policy import Limits, LinkEstimate, load_policy


class _Block:
    def __init__(self, name: str, npages: int) -> None:
        self.name, self.gpa, self.npages = name, 0, npages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ram", default="4G")
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    npages = parse_size(args.ram) // 4096
    block = _Block("pc.ram", npages)
    rng = np.random.default_rng(1)
    dirty = np.zeros(npages, dtype=np.bool_)
    dirty[rng.choice(npages, npages // 20, replace=False)] = True
    words = np.packbits(dirty, bitorder="little").view(np.uint64).copy()
    times: dict[str, list[float]] = {"sync (baseline)": []}
    runners = {}
    for name in ("qemu", "xen-skip", "hot-cold"):
        runner = PolicyRunner(load_policy(name), [block], Limits(), LinkEstimate(1e9))
        runner.policy.start(runner.setup)
        runners[name] = runner
        times[name] = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        idx = bitmap_to_indices(words, npages)
        times["sync (baseline)"].append(time.perf_counter() - t0)
        pending = [(block, idx)]
        for name, runner in runners.items():
            t0 = time.perf_counter()
            decision = runner.decide(pending, [words], 1e8)
            if not decision.stop_and_copy:
                runner.plan(decision, pending)
            times[name].append(time.perf_counter() - t0)
            runner.round = 1 if name == "qemu" else runner.round + 1
    base = statistics.median(times["sync (baseline)"])
    print(f"RAM {args.ram} = {npages} pages, {npages // 20} dirty; {args.repeat} rounds each")
    print(f"{'per round':24} {'median ms':>10} {'min..max ms':>16} {'x sync':>7}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:24} {med * 1e3:10.2f} {min(ts) * 1e3:7.2f}..{max(ts) * 1e3:<8.2f} "
              f"{med / base:7.2f}")


if __name__ == "__main__":
    main()
