"""Postcopy on a guest precopy cannot catch up with, pyvm and QEMU (TCG) in the same run.

    .venv/bin/python bench/postcopy.py [--sizes 64,1024] [--hot-mib 32] [--link-mib 8]
                                       [--rounds 2] [--repeat 1] [--no-qemu]

The guest is ``ab.elf`` with ``-append "start=1 size=HOT passes=1"``: every page of a
HOT MiB range rewritten continuously (one ``B`` on COM1 per pass), the rest of RAM zero.
For each RAM size in ``--sizes`` (MiB) and each engine, a source and a destination
(``-incoming defer``) on 127.0.0.1 get ``postcopy-ram`` on both sides; the source gets
``max-bandwidth`` = ``max-postcopy-bandwidth`` = ``--link-mib`` MiB/s (the link) and
migrates over tcp; after ``--rounds`` bitmap syncs (``dirty-sync-count``) it is told
``migrate-start-postcopy``.  Measured:

- ``total``: the source's ``total-time``; ``downtime``: its ``downtime`` (stop until the
  destination runs);
- ``slowdown``: the guest's passes per second on the source before the migration divided
  by its passes per second on the destination while postcopy runs (from the switch to
  ``completed``; > 1 means slower);
- the source's ``postcopy-requests``.

QEMU is Debian's ``qemu-system-x86`` (installed with apt-get if missing, see
bench/qemu_compare.py), ``-accel tcg``.  With ``--repeat`` > 1 the runs are interleaved
(pyvm, QEMU, pyvm, ...) and medians with their spread are printed.

Last line: ``ratio=<pyvm downtime at the largest size / pyvm downtime at the smallest>``
(postcopy's downtime should not grow with RAM: target close to 1).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # progress as it runs
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from qemu_compare import Vm, ensure_qemu, free_port  # noqa: E402

from pyvm.guests import guest_path  # noqa: E402

CAPS = [{"capability": "postcopy-ram", "state": True}]


def _wait(vm: Vm, done: Any, timeout: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info = vm.cmd("query-migrate")
        if done(info):
            return dict(info)
        if time.monotonic() > deadline:
            raise AssertionError(f"{vm.name}: {what}: {info}")
        time.sleep(0.02)


def _passes(vm: Vm) -> int:
    return vm.serial().count("B")


def run_once(tmp: Path, label: str, argv: list[str], link: int, rounds: int) -> dict[str, float]:
    port = free_port()
    src = Vm(tmp, f"{label}-src", argv)
    dst = Vm(tmp, f"{label}-dst", [*argv, "-incoming", "defer"])
    try:
        src.wait_serial("B", count=2, timeout=120)
        t0, p0 = time.perf_counter(), _passes(src)
        time.sleep(3)
        base_rate = (_passes(src) - p0) / (time.perf_counter() - t0)
        for vm in (src, dst):
            vm.cmd("migrate-set-capabilities", capabilities=CAPS)
        dst.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        src.cmd("migrate-set-parameters", **{"max-bandwidth": link, "max-postcopy-bandwidth": link})
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        _wait(src, lambda i: i.get("ram", {}).get("dirty-sync-count", 0) >= rounds
              or i.get("status") in ("failed", "completed"), 600, f"{rounds} syncs")
        src.cmd("migrate-start-postcopy")
        _wait(src, lambda i: i.get("status") != "active", 600, "the switch")
        t_switch = time.perf_counter()
        d0 = _passes(dst)
        info = _wait(src, lambda i: i.get("status") in ("completed", "failed", "postcopy-paused"),
                     600, "completion")
        assert info["status"] == "completed", info
        t_done = time.perf_counter()
        d1 = _passes(dst)
        _wait(dst, lambda i: i.get("status") in ("completed", "failed"), 60, "destination completion")
        dst.wait_serial("B", count=d1 + 1, timeout=60)      # the guest goes on
        pc_rate = (d1 - d0) / max(t_done - t_switch, 1e-6)
        return {"total": info["total-time"] / 1000, "downtime": info["downtime"] / 1000,
                "postcopy": t_done - t_switch,
                "slowdown": base_rate / pc_rate if pc_rate else float("inf"),
                "requests": info["ram"]["postcopy-requests"],
                "syncs": info["ram"]["dirty-sync-count"]}
    finally:
        src.close()
        dst.close()


def _fmt(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    med = statistics.median(values) * scale
    if len(values) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} [{min(values) * scale:.{digits}f}..{max(values) * scale:.{digits}f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64,1024", help="guest RAM sizes in MiB")
    ap.add_argument("--hot-mib", type=int, default=32)
    ap.add_argument("--link-mib", type=float, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--no-qemu", action="store_true")
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    link = int(a.link_mib * (1 << 20))
    engines: dict[str, list[str]] = {"pyvm": [sys.executable, "-m", "pyvm"]}
    version = ""
    if not a.no_qemu:
        qemu = ensure_qemu()
        version = subprocess.run([qemu, "--version"], capture_output=True,
                                 text=True).stdout.splitlines()[0]
        engines["QEMU"] = [qemu, "-machine", "pc", "-accel", "tcg", "-nodefaults"]
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="pyvm-postcopy-") as d:
        tmp = Path(d)
        for _ in range(a.repeat):
            for size in sizes:
                guest = ["-m", f"{size}M", "-kernel", guest_path("ab.elf"), "-append",
                         f"start=1 size={a.hot_mib} passes=1", "-display", "none"]
                for name, argv in engines.items():
                    r = run_once(tmp, f"{name}-{size}", [*argv, *guest], link, a.rounds)
                    print(f"  {name} {size} MiB: {r}")
                    results.setdefault((name, size), []).append(r)
    print(f"guest: ab.elf start=1 size={a.hot_mib} passes=1; link {a.link_mib:g} MiB/s "
          f"(max-bandwidth = max-postcopy-bandwidth); migrate-start-postcopy after {a.rounds} "
          f"syncs; tcp 127.0.0.1; {a.repeat} run(s), median [min..max]"
          + (f"; QEMU: {version}, TCG" if version else ""))
    for (name, size), runs in results.items():
        print(f"{name:>5} {size:5d} MiB: total-time {_fmt([r['total'] for r in runs])} s, "
              f"downtime {_fmt([r['downtime'] for r in runs], 1000, 0)} ms, "
              f"postcopy phase {_fmt([r['postcopy'] for r in runs], 1, 2)} s, "
              f"guest slowdown {_fmt([r['slowdown'] for r in runs], 1, 2)}x, "
              f"requests {_fmt([r['requests'] for r in runs], 1, 0)}")
    small = statistics.median(r["downtime"] for r in results[("pyvm", sizes[0])])
    large = statistics.median(r["downtime"] for r in results[("pyvm", sizes[-1])])
    print(f"ratio={large / small if small else float('inf'):.2f}")


if __name__ == "__main__":
    main()
