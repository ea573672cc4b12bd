"""The same ab guest live-migrated over tcp by pyvm and by QEMU (TCG), in the same run.

    .venv/bin/python bench/qemu_compare.py [--size-mib 1024] [--ab-mib 16] [--repeat 1]

Both VMs get the same RAM size and the same guest: ``ab.elf`` (its Multiboot header lets
QEMU's ``-kernel`` boot it) with ``-append "start=1 size=AB passes=1"``, running: every
page of the ab range is rewritten continuously, the rest of RAM stays zero.  Each is
migrated from a source process to a destination process started with ``-incoming
tcp:127.0.0.1:PORT``, both on 127.0.0.1, with ``max-bandwidth`` raised to 1 TiB/s, driven
over QMP with qemu.qmp.  Prints, for each, the source's ``total-time`` and ``downtime``,
the wall clock from ``migrate`` to the destination running, and the pyvm/QEMU ratios.

QEMU is Debian's ``qemu-system-x86`` package: if ``qemu-system-x86_64`` is missing the
bench runs ``apt-get install -y qemu-system-x86`` (as root, or via sudo) and says so.

Last line: ``ratio=<pyvm total-time / QEMU total-time>`` (target <= 1.0).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # progress as it runs
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from qemu.qmp.legacy import QEMUMonitorProtocol  # noqa: E402
from qemu.qmp.protocol import ConnectError  # noqa: E402

from pyvm.guests import guest_path  # noqa: E402

QEMU = "qemu-system-x86_64"
ROOT = Path(__file__).resolve().parent.parent


def ensure_qemu() -> str:
    path = shutil.which(QEMU)
    if path:
        return path
    cmd = ["apt-get", "install", "-y", "qemu-system-x86"]
    if os.geteuid() != 0:
        cmd.insert(0, "sudo")
    print(f"{QEMU} not found: running {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    path = shutil.which(QEMU)
    if not path:
        sys.exit(f"{QEMU} still missing after installing qemu-system-x86")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Vm:
    """A pyvm or QEMU process with a QMP socket and COM1 in a file (or on ``serial``)."""

    def __init__(self, tmp: Path, name: str, argv: list[str], serial: str | None = None,
                 connect_timeout: float = 30) -> None:
        self.name = name
        self.sock = tmp / f"{name}.qmp"
        self.serial_path = tmp / f"{name}.serial"
        self.sock.unlink(missing_ok=True)
        self.serial_path.unlink(missing_ok=True)
        self.err = open(tmp / f"{name}.stderr", "w+b")
        cmd = [*argv, "-qmp", f"unix:{self.sock},server=on,wait=off",
               "-serial", serial or f"file:{self.serial_path}"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.err, cwd=ROOT)
        deadline = time.monotonic() + connect_timeout
        while True:
            if self.proc.poll() is not None:
                self.err.seek(0)
                raise RuntimeError(f"{name} exited: {self.err.read().decode(errors='replace')}")
            if self.sock.exists():
                try:
                    self.qmp = QEMUMonitorProtocol(str(self.sock))
                    self.qmp.connect()
                    break
                except (OSError, ConnectError):
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: no QMP socket")
            time.sleep(0.02)

    def cmd(self, name: str, **args: Any) -> Any:
        resp = self.qmp.cmd_raw(name, args or None)
        if "error" in resp:
            raise RuntimeError(f"{self.name}: {name}: {resp['error']['desc']}")
        return resp["return"]

    def serial(self) -> str:
        try:
            return self.serial_path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_serial(self, text: str, count: int = 1, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.serial().count(text) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: {text!r} x{count} not in {self.serial()[-200:]!r}")
            time.sleep(0.05)

    def close(self) -> None:
        try:
            self.qmp.close()
        except Exception:  # noqa: BLE001 - the process may be gone already
            pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.err.close()


def live_migrate(tmp: Path, label: str, base: list[str]) -> dict[str, float]:
    port = free_port()
    dst = Vm(tmp, f"{label}-dst", [*base, "-incoming", f"tcp:127.0.0.1:{port}"])
    src = Vm(tmp, f"{label}-src", base)
    try:
        src.wait_serial("B", count=2)                     # booted, ab is looping
        for vm in (src, dst):
            vm.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
        t0 = time.perf_counter()
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        while True:
            info = src.cmd("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.01)
        assert info["status"] == "completed", info
        while dst.cmd("query-status")["status"] != "running":
            time.sleep(0.01)
        wall = time.perf_counter() - t0
        before = dst.serial().count("B")
        dst.wait_serial("B", count=before + 1)            # the guest goes on at the destination
        return {"total": info["total-time"] / 1000, "downtime": info["downtime"] / 1000, "wall": wall,
                "syncs": info["ram"]["dirty-sync-count"], "mb": info["ram"]["transferred"] / 1e6}
    finally:
        src.close()
        dst.close()


def median_run(tmp: Path, label: str, base: list[str], repeat: int) -> dict[str, float]:
    runs = [live_migrate(tmp, label, base) for _ in range(repeat)]
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="guest RAM for both")
    ap.add_argument("--ab-mib", type=int, default=16, help="range ab keeps dirtying")
    ap.add_argument("--repeat", type=int, default=1)
    a = ap.parse_args()
    qemu = ensure_qemu()
    version = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    kernel = guest_path("ab.elf")
    guest = ["-m", f"{a.size_mib}M", "-kernel", kernel, "-append", f"start=1 size={a.ab_mib} passes=1",
             "-display", "none"]
    pyvm = [sys.executable, "-m", "pyvm", *guest]
    qemu_argv = [qemu, "-machine", "pc", "-accel", "tcg", "-nodefaults", *guest]
    results = {}
    with tempfile.TemporaryDirectory(prefix="pyvm-qcmp-") as d:
        tmp = Path(d)
        results["QEMU"] = median_run(tmp, "qemu", qemu_argv, a.repeat)
        results["pyvm"] = median_run(tmp, "pyvm", pyvm, a.repeat)
    print(f"guest: ab.elf start=1 size={a.ab_mib} passes=1, {a.size_mib} MiB RAM, tcp 127.0.0.1, "
          f"max-bandwidth 1 TiB/s; QEMU: {version}, TCG")
    for name, r in results.items():
        print(f"{name:>5}: total-time {r['total']:6.3f} s, downtime {r['downtime'] * 1000:6.0f} ms, "
              f"migrate->destination running {r['wall']:6.3f} s, {r['syncs']:.0f} syncs, "
              f"{r['mb']:.1f} MB sent")
    p, q = results["pyvm"], results["QEMU"]
    print(f"pyvm/QEMU: total-time {p['total'] / q['total']:.2f}, downtime {p['downtime'] / q['downtime']:.2f}, "
          f"wall {p['wall'] / q['wall']:.2f}")
    print(f"ratio={p['total'] / q['total']:.2f}")


if __name__ == "__main__":
    main()
