"""xbzrle and mapped-ram, each against its baseline measured in the same run.

    .venv/bin/python bench/xbzrle_mapped_ram.py [--repeat 3] [--xbzrle-seconds 5]
                                                 [--live-seconds 30] [--no-qemu]

1. **xbzrle** -- ``dirty.elf`` (``rate=0``: one word of a page incremented per write, as
   fast as the vCPU goes) over 16 MiB of a 128 MiB guest, live-migrated over tcp between
   two pyvm processes with ``max-bandwidth`` 64 MiB/s and a downtime limit of 1 ms,
   measured over ``--xbzrle-seconds`` (every round resends the whole range) that start once
   the bulk pass is over (2 syncs: QEMU enables xbzrle only when its page scan wraps
   around, ram.c ``find_dirty_block``), then allowed to finish;
   plain precopy and xbzrle interleaved.  Measured: bytes moved per page sent
   (``ram.transferred`` over ``normal + duplicate`` pages, plus xbzrle's cache hits),
   rounds, bytes in total, and xbzrle's statistics.  The same guest and settings on
   QEMU 7.2 (TCG), plain and xbzrle, when ``qemu-system-x86_64`` is installed.
2. **mapped-ram save/restore** -- a paused 512 MiB guest whose RAM is full of random bytes
   (a private mapping of a random file, as in bench/migration.py: every page is data),
   saved to a file on disk and restored (``-incoming defer`` + ``migrate-incoming``),
   plain file stream, mapped-ram, and mapped-ram with multifd on both sides at 1 and at 2
   channels (threads that pwrite the save and pread the restore) interleaved: save time (``migrate`` to
   ``completed``), restore time (``migrate-incoming`` to ``completed``), file size.
3. **a live save of a guest that keeps writing** -- ``dirty.elf`` (``rate=0`` over 32 MiB
   of a 128 MiB guest) saved to a file for ``--live-seconds`` with a downtime limit of 0
   and ``max-bandwidth`` 64 MiB/s, then allowed to finish: the file size with the plain
   stream (grows with every round) and with mapped-ram (stays at RAM + metadata).

Times are medians of ``--repeat`` runs with their spread (min-max); the machines this runs
on are noisy.  Ratios: ``xbzrle_bytes_ratio`` (xbzrle / plain bytes per page), ``qemu_xbzrle_ratio``
(pyvm xbzrle / QEMU xbzrle bytes per page), ``mapped_save_ratio`` / ``mapped_restore_ratio``
(mapped-ram / plain time), ``multifd_2_vs_1_save_ratio`` / ``..._restore_ratio`` (2 / 1
channels), ``live_size_ratio`` (mapped-ram file / RAM).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.qemu_compare import QEMU, Vm, free_port  # noqa: E402
from tests.vmproc import VmProcess  # noqa: E402

from pyvm.guests import guest_path  # noqa: E402

BANDWIDTH = 64 << 20
DIRTY_XBZRLE = ["-m", "128M", "-kernel", guest_path("dirty.elf"), "-append",
                "start=1 size=16 rate=0", "-display", "none"]
DIRTY_LIVE = ["-m", "128M", "-kernel", guest_path("dirty.elf"), "-append",
              "start=1 size=32 rate=0", "-display", "none"]
SAVE_MIB = 512


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def wait(vm: Any, states: tuple[str, ...] = ("completed", "failed", "cancelled"),
         timeout: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info = vm.cmd("query-migrate")
        if info.get("status") in states:
            return dict(info)
        if time.monotonic() > deadline:
            raise RuntimeError(f"migration still {info}")
        time.sleep(0.02)


def caps(vm: Any, *names: str) -> None:
    if names:
        vm.cmd("migrate-set-capabilities",
               capabilities=[{"capability": n, "state": True} for n in names])


# -- 1. xbzrle -----------------------------------------------------------------------------------

def _xbzrle_run(src: Any, port: int | str, xbzrle: bool, seconds: float) -> dict[str, float]:
    src.wait_serial("dirty pattern=")
    time.sleep(0.5)                         # the guest has dirtied its whole range
    if xbzrle:
        caps(src, "xbzrle")
    # 1 ms, not 0: QEMU 7.2 completes at a limit of 0 as soon as the current bitmap is
    # drained, without syncing again (ram_save_pending)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": BANDWIDTH, "downtime-limit": 1})
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    # QEMU (migration/ram.c find_dirty_block) sets xbzrle_enabled only when the page scan
    # wraps around the last RAM block: the first, bulk pass sends plain pages, the second
    # fills the cache, later ones encode.  So the measured window starts after the bulk
    # pass (2 syncs), for pyvm and QEMU alike.
    deadline = time.monotonic() + 120
    while src.cmd("query-migrate").get("ram", {}).get("dirty-sync-count", 0) < 2:
        if time.monotonic() > deadline:
            raise RuntimeError("the bulk pass did not end")
        time.sleep(0.05)
    before = src.cmd("query-migrate")
    time.sleep(seconds)
    live = src.cmd("query-migrate")
    src.cmd("migrate-set-parameters", **{"downtime-limit": 60000})
    info = wait(src)
    assert info["status"] == "completed", info
    ram, ram0 = live["ram"], before["ram"]
    xb, xb0 = live.get("xbzrle-cache", {}), before.get("xbzrle-cache", {})
    pages = (ram["normal"] - ram0["normal"] + ram["duplicate"] - ram0["duplicate"]
             + xb.get("pages", 0) - xb0.get("pages", 0))
    out = {"per_page": (ram["transferred"] - ram0["transferred"]) / max(pages, 1),
           "rounds": ram["dirty-sync-count"] - ram0["dirty-sync-count"],
           "bytes": info["ram"]["transferred"] / 1e6}
    if xbzrle:
        out["encoding_rate"] = xb["encoding-rate"]
        out["overflow"] = xb["overflow"]
        out["xbzrle_pages"] = xb["pages"] - xb0.get("pages", 0)
        out["cache_miss"] = xb["cache-miss"] - xb0.get("cache-miss", 0)
    return out


def pyvm_xbzrle(tmp: Path, xbzrle: bool, seconds: float) -> dict[str, float]:
    src = VmProcess(tmp, "xs", *DIRTY_XBZRLE)
    dst = VmProcess(tmp, "xd", *DIRTY_XBZRLE, "-S", "-incoming", "tcp:127.0.0.1:0")
    try:
        return _xbzrle_run(src, dst.cmd("query-migrate")["socket-address"][0]["port"], xbzrle,
                           seconds)
    finally:
        src.close()
        dst.close()


def qemu_xbzrle(tmp: Path, xbzrle: bool, seconds: float) -> dict[str, float]:
    base = [QEMU, "-machine", "pc", "-accel", "tcg", "-display", "none", "-nodefaults",
            *DIRTY_XBZRLE[:-2]]
    port = free_port()
    dst = Vm(tmp, "qd", [*base, "-incoming", f"tcp:127.0.0.1:{port}"])
    src = Vm(tmp, "qs", base)
    try:
        return _xbzrle_run(src, port, xbzrle, seconds)
    finally:
        src.close()
        dst.close()


# -- 2. mapped-ram save and restore ----------------------------------------------------------------

def save_restore(tmp: Path, rand: Path, mapped: bool, channels: int = 0) -> dict[str, float]:
    """``channels``: with mapped-ram, multifd on both sides with that many channels (the
    save writes and the restore reads the pages with that many threads)."""
    state = tmp / ("m.state" if mapped else "p.state")
    state.unlink(missing_ok=True)
    guest = ["-m", f"{SAVE_MIB}M", "-kernel", guest_path("memcheck.elf"), "-display", "none"]
    src = VmProcess(tmp, "ss", *guest, "-S", "-object",
                    f"memory-backend-file,id=r,size={SAVE_MIB}M,mem-path={rand},share=off",
                    "-machine", "memory-backend=r", serial=False)
    try:
        if mapped:
            caps(src, "mapped-ram", *(["multifd"] if channels else []))
        if channels:
            src.cmd("migrate-set-parameters", **{"multifd-channels": channels})
        t0 = time.perf_counter()
        src.cmd("migrate", uri=f"file:{state}")
        assert wait(src)["status"] == "completed"
        save = time.perf_counter() - t0
    finally:
        src.close()
    dst = VmProcess(tmp, "sd", *guest, "-S", "-incoming", "defer", "-object",
                    f"memory-backend-ram,id=r,size={SAVE_MIB}M", "-machine", "memory-backend=r",
                    serial=False)
    try:
        if mapped:
            caps(dst, "mapped-ram", *(["multifd"] if channels else []))
        if channels:
            dst.cmd("migrate-set-parameters", **{"multifd-channels": channels})
        t0 = time.perf_counter()
        dst.cmd("migrate-incoming", uri=f"file:{state}")
        assert wait(dst, ("completed", "failed"))["status"] == "completed"
        restore = time.perf_counter() - t0
    finally:
        dst.close()
    size = state.stat().st_size / 1e6
    state.unlink()
    return {"save": save, "restore": restore, "size": size}


# -- 3. a live save of a guest that keeps writing ---------------------------------------------------

def live_save(tmp: Path, mapped: bool, seconds: float) -> dict[str, float]:
    state = tmp / "live.state"
    state.unlink(missing_ok=True)
    src = VmProcess(tmp, "ls", *DIRTY_LIVE)
    try:
        src.wait_serial("dirty pattern=")
        time.sleep(2)                       # the guest is writing its range
        if mapped:
            caps(src, "mapped-ram")
        src.cmd("migrate-set-parameters", **{"downtime-limit": 0, "max-bandwidth": BANDWIDTH})
        t0 = time.monotonic()
        src.cmd("migrate", uri=f"file:{state}")
        while time.monotonic() - t0 < seconds:
            if src.cmd("query-migrate")["status"] != "active" and time.monotonic() - t0 > 1:
                break                       # a round found no dirty page: it ended early
            time.sleep(0.2)
        live = time.monotonic() - t0
        src.cmd("migrate-set-parameters", **{"downtime-limit": 60000, "max-bandwidth": 1 << 40})
        info = wait(src)
        assert info["status"] == "completed", info
        return {"size": state.stat().st_size / 1e6, "rounds": info["ram"]["dirty-sync-count"],
                "sent": info["ram"]["transferred"] / 1e6, "live": live}
    finally:
        src.close()
        state.unlink(missing_ok=True)


def interleaved(repeat: int, cases: dict[str, Callable[[], dict[str, float]]]
                ) -> dict[str, list[dict[str, float]]]:
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in cases}
    for _ in range(repeat):
        for name, fn in cases.items():
            runs[name].append(fn())
    return runs


def col(runs: list[dict[str, float]], key: str) -> list[float]:
    return [r[key] for r in runs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--xbzrle-seconds", type=float, default=5)
    ap.add_argument("--live-seconds", type=float, default=30)
    ap.add_argument("--no-qemu", action="store_true", help="skip the QEMU 7.2 cases")
    ap.add_argument("--cases", default="xbzrle,save,live", help="which parts to run")
    args = ap.parse_args()
    parts = set(args.cases.split(","))
    with tempfile.TemporaryDirectory(prefix="pyvm-bench-") as d:
        tmp = Path(d)
        if "xbzrle" in parts:
            xbzrle_part(tmp, args)
        if "save" in parts:
            save_part(tmp, args)
        if "live" in parts:
            live_part(tmp, args)


def xbzrle_part(tmp: Path, args: argparse.Namespace) -> None:
    secs = args.xbzrle_seconds
    cases: dict[str, Callable[[], dict[str, float]]] = {
        "pyvm plain": lambda: pyvm_xbzrle(tmp, False, secs),
        "pyvm xbzrle": lambda: pyvm_xbzrle(tmp, True, secs)}
    qemu = not args.no_qemu and shutil.which(QEMU) is not None
    if qemu:
        cases["qemu plain"] = lambda: qemu_xbzrle(tmp, False, secs)
        cases["qemu xbzrle"] = lambda: qemu_xbzrle(tmp, True, secs)
    x = interleaved(args.repeat, cases)
    print(f"xbzrle: dirty.elf rate=0 over 16 MiB of 128 MiB, tcp, max-bandwidth 64 MiB/s, "
          f"downtime-limit 1 ms; measured for {secs:.0f} s after the bulk pass (2 syncs)")
    for name, runs in x.items():
        extra = ""
        if "encoding_rate" in runs[0]:
            extra = (f"  encoding rate {spread(col(runs, 'encoding_rate'))}  overflow "
                     f"{statistics.median(col(runs, 'overflow')):.0f}  xbzrle pages "
                     f"{statistics.median(col(runs, 'xbzrle_pages')):.0f}  cache misses "
                     f"{statistics.median(col(runs, 'cache_miss')):.0f}")
        print(f"  {name:12s} bytes/page {spread(col(runs, 'per_page'))}  rounds "
              f"{statistics.median(col(runs, 'rounds')):.0f}  MB in total "
              f"{spread(col(runs, 'bytes'))}{extra}")
    med = {k: statistics.median(col(v, "per_page")) for k, v in x.items()}
    print(f"xbzrle_bytes_ratio={med['pyvm xbzrle'] / med['pyvm plain']:.4f}")
    if qemu:
        print(f"qemu_xbzrle_bytes_ratio={med['qemu xbzrle'] / med['qemu plain']:.4f}")
        print(f"qemu_xbzrle_ratio={med['pyvm xbzrle'] / med['qemu xbzrle']:.3f}")


def save_part(tmp: Path, args: argparse.Namespace) -> None:
    rand = tmp / "random.ram"
    with open(rand, "wb") as f:
        for _ in range(SAVE_MIB):
            f.write(os.urandom(1 << 20))
    m = interleaved(args.repeat, {
        "plain file": lambda: save_restore(tmp, rand, False),
        "mapped-ram": lambda: save_restore(tmp, rand, True),
        "mapped+mfd1": lambda: save_restore(tmp, rand, True, 1),
        "mapped+mfd2": lambda: save_restore(tmp, rand, True, 2)})
    rand.unlink()
    print(f"save/restore: {SAVE_MIB} MiB of random bytes, paused, file on disk")
    for name, runs in m.items():
        print(f"  {name:12s} save s {spread(col(runs, 'save'))}  restore s "
              f"{spread(col(runs, 'restore'))}  file MB {spread(col(runs, 'size'))}")
    for key in ("save", "restore"):
        ratio = (statistics.median(col(m["mapped-ram"], key))
                 / statistics.median(col(m["plain file"], key)))
        print(f"mapped_{key}_ratio={ratio:.3f}")
    for key in ("save", "restore"):
        ratio = (statistics.median(col(m["mapped+mfd2"], key))
                 / statistics.median(col(m["mapped+mfd1"], key)))
        print(f"multifd_2_vs_1_{key}_ratio={ratio:.3f}")


def live_part(tmp: Path, args: argparse.Namespace) -> None:
    print(f"live save: dirty.elf rate=0 over 32 MiB of 128 MiB for {args.live_seconds:.0f} s, "
          "downtime-limit 0, max-bandwidth 64 MiB/s")
    ram_mb = 128 * (1 << 20) / 1e6
    for mapped in (False, True):
        r = live_save(tmp, mapped, args.live_seconds)
        name = "mapped-ram" if mapped else "plain file"
        print(f"  {name:12s} file MB {r['size']:.1f} (RAM {ram_mb:.1f})  rounds "
              f"{r['rounds']:.0f}  MB sent {r['sent']:.1f}  live for {r['live']:.1f} s")
        if mapped:
            print(f"live_size_ratio={r['size'] / ram_mb:.4f}")


if __name__ == "__main__":
    main()
