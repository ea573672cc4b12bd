"""Guest throughput with dirty tracking on vs. off, measured in one run.

    .venv/bin/python bench/dirty_tracking.py [--size-mib 8] [--iters 40] [--rounds 5] [--sync-ms 0,100,20]
                                             [--migration] [--python-hook]
                                             [--linux] [--linux-only] [--linux-mib 32]
                                             [--migration-only]

Boots the ``store-loop`` guest (every pass stores to every 32-bit word of a RAM range) in
this process and times the same number of passes per variant:

  off      no tracking (the normal state outside migration)
  tlb      the vCPUs' TLB fill marks the page at the first store after each sync
           (pyvm.tlb_tracking, what migration uses)
  host-wp  host write-protect: userfaultfd (asynchronous) + PAGEMAP_SCAN (the first fallback)
  hook     the C-level UC_HOOK_MEM_WRITE callback of pyvm._fastpath (the last fallback)
  python   a Python UC_HOOK_MEM_WRITE callback (pyvm.fastpath_py), with --python-hook

For each ``--sync-ms`` value a thread takes the dirty bitmap every that many milliseconds
while the guest runs, on the vCPU loop between slices as precopy does (``run_on_loop``);
0 = never.
Variants are interleaved (off, tlb, host-wp, hook, off, tlb, ...) ``--rounds`` times, so
a change in the machine's load hits all of them alike; each line gives the median and the
spread (min-max) of the throughput, and ``ratio`` is median(tracked) / median(off).

With ``--migration`` it also live-migrates a running store-loop guest between two pyvm
processes over a unix socket, once per method (the TLB fill; host write-protect and the
write hook, forced with PYVM_DIRTY_TRACKING=host-wp and =hook), interleaved, and prints
the median total time and downtime of each.

With ``--linux`` (``--linux-only``: that alone) it also boots Debian's kernel with the
busybox initramfs of pyvm-linux-guest in this process and, at the shell, times a
memory-writing workload (``dd`` of ``--linux-mib`` MiB from /dev/zero into a file on the
initramfs, i.e. fresh page-cache pages, then ``rm``, four times) with TLB tracking, with
host write-protect tracking (the bitmap taken every 100 ms, as precopy does) and without,
alternating on the same running guest, ``--rounds`` times each; each ratio is
median(tracked) / median(off) of the workload's throughput.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from typing import Any, Callable

from unicorn import unicorn_const as uc_const

from pyvm import fastpath_py
from pyvm.config import DebugExitConfig, MachineConfig
from pyvm.fastpath import IMPLEMENTATION, impl, track_host_writes, track_writes
from pyvm.guests import guest_path
from pyvm.machine import Machine
from pyvm.tlb_tracking import track_tlb_writes


def run_once(mode: str, size_mib: int, iters: int, sync_ms: int) -> tuple[float, int]:
    """Seconds for ``iters`` passes, and how many pages the syncs reported in total."""
    cfg = MachineConfig(ram_size=(size_mib + 4) << 20, kernel=guest_path("store-loop.elf"),
                        append=f"start=2 size={size_mib} iters={iters}", serial=["null"],
                        debug_exit=[DebugExitConfig(0xF4, 4)], start_paused=True)
    m = Machine(cfg)
    block = next(iter(m.ram))
    trackers: list[Any] = []
    bitmap = block.dirty
    if mode == "host-wp":
        tr = track_host_writes(bitmap, block.host_address, block.size)
        if tr is None:
            raise SystemExit("host write-protect is not available here (userfaultfd WP_ASYNC)")
        trackers.append(tr)
    elif mode in ("hook", "python"):
        module = impl if mode == "hook" else fastpath_py
        bitmap = module.DirtyBitmap(block.npages)
        for cpu in m.cpus:
            trackers.append(track_writes(cpu.uc, bitmap, block.gpa, block.size, implementation=module))
    reported = [0]
    stop = threading.Event()

    def take() -> Any:
        return bitmap.fetch_and_clear()

    def syncer() -> None:
        while not stop.wait(sync_ms / 1000.0):
            try:
                words = m.run_on_loop(take, timeout=2)
            except TimeoutError:
                continue
            reported[0] += int(fastpath_py.bitmap_to_indices(words, block.npages).size)

    sync_thread = threading.Thread(target=syncer, name="bench-sync") if sync_ms > 0 else None
    m.start()
    if mode == "tlb":
        tlb = m.run_on_loop(lambda: track_tlb_writes([cpu.uc for cpu in m.cpus], [block]))
        if tlb is None:
            raise SystemExit("TLB tracking is not available here (extension or Unicorn layout)")
        trackers.append(tlb)
    t0 = time.perf_counter()
    m.cont()
    if sync_thread:
        sync_thread.start()
    code = m.wait()
    elapsed = time.perf_counter() - t0
    stop.set()
    if sync_thread:
        sync_thread.join()
    for t in trackers:
        if hasattr(t, "detach"):
            t.detach()          # the loop has ended: nothing runs the engines any more
    last = bitmap.fetch_and_clear()
    m.close()
    if code != 1:
        raise SystemExit(f"store-loop guest ended with status {code}")
    if mode != "off":
        pages = int(fastpath_py.bitmap_to_indices(last, block.npages).size)
        assert reported[0] + pages >= size_mib * 256, "tracking missed pages"
    return elapsed, reported[0]


def summary(values: list[float]) -> str:
    med = statistics.median(values)
    return f"{med:7.1f} M stores/s  (spread {min(values):.1f}-{max(values):.1f}, n={len(values)})"


def bench_guest(args: argparse.Namespace) -> None:
    stores = args.size_mib * (1 << 20) // 4 * args.iters
    modes = ["off", "tlb", "host-wp", "hook"]
    print(f"fast path: {IMPLEMENTATION}; store-loop over {args.size_mib} MiB, {args.iters} passes "
          f"= {stores} stores per run; {args.rounds} interleaved rounds")
    for sync_ms in args.sync_ms:
        rates: dict[str, list[float]] = {m: [] for m in modes}
        syncs: dict[str, list[int]] = {m: [] for m in modes}
        for _ in range(args.rounds):
            for mode in modes:
                elapsed, rep = run_once(mode, args.size_mib, args.iters, sync_ms)
                rates[mode].append(stores / elapsed / 1e6)
                syncs[mode].append(rep)
        label = f"sync every {sync_ms} ms" if sync_ms else "no sync during the run"
        print(f"-- {label}")
        off = statistics.median(rates["off"])
        for mode in modes:
            line = f"{mode:>8}: {summary(rates[mode])}"
            if mode != "off":
                line += f"  ratio={statistics.median(rates[mode]) / off:.3f}"
                if sync_ms:
                    line += f"  pages reported/run {int(statistics.median(syncs[mode]))}"
            print(line)
    if args.python_hook:
        iters = max(1, args.iters // 20)
        n = args.size_mib * (1 << 20) // 4 * iters
        elapsed, _ = run_once("python", args.size_mib, iters, 0)
        print(f"  python: {n / elapsed / 1e6:7.1f} M stores/s (one run, {iters} passes)")


# -- live migration of a store-heavy guest -------------------------------------------------------
def migrate_once(method: str, size_mib: int, tmpdir: str) -> tuple[float, float, int]:
    """(total-time s, downtime s, dirty syncs) of one unix-socket live migration."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    sys.path[:0] = [os.path.join(root, "tests"), root]     # tests/vmproc.py imports tests.*
    from vmproc import VmProcess  # type: ignore[import-not-found]

    env = dict(os.environ)
    if method in ("hook", "host-wp"):
        env["PYVM_DIRTY_TRACKING"] = method
    else:
        env.pop("PYVM_DIRTY_TRACKING", None)
    from pathlib import Path

    ram = f"{size_mib + 64}M"
    guest = ["-kernel", guest_path("store-loop.elf"), "-append", f"start=2 size={size_mib}"]
    sock = os.path.join(tmpdir, f"mig-{method}.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    src = VmProcess(Path(tmpdir), f"src-{method}", "-m", ram, *guest, serial=False, env=env)
    dst = VmProcess(Path(tmpdir), f"dst-{method}", "-m", ram, *guest, "-incoming", "defer",
                    serial=False, env=env)
    try:
        dst.cmd("migrate-incoming", uri=f"unix:{sock}")
        src.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40, "downtime-limit": 300})
        time.sleep(0.5)                         # the guest is storing at full speed
        src.cmd("migrate", uri=f"unix:{sock}")
        info = src.wait_migration(timeout=120, poll=0.1)
        if info.get("status") != "completed":
            raise SystemExit(f"migration ended {info.get('status')}: {info}")
        return (info["total-time"] / 1000.0, info["downtime"] / 1000.0,
                int(info.get("ram", {}).get("dirty-sync-count", 0)))
    finally:
        src.close()
        dst.close()


def bench_migration(args: argparse.Namespace) -> None:
    import tempfile

    results: dict[str, list[tuple[float, float, int]]] = {"tlb": [], "host-wp": [], "hook": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.migration_rounds):
            for method in results:
                results[method].append(migrate_once(method, args.migration_mib, tmp))
    print(f"-- live migration of store-loop over {args.migration_mib} MiB (unix socket, "
          f"{args.migration_rounds} interleaved rounds)")
    for method, rs in results.items():
        tt = [r[0] for r in rs]
        dt = [r[1] for r in rs]
        print(f"{method:>8}: total {statistics.median(tt):.3f} s (spread {min(tt):.3f}-{max(tt):.3f})"
              f"  downtime {statistics.median(dt) * 1000:.0f} ms (spread {min(dt) * 1000:.0f}-"
              f"{max(dt) * 1000:.0f})  syncs {statistics.median([r[2] for r in rs]):.0f}")


# -- a Linux guest writing memory ---------------------------------------------------------------
LINUX_PASSES = 4


def linux_workload_once(m: Machine, con: Any, mode: str, mib: int, n: int) -> tuple[float, int]:
    """Seconds the workload took with ``mode`` tracking, and the pages the syncs reported."""
    from pyvm import linux_guest

    block = next(iter(m.ram))
    bitmap = block.dirty
    tracker: list[Any] = []
    if mode != "off":
        def attach() -> None:
            tr: Any
            if mode == "tlb":
                tr = track_tlb_writes([cpu.uc for cpu in m.cpus], [block])
            else:
                tr = track_host_writes(bitmap, block.host_address, block.size)
            if tr is None:
                raise SystemExit(f"{mode} tracking is not available here")
            tracker.append(tr)
        m.run_on_loop(attach)
    reported = [0]
    stop = threading.Event()

    def syncer() -> None:
        while not stop.wait(0.1):
            try:
                words = m.run_on_loop(bitmap.fetch_and_clear, timeout=2)
            except TimeoutError:
                continue
            reported[0] += int(fastpath_py.bitmap_to_indices(words, block.npages).size)

    sync_thread = threading.Thread(target=syncer, name="bench-sync") if mode != "off" else None
    marker = f"WROTE-{n}-DONE"
    start = len(con.out)
    cmd = (f"for i in {' '.join(str(i) for i in range(LINUX_PASSES))}; do dd if=/dev/zero of=/w "
           f"bs=1M count={mib} 2>/dev/null; rm /w; done; echo WROTE-{n}-''DONE\r")
    t0 = time.perf_counter()
    if sync_thread:
        sync_thread.start()
    con.sock.sendall(cmd.encode())
    end = con.expect(marker, 600, start)
    elapsed = time.perf_counter() - t0
    stop.set()
    if sync_thread:
        sync_thread.join()
    con.expect(linux_guest.PROMPT, 60, end)
    if tracker:
        def detach() -> Any:
            tracker[0].detach()
            for cpu in m.cpus:
                cpu.uc.ctl(uc_const.UC_CTL_TLB_FLUSH, uc_const.UC_CTL_IO_WRITE)
            return bitmap.fetch_and_clear()
        last = m.run_on_loop(detach)
        reported[0] += int(fastpath_py.bitmap_to_indices(last, block.npages).size)
        if reported[0] < mib * 256:
            raise SystemExit(f"tracking reported {reported[0]} pages, fewer than the "
                             f"{mib * 256} the workload wrote")
    return elapsed, reported[0]


def bench_linux(args: argparse.Namespace) -> None:
    import tempfile

    from pyvm import linux_guest

    # the serial console client the Linux tests use (tests/linux.py)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.linux import SerialConsole

    kernel, initrd = linux_guest.fetch(linux_guest.DEFAULT_DIR)
    with tempfile.TemporaryDirectory() as tmp:
        sock = os.path.join(tmp, "serial.sock")
        cfg = MachineConfig(ram_size=512 << 20, kernel=str(kernel), initrd=str(initrd),
                            append=linux_guest.CMDLINE,
                            serial=[f"unix:{sock},server=on,wait=off"])
        m = Machine(cfg)
        m.start()
        try:
            con = SerialConsole(sock)
            con.expect(linux_guest.PROMPT, 600)
            modes = ("off", "tlb", "host-wp")
            times: dict[str, list[float]] = {mode: [] for mode in modes}
            pages: dict[str, list[int]] = {mode: [] for mode in modes}
            linux_workload_once(m, con, "off", args.linux_mib, 0)        # warm the page cache
            n = 1
            for _ in range(args.rounds):
                for mode in modes:
                    t, rep = linux_workload_once(m, con, mode, args.linux_mib, n)
                    times[mode].append(t)
                    pages[mode].append(rep)
                    n += 1
        finally:
            m.request_exit(0)
            m.close()
    mib = args.linux_mib * LINUX_PASSES
    print(f"-- Linux guest at the shell: dd of {args.linux_mib} MiB into a file x{LINUX_PASSES} "
          f"({mib} MiB written per run), {args.rounds} interleaved rounds, sync every 100 ms")
    rate = {mode: [mib / t for t in ts] for mode, ts in times.items()}
    for mode in modes:
        line = (f"{mode:>8}: {statistics.median(rate[mode]):7.1f} MiB/s  (spread "
                f"{min(rate[mode]):.1f}-{max(rate[mode]):.1f}, n={len(rate[mode])})")
        if mode != "off":
            line += (f"  ratio={statistics.median(rate[mode]) / statistics.median(rate['off']):.3f}"
                     f"  pages reported/run {int(statistics.median(pages[mode]))}")
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=8)
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sync-ms", type=lambda s: [int(x) for x in s.split(",")], default=[0, 100, 20])
    ap.add_argument("--python-hook", action="store_true")
    ap.add_argument("--migration", action="store_true")
    ap.add_argument("--migration-mib", type=int, default=64)
    ap.add_argument("--migration-rounds", type=int, default=3)
    ap.add_argument("--migration-only", action="store_true", help="only the live migrations")
    ap.add_argument("--linux", action="store_true", help="also a Linux guest writing memory")
    ap.add_argument("--linux-only", action="store_true", help="only the Linux guest")
    ap.add_argument("--linux-mib", type=int, default=32)
    args = ap.parse_args()
    only = args.linux_only or args.migration_only
    run: list[Callable[[argparse.Namespace], None]] = [] if only else [bench_guest]
    if args.migration or args.migration_only:
        run.append(bench_migration)
    if args.linux or args.linux_only:
        run.append(bench_linux)
    for fn in run:
        fn(args)


if __name__ == "__main__":
    main()
