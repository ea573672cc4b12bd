"""Host CPU used by an idle guest (HLT loop woken by a 100 Hz timer).

    .venv/bin/python bench/idle_cpu.py [--seconds 10] [--windows 5] [--hz 100] [--baseline TREE]
                                       [--python-delivery] [--python-idle] [--rounds N]

Boots the ``hello`` guest (it sleeps in HLT between PIT interrupts), lets it settle, then
reads the pyvm process's CPU time (from /proc/PID/task/*/schedstat) over ``--windows`` equal
windows spanning ``--seconds``, and prints the median and spread (min-max) of the share
of one core (target <= 2%).  For scale, a guest that never halts (store-loop) is measured
the same way in the same run.

``--baseline TREE`` also runs the pyvm of another checkout (e.g. a worktree of the
previous commit, with its extensions built), interleaved with this one (baseline, this
tree, baseline, this tree ...), and prints the ratio this tree / baseline of the medians.
``--python-delivery`` makes the baseline this tree with ``PYVM_DELIVERY=python`` (the
Python twins of the native tick path: exception hook and interrupt delivery instead of
pyvm/_delivery.pyx, IN/OUT hooks instead of pyvm/_portio.pyx, the 8259A methods instead
of pyvm/_pic.pyx, the Python run loop instead of the native idle tick of pyvm/_idle.pyx).
``--python-idle`` adds (or makes) a baseline of this tree with ``PYVM_IDLE=python``: every
native path except the idle tick.  With both, the three variants are interleaved and each
baseline gets its ratio.  ``uptime`` is printed before and after (the machine's load).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from pyvm.guests import guest_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of ``pid`` in nanoseconds' precision (the first field
    of /proc/PID/task/TID/schedstat, Documentation/scheduler/sched-stats.rst); utime +
    stime from /proc/PID/stat where schedstats are missing (clock-tick resolution)."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except FileNotFoundError:       # the thread ended meanwhile
                continue
        return total / 1e9
    except (FileNotFoundError, PermissionError, ValueError, IndexError):
        pass
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks       # utime + stime


def measure(tree: str, args: list[str], settle: float, seconds: float, windows: int,
            extra_env: dict[str, str] | None = None) -> list[float]:
    """Share of one core per window, for ``python -m pyvm ARGS`` run from ``tree``."""
    env = dict(os.environ, PYTHONPATH=tree, **(extra_env or {}))
    proc = subprocess.Popen([sys.executable, "-m", "pyvm", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=tree, env=env)
    shares = []
    try:
        time.sleep(settle)
        step = seconds / windows
        c0, t0 = cpu_seconds(proc.pid), time.monotonic()
        for _ in range(windows):
            time.sleep(step)
            c1, t1 = cpu_seconds(proc.pid), time.monotonic()
            shares.append((c1 - c0) / (t1 - t0))
            c0, t0 = c1, t1
    finally:
        proc.terminate()
        proc.wait(10)
    if proc.returncode not in (0, -15, 143):
        raise SystemExit(f"pyvm ended with status {proc.returncode}")
    return shares


def fmt(shares: list[float]) -> str:
    return (f"{statistics.median(shares) * 100:5.2f}% of a core (spread {min(shares) * 100:.2f}-"
            f"{max(shares) * 100:.2f}%, {len(shares)} windows)")


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--windows", type=int, default=5)
    ap.add_argument("--hz", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds with --baseline")
    ap.add_argument("--baseline", help="another checkout of pyvm to compare with")
    ap.add_argument("--python-delivery", action="store_true",
                    help="baseline: this tree with PYVM_DELIVERY=python")
    ap.add_argument("--python-idle", action="store_true",
                    help="baseline: this tree with PYVM_IDLE=python")
    a = ap.parse_args()
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    idle_args = ["-m", "32M", "-kernel", guest_path("hello.elf"), "-append", f"hz={a.hz}",
                 "-serial", "null"]
    trees: list[tuple[str, str, dict[str, str]]] = [("this tree", ROOT, {})]
    if a.python_idle:
        trees.insert(0, ("python idle loop", ROOT, {"PYVM_IDLE": "python"}))
    if a.python_delivery:
        trees.insert(0, ("python twins", ROOT, {"PYVM_DELIVERY": "python"}))
    if not (a.python_idle or a.python_delivery) and a.baseline:
        trees.insert(0, ("baseline", os.path.abspath(a.baseline), {}))
    idle: dict[str, list[float]] = {name: [] for name, _, _ in trees}
    for _ in range(a.rounds if len(trees) > 1 else 1):
        for name, tree, env in trees:
            idle[name] += measure(tree, idle_args, 2.0, a.seconds, a.windows, env)
    busy = measure(ROOT, ["-m", "32M", "-kernel", guest_path("store-loop.elf"), "-append",
                          "start=2 size=4", "-serial", "null"], 2.0, a.seconds / 2, a.windows)
    for name, _, _ in trees:
        print(f"idle guest (HLT, {a.hz} Hz timer), {name}: {fmt(idle[name])}")
    print(f"busy guest (store loop), this tree:   {fmt(busy)}")
    for name, _, _ in trees[:-1]:
        print(f"ratio this tree / {name}="
              f"{statistics.median(idle['this tree']) / statistics.median(idle[name]):.3f}")
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
