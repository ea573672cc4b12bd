"""Guest throughput with dirty tracking on vs. off, measured in one run.

    .venv/bin/python bench/dirty_tracking.py [--size-mib 8] [--iters 40]

Boots the ``store-loop`` guest (every pass stores to every 32-bit word of a RAM range) in
this process three ways and times the same number of passes:

  off     no write hook (the normal state outside migration)
  native  the C-level UC_HOOK_MEM_WRITE callback of pyvm._fastpath
  python  a Python UC_HOOK_MEM_WRITE callback (pyvm.fastpath_py), shown for comparison

Each variant runs ``--repeat`` times and the best time counts.  The last line is
``ratio=<native throughput / off throughput>`` (target >= 0.90).
"""

from __future__ import annotations

import argparse
import time

from pyvm import fastpath_py
from pyvm.config import DebugExitConfig, MachineConfig
from pyvm.fastpath import IMPLEMENTATION, impl, track_writes
from pyvm.guests import guest_path
from pyvm.machine import Machine


def run_once(mode: str, size_mib: int, iters: int) -> float:
    cfg = MachineConfig(ram_size=(size_mib + 4) << 20, kernel=guest_path("store-loop.elf"),
                        append=f"start=2 size={size_mib} iters={iters}", serial=["null"],
                        debug_exit=[DebugExitConfig(0xF4, 4)], start_paused=True)
    m = Machine(cfg)
    trackers = []
    if mode != "off":
        module = impl if mode == "native" else fastpath_py
        for block in m.ram:
            bitmap = module.DirtyBitmap(block.npages)
            for cpu in m.cpus:
                trackers.append(track_writes(cpu.uc, bitmap, block.gpa, block.size, implementation=module))
    m.start()
    t0 = time.perf_counter()
    m.cont()
    code = m.wait()
    elapsed = time.perf_counter() - t0
    m.close()
    if code != 1:
        raise SystemExit(f"store-loop guest ended with status {code}")
    if mode != "off":
        dirty = trackers[0].bitmap.count()
        assert dirty >= size_mib * 256, "the hook missed pages"
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=8)
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    stores = args.size_mib * (1 << 20) // 4 * args.iters
    times = {}
    for mode, iters in (("off", args.iters), ("native", args.iters), ("python", max(1, args.iters // 20))):
        best = min(run_once(mode, args.size_mib, iters) for _ in range(args.repeat if mode != "python" else 1))
        n = args.size_mib * (1 << 20) // 4 * iters
        times[mode] = n / best
        print(f"{mode:>7}: {n / best / 1e6:8.1f} M stores/s  ({n} stores in {best:.2f} s)")
    print(f"fast path: {IMPLEMENTATION}; {stores} stores per timed run")
    print(f"python-hook ratio={times['python'] / times['off']:.3f}")
    print(f"ratio={times['native'] / times['off']:.3f}")


if __name__ == "__main__":
    main()
