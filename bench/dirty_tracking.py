"""Guest throughput with dirty tracking on vs. off, measured in one run.

    .venv/bin/python bench/dirty_tracking.py [--size-mib 8] [--iters 40] [--rounds 5] [--sync-ms 0,100,20]
                                             [--migration] [--python-hook]
                                             [--linux] [--linux-only] [--linux-mib 32]
                                             [--migration-only]

Boots the ``store-loop`` guest (every pass stores to every 32-bit word of a RAM range) in
this process and times the same number of passes per variant:

  off      no tracking (the normal state outside migration)
  host-wp  host write-protect: userfaultfd (asynchronous) + PAGEMAP_SCAN, what migration uses
  hook     the C-level UC_HOOK_MEM_WRITE callback of pyvm._fastpath (the fallback)
  vtlb     the ceiling of the other design considered: Unicorn's virtual TLB
           (UC_TLB_VIRTUAL) with a C UC_HOOK_TLB_FILL that grants write permission only
           to pages already dirty and a TLB flush at each sync.  Here the fill hook maps
           identity (store-loop runs without paging), so it shows the best that design
           could do: a real one must also walk the guest's page tables, set their A/D bits
           and raise #PF itself.  Built with the system's C compiler; skipped without one.
  python   a Python UC_HOOK_MEM_WRITE callback (pyvm.fastpath_py), with --python-hook

For each ``--sync-ms`` value a thread takes the dirty bitmap every that many milliseconds
while the guest runs, on the vCPU loop between slices as precopy does (``run_on_loop``);
0 = never.
Variants are interleaved (off, host-wp, hook, off, host-wp, hook, ...) ``--rounds`` times, so
a change in the machine's load hits all of them alike; each line gives the median and the
spread (min-max) of the throughput, and ``ratio`` is median(tracked) / median(off).

With ``--migration`` it also live-migrates a running store-loop guest between two pyvm
processes over a unix socket, once with host write-protect and once with the write hook
(the previous method, forced with PYVM_DIRTY_TRACKING=hook), interleaved, and prints the
median total time and downtime of each.

With ``--linux`` (``--linux-only``: that alone) it also boots Debian's kernel with the
busybox initramfs of pyvm-linux-guest in this process and, at the shell, times a
memory-writing workload (``dd`` of ``--linux-mib`` MiB from /dev/zero into a file on the
initramfs, i.e. fresh page-cache pages, then ``rm``, four times) with host write-protect
tracking attached (and the bitmap taken every 100 ms, as precopy does) and without,
alternating on the same running guest, ``--rounds`` times each; the ratio is
median(host-wp) / median(off) of the workload's throughput.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import threading
import time
from typing import Any, Callable

from pyvm import fastpath_py
from pyvm.config import DebugExitConfig, MachineConfig
from pyvm.fastpath import IMPLEMENTATION, impl, track_host_writes, track_writes
from pyvm.guests import guest_path
from pyvm.machine import Machine


VTLB_C = r"""
#include <stdint.h>
#include <stdbool.h>
#include <stddef.h>
typedef struct { uint64_t paddr; int perms; } tlb_entry;      /* uc_tlb_entry */
typedef struct { uint64_t *bitmap; uint64_t base, size, fills; } state;
typedef int (*hook_add_t)(void *, size_t *, int, void *, void *, uint64_t, uint64_t, ...);
/* UC_PROT_READ 1, WRITE 2, EXEC 4; UC_MEM_WRITE 17 (unicorn.h) */
static bool fill(void *uc, uint64_t vaddr, int type, tlb_entry *e, void *ud) {
    state *s = ud;
    uint64_t off = vaddr - s->base, page, bit, *word;
    s->fills++;
    e->paddr = vaddr;
    e->perms = 1 | 4;
    if (vaddr < s->base || off >= s->size) { e->perms |= 2; return true; }
    page = off >> 12;
    word = &s->bitmap[page >> 6];
    bit = 1ULL << (page & 63);
    if (type == 17) {
        __atomic_fetch_or(word, bit, __ATOMIC_RELAXED);
        e->perms |= 2;
    } else if (__atomic_load_n(word, __ATOMIC_RELAXED) & bit) {
        e->perms |= 2;
    }
    return true;
}
int vtlb_attach(void *hook_add, void *uc, size_t *hh, state *s) {
    return ((hook_add_t)hook_add)(uc, hh, 1 << 17, (void *)fill, s, (uint64_t)1, (uint64_t)0);
}
"""


class _VtlbState(ctypes.Structure):
    _fields_ = [("bitmap", ctypes.c_void_p), ("base", ctypes.c_uint64), ("size", ctypes.c_uint64),
                ("fills", ctypes.c_uint64)]


_vtlb_lib: Any = None


def vtlb_library() -> Any:
    """The C fill hook, compiled once per run (None without a C compiler)."""
    global _vtlb_lib
    if _vtlb_lib is None:
        import shutil
        import subprocess
        import tempfile

        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            _vtlb_lib = False
            return None
        d = tempfile.mkdtemp(prefix="pyvm-vtlb-")
        src, lib = os.path.join(d, "vtlb.c"), os.path.join(d, "vtlb.so")
        with open(src, "w") as f:
            f.write(VTLB_C)
        subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", lib, src], check=True)
        _vtlb_lib = ctypes.CDLL(lib)
    return _vtlb_lib or None


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
    elif mode == "vtlb":
        from unicorn import unicorn_const as uc_const
        from unicorn.unicorn_py3 import unicorn as ucmod

        lib = vtlb_library()
        st = _VtlbState(bitmap.words.ctypes.data, block.gpa, block.size, 0)
        hook_add = ctypes.cast(ucmod.uclib.uc_hook_add, ctypes.c_void_p)
        for cpu in m.cpus:
            cpu.uc.ctl_set_tlb_mode(uc_const.UC_TLB_VIRTUAL)
            hh = ctypes.c_size_t(0)
            if lib.vtlb_attach(hook_add, cpu.uc._uch, ctypes.byref(hh), ctypes.byref(st)) != 0:
                raise SystemExit("uc_hook_add(UC_HOOK_TLB_FILL) failed")
        trackers.append(st)             # keeps the state alive while the hook may run
        flush = [lambda c=cpu: c.uc.ctl(uc_const.UC_CTL_TLB_FLUSH, uc_const.UC_CTL_IO_WRITE)
                 for cpu in m.cpus]
    elif mode in ("hook", "python"):
        module = impl if mode == "hook" else fastpath_py
        bitmap = module.DirtyBitmap(block.npages)
        for cpu in m.cpus:
            trackers.append(track_writes(cpu.uc, bitmap, block.gpa, block.size, implementation=module))
    reported = [0]
    stop = threading.Event()

    def take() -> Any:
        words = bitmap.fetch_and_clear()
        if mode == "vtlb":
            for f in flush:
                f()     # the next store to any page fills its TLB entry again
        return words

    def syncer() -> None:
        while not stop.wait(sync_ms / 1000.0):
            try:
                words = m.run_on_loop(take, timeout=2)
            except TimeoutError:
                continue
            reported[0] += int(fastpath_py.bitmap_to_indices(words, block.npages).size)

    sync_thread = threading.Thread(target=syncer, name="bench-sync") if sync_ms > 0 else None
    m.start()
    t0 = time.perf_counter()
    m.cont()
    if sync_thread:
        sync_thread.start()
    code = m.wait()
    elapsed = time.perf_counter() - t0
    stop.set()
    if sync_thread:
        sync_thread.join()
    last = bitmap.fetch_and_clear()
    for t in trackers:
        if hasattr(t, "detach"):
            t.detach()
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
    modes = ["off", "host-wp", "hook"] + (["vtlb"] if vtlb_library() is not None else [])
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
    if method == "hook":
        env["PYVM_DIRTY_TRACKING"] = "hook"
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

    results: dict[str, list[tuple[float, float, int]]] = {"host-wp": [], "hook": []}
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
    if mode == "host-wp":
        def attach() -> None:
            tr = track_host_writes(bitmap, block.host_address, block.size)
            if tr is None:
                raise SystemExit("host write-protect is not available here (userfaultfd WP_ASYNC)")
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
        m.run_on_loop(tracker[0].detach)
        last = bitmap.fetch_and_clear()
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
            modes = ("off", "host-wp")
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
