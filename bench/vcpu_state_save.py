"""Saving a vCPU's state on the run loop, alone and beside a busy Python thread.

    .venv/bin/python bench/vcpu_state_save.py [--samples 40] [--rounds 3]

A migration's switchover saves each vCPU (``pyvm.cpu_state.save_cpu``) on the run loop.
Most of its register reads are ctypes calls into Unicorn, and a ctypes call lets go of
the interpreter lock; getting it back can take up to the interpreter's switch interval
(5 ms) when another thread of the process wants the lock.  This bench boots
``dirty.elf`` in-process and times, on the loop, the eleven MSR reads of ``save_cpu``
and a whole save, register by register through Unicorn's binding
(``save_cpu_per_register``, what ``save_cpu`` did before) and in one batch that keeps
the lock (``save_cpu``, :mod:`pyvm.cpu_regs_batch`): with no other busy thread
("quiet"), and with one thread spinning in Python ("spinning"), interleaved round by
round.  It prints medians, spreads (min-max), the 90th percentile and how many
took over 5 ms, the spinning / quiet ratio of each, and
every median against the register-by-register quiet baseline.  The reads run on the
loop only: read from another thread while the vCPU runs, Unicorn's MSR read borrows the
guest's ECX/EAX/EDX and corrupts it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Callable

from pyvm.config import MachineConfig
from pyvm.cpu_state import MSRS, CpuState, save_cpu, save_cpu_per_register
from pyvm.guests import guest_path
from pyvm.machine import Machine


def _sample(m: Machine, fn: Callable[[], None], n: int) -> list[float]:
    """``n`` timings of ``fn`` on the run loop, in milliseconds."""
    def timed() -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    out = []
    for _ in range(n):
        out.append(float(m.run_on_loop(timed, timeout=10)))
        time.sleep(0.01)
    return out


def _fmt(xs: list[float]) -> str:
    p90 = statistics.quantiles(xs, n=10)[-1]
    slow = sum(x > 5.0 for x in xs)
    return (f"{statistics.median(xs):7.3f} ms ({min(xs):.3f}-{max(xs):.3f}, p90 {p90:.3f}, "
            f"{slow} of {len(xs)} over 5 ms)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=40, help="timings per variant and round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    args = ap.parse_args()
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    m = Machine(MachineConfig(ram_size=64 << 20, kernel=guest_path("dirty.elf"),
                              append="start=2 size=16 rate=100 pattern=1", serial=["null"]))
    m.start()
    cpu = m.cpus[0]
    st = CpuState(cpu)

    def msrs() -> None:
        for _, index in MSRS:
            cpu.uc.msr_read(index)

    def per_register() -> None:
        save_cpu_per_register(cpu, st)

    def batch() -> None:
        save_cpu(cpu, st)

    variants = (("11 MSR reads", msrs), ("per-register", per_register), ("batch", batch))

    results: dict[tuple[str, str], list[float]] = {}
    stop = threading.Event()
    try:
        time.sleep(1.0)                                      # the guest is writing
        for _ in range(args.rounds):
            for variant in ("quiet", "spinning"):
                spinner = None
                if variant == "spinning":
                    stop.clear()
                    spinner = threading.Thread(target=_spin, args=(stop,), name="spin")
                    spinner.start()
                try:
                    for what, fn in variants:
                        results.setdefault((what, variant), []).extend(
                            _sample(m, fn, args.samples))
                finally:
                    if spinner is not None:
                        stop.set()
                        spinner.join()
    finally:
        m.request_exit(0)
        m.close()
    print(f"switch interval {sys.getswitchinterval() * 1e3:.1f} ms; {os.cpu_count()} CPUs")
    baseline = statistics.median(results[("per-register", "quiet")])
    for what, _ in variants:
        quiet, spinning = results[(what, "quiet")], results[(what, "spinning")]
        ratio = statistics.median(spinning) / statistics.median(quiet)
        print(f"{what:13s} quiet    {_fmt(quiet)}  "
              f"vs per-register quiet {statistics.median(quiet) / baseline:.2f}")
        print(f"{what:13s} spinning {_fmt(spinning)}  spinning/quiet={ratio:.2f}  "
              f"vs per-register quiet {statistics.median(spinning) / baseline:.2f}")
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    return 0


def _spin(stop: threading.Event) -> None:
    n = 0
    while not stop.is_set():
        n += 1


if __name__ == "__main__":
    sys.exit(main())
