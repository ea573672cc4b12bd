"""What the first store to a page after a dirty-bitmap sync costs, per tracking method.

    .venv/bin/python bench/first_write.py [--pages 8192] [--rounds 9]

A Unicorn engine (64-bit, no paging) over a 64 MiB RAM block runs a loop that stores one
quadword into each of ``--pages`` consecutive pages, once per round.  Before each round
the engine's TLB is flushed and, when a method is attached, the bitmap is synced (which
re-arms it), so every store of the round is the first to its page:

  off      no tracking: each page still needs a TLB fill (the baseline)
  tlb      pyvm's TLB fill (pyvm.tlb_tracking): the fill marks the page
  host-wp  host write-protect (userfaultfd WP_ASYNC + PAGEMAP_SCAN): each first store
           takes a minor fault in the host kernel

The variants are interleaved round by round; per variant it prints the median time of a
round and its spread (min-max), and the extra cost per page over ``off`` from the
medians: what one page costs a tracked guest per sync round.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Any

import unicorn as U
from unicorn import unicorn_const as UC
from unicorn import x86_const as X

from pyvm.fastpath import DirtyBitmap, bitmap_to_indices, track_host_writes
from pyvm.ram import MemoryBackend, MemoryBackendConfig
from pyvm.tlb_tracking import TlbTracking

RAM = 64 << 20
CODE = 0x1000
DATA = 0x100000
PAGE = 4096


@dataclass
class _Block:
    gpa: int
    size: int
    host_address: int
    dirty: Any


def _engine(backend: MemoryBackend, pages: int) -> Any:
    uc = U.Uc(U.UC_ARCH_X86, U.UC_MODE_64)
    uc.mem_map_ptr(0, RAM, U.UC_PROT_ALL, backend.host_address)
    # loop: mov [rdi], rax; add rdi, 4096; dec rcx; jnz loop
    code = bytes.fromhex("488907" "4881c700100000" "48ffc9" "75f1")
    uc.mem_write(CODE, code)
    uc.reg_write(X.UC_X86_REG_RAX, 0x5079766D)
    return uc, CODE + len(code)


def _round(uc: Any, end: int, pages: int) -> float:
    uc.ctl(UC.UC_CTL_TLB_FLUSH, UC.UC_CTL_IO_WRITE)
    uc.reg_write(X.UC_X86_REG_RDI, DATA)
    uc.reg_write(X.UC_X86_REG_RCX, pages)
    t0 = time.perf_counter()
    uc.emu_start(CODE, end)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--pages", type=int, default=8192, help="pages stored to per round")
    ap.add_argument("--rounds", type=int, default=9, help="interleaved rounds")
    args = ap.parse_args()
    if not 0 < args.pages <= (RAM - DATA) // PAGE:
        ap.error(f"--pages must be between 1 and {(RAM - DATA) // PAGE}")
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    backend = MemoryBackend(MemoryBackendConfig("memory-backend-ram", "pc.ram", RAM))
    backend.view[:] = 1                                   # populated: no first-touch faults
    uc, end = _engine(backend, args.pages)
    block = _Block(0, RAM, backend.host_address, DirtyBitmap(RAM // PAGE))
    times: dict[str, list[float]] = {"off": [], "tlb": [], "host-wp": []}
    _round(uc, end, args.pages)                           # translate the loop once
    for _ in range(args.rounds):
        for mode in times:
            tracker: Any = None
            if mode == "tlb":
                tracker = TlbTracking([uc], [block])
                tracker.attach()
            elif mode == "host-wp":
                tracker = track_host_writes(block.dirty, block.host_address, block.size)
                if tracker is None:
                    raise SystemExit("host write-protect is not available here")
            block.dirty.fetch_and_clear()                 # a sync: every page clean again
            times[mode].append(_round(uc, end, args.pages))
            if tracker is not None:
                got = int(bitmap_to_indices(block.dirty.fetch_and_clear(), RAM // PAGE).size)
                tracker.detach()
                if got < args.pages:
                    raise SystemExit(f"{mode}: {got} pages reported, {args.pages} stored to")
    off = statistics.median(times["off"])
    print(f"{args.pages} pages, one store each, {args.rounds} interleaved rounds")
    for mode, ts in times.items():
        med = statistics.median(ts)
        line = f"{mode:>8}: {med * 1e3:8.2f} ms a round ({min(ts) * 1e3:.2f}-{max(ts) * 1e3:.2f})"
        if mode != "off":
            line += f"  {(med - off) / args.pages * 1e6:+.2f} us a page over off"
        else:
            line += f"  {med / args.pages * 1e6:.2f} us a page"
        print(line)
    uc.mem_unmap(0, RAM)
    backend.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
