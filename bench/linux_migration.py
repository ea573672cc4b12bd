#!/usr/bin/env python3
"""Live migration of Linux at the shell prompt over tcp: pyvm next to QEMU's TCG.

    bench/linux_migration.py [--runs N] [--ram 512M] [--no-qemu]

Debian 12's kernel with the busybox initramfs of pyvm-linux-guest and
``-append console=ttyS0``, the same RAM size on both sides, in pyvm and in Debian's
``qemu-system-x86_64 -accel tcg`` (installed with apt-get when missing, as
bench/linux_boot.py does), alternating the two, N runs each.  Each run: the source boots
until the prompt is on its serial port (a unix socket), a destination with the same
command line and ``-incoming tcp:127.0.0.1:PORT`` waits, ``migrate`` over QMP, poll
``query-migrate`` on the source until ``completed``, then wait for the destination to
run and type a command on its serial port: a migration counts only when the answer
comes back.  Both programs keep QEMU's default migration parameters (max-bandwidth
128 MiB/s, downtime-limit 300 ms, no capabilities set).  Prints, from the source's
``query-migrate``, ``total-time`` and ``downtime`` with medians and min..max, and the
pyvm/QEMU ratio of each.  A QEMU failure is printed and pyvm's figures still reported.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import linux_boot                       # bench/ is on sys.path when run as a script
from linux_boot import linux_guest
from qemu_compare import Vm, free_port  # puts the checkout on sys.path

from tests.linux import SerialConsole   # noqa: E402

BOOT_TIMEOUT = 900.0                    # seconds to the prompt on a loaded 2-core machine


def start(tmp: Path, name: str, argv: list[str]) -> tuple[Vm, SerialConsole]:
    sock = tmp / f"{name}.serial.sock"
    vm = Vm(tmp, name, argv, serial=f"unix:{sock},server=on,wait=off", connect_timeout=180)
    return vm, SerialConsole(sock)


def one_run(tmp: Path, which: str, ram: str, files: tuple[Path, Path]) -> dict[str, float]:
    argv = linux_boot.command(which, *files, ram=ram, serial=None)
    port = free_port()
    src, scon = start(tmp, f"{which}-src", argv)
    dst = dcon = None
    try:
        t0 = time.monotonic()
        scon.expect(linux_guest.PROMPT, BOOT_TIMEOUT)
        boot = time.monotonic() - t0
        scon.run("X=42; echo set-$X", "set-42")
        dst, dcon = start(tmp, f"{which}-dst", [*argv, "-incoming", f"tcp:127.0.0.1:{port}"])
        params = src.cmd("query-migrate-parameters")
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        while (info := src.cmd("query-migrate"))["status"] not in ("completed", "failed",
                                                                     "cancelled"):
            time.sleep(0.02)
        if info["status"] != "completed":
            raise RuntimeError(f"migration {info['status']}: {info.get('error-desc', '')}")
        deadline = time.monotonic() + 60
        while dst.cmd("query-status")["status"] != "running":
            if time.monotonic() > deadline:
                raise RuntimeError("the destination does not run after the migration")
            time.sleep(0.02)
        a, b = random.randint(100, 999), random.randint(100, 999)
        mark = len(dcon.out)
        dcon.sock.sendall(b"\r")                 # a fresh prompt from the destination
        dcon.expect(linux_guest.PROMPT, 120, mark)
        dcon.run(f"echo $X-$(({a}*{b}))", f"42-{a * b}", 120)
        return {"total": info["total-time"] / 1000, "downtime": info["downtime"] / 1000,
                "mb": info["ram"]["transferred"] / 1e6, "boot": boot,
                "bw": params["max-bandwidth"] / (1 << 20), "limit": params["downtime-limit"]}
    finally:
        for con in (scon, dcon):
            if con is not None:
                con.close()
        for vm in (src, dst):
            if vm is not None:
                vm.close()


def summary(xs: list[float], scale: float = 1.0, fmt: str = ".3f") -> str:
    m, lo, hi = (scale * f(xs) for f in (statistics.median, min, max))
    return f"{m:{fmt}} ({lo:{fmt}}..{hi:{fmt}})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="migrations per program (default 3)")
    ap.add_argument("--ram", default=linux_boot.RAM, help="-m for both programs (default 512M)")
    ap.add_argument("--no-qemu", action="store_true", help="pyvm only, no QEMU baseline")
    args = ap.parse_args()
    files = linux_guest.fetch(linux_guest.DEFAULT_DIR)
    qemu = None if args.no_qemu else linux_boot.ensure_qemu()
    if not args.no_qemu and qemu is None:
        print("QEMU: qemu-system-x86_64 could not be installed; pyvm only", flush=True)
    variants = ["pyvm"] + (["qemu"] if qemu else [])
    results: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    failures: dict[str, list[str]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="pyvm-linuxmig-") as d:
        for i in range(args.runs):
            for v in variants if i % 2 == 0 else variants[::-1]:      # interleaved
                try:
                    r = one_run(Path(d), v, args.ram, files)
                except Exception as err:  # noqa: BLE001 - a failed run is reported, the rest go on
                    failures[v].append(str(err))
                    print(f"run {i + 1} {v:5s} FAILED: {err}", flush=True)
                    continue
                results[v].append(r)
                print(f"run {i + 1} {v:5s} prompt after {r['boot']:6.1f} s; total-time "
                      f"{r['total']:.3f} s, downtime {1000 * r['downtime']:.0f} ms, "
                      f"{r['mb']:.1f} MB sent; the destination answered (max-bandwidth "
                      f"{r['bw']:.0f} MiB/s, downtime-limit {r['limit']:.0f} ms)", flush=True)
    print(f"\nkernel {(linux_guest.DEFAULT_DIR / 'VERSION').read_text().strip()}, -m {args.ram}, "
          f"tcp 127.0.0.1, default migration parameters; median (min..max) of the runs")
    if qemu:
        print(f"baseline: {qemu}, -accel tcg")
    for v in variants:
        rs = results[v]
        if not rs:
            print(f"{v:5s} no completed migration ({len(failures[v])} failed: {failures[v][-1]})")
            continue
        print(f"{v:5s} total-time s {summary([r['total'] for r in rs])}   downtime ms "
              f"{summary([r['downtime'] for r in rs], 1000, '.0f')}   MB sent "
              f"{summary([r['mb'] for r in rs], 1, '.1f')}   [{len(rs)} runs, "
              f"{len(failures[v])} failed]")
    if qemu and results["pyvm"] and results["qemu"]:
        for key in ("total", "downtime"):
            p, q = (statistics.median(r[key] for r in results[v]) for v in ("pyvm", "qemu"))
            print(f"pyvm/QEMU {key}: {p / q:.2f}")
    return 0 if results["pyvm"] else 1


if __name__ == "__main__":
    sys.exit(main())
