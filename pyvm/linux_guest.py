"""``pyvm-linux-guest``: fetch Debian's stock kernel and busybox, build a small initramfs.

    pyvm-linux-guest            fetch once, print the kernel's and the initramfs's paths
    pyvm-linux-guest --args     print the pyvm options that boot them
    pyvm-linux-guest --boot     boot them in pyvm, serial console on this terminal

Downloads ``linux-image-amd64`` (the kernel package it depends on) and ``busybox-static``
with ``apt-get download``, so the machine's apt sources decide where they come from;
extracts the vmlinuz with ``dpkg-deb``; writes an initramfs (a "newc" cpio archive, see
Documentation/driver-api/early-userspace/buffer-format.rst) whose ``/init`` mounts proc,
sysfs and devtmpfs, prints ``pyvm-linux: init done`` and starts a busybox shell on the
console with the prompt ``pyvm-linux:/# ``.  Everything is cached in one directory per
user (:func:`default_cache_dir`); a second run only prints the paths.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path



def default_cache_dir() -> Path:
    """``$PYVM_CACHE_DIR/linux``, else ``$XDG_CACHE_HOME/pyvm/linux`` (``~/.cache/pyvm/linux``):
    one copy per user, shared by ``make linux``, the tests, the benches and the labs."""
    explicit = os.environ.get("PYVM_CACHE_DIR")
    if explicit:
        return Path(explicit) / "linux"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "pyvm" / "linux"


DEFAULT_DIR = default_cache_dir()
KERNEL_META = "linux-image-amd64"
BUSYBOX = "busybox-static"
PROMPT = "pyvm-linux:/# "
BANNER = "pyvm-linux: init done"
CMDLINE = "console=ttyS0"

INIT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "{BANNER}"
export PS1='pyvm-linux:$PWD# '
exec setsid cttyhack /bin/sh
"""


class NewcWriter:
    """The cpio "newc" format the kernel unpacks into its rootfs: a 110-byte ASCII header
    (magic 070701, thirteen 8-digit hex fields), the NUL-terminated name, the data, each
    padded to 4 bytes; the archive ends with the entry ``TRAILER!!!``."""

    def __init__(self) -> None:
        self._out = bytearray()
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
               nlink: int = 1) -> None:
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(encoded), 0)
        self._ino += 1
        self._out += b"070701" + b"".join(b"%08X" % f for f in fields)
        self._out += encoded
        self._out += b"\0" * (-len(self._out) % 4)
        self._out += data
        self._out += b"\0" * (-len(self._out) % 4)

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755, nlink=2)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def char_device(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self._ino = 0
        self._entry("TRAILER!!!", 0)
        return bytes(self._out)


def build_initramfs(busybox: bytes) -> bytes:
    w = NewcWriter()
    for d in ("bin", "dev", "proc", "sys", "tmp", "root"):
        w.directory(d)
    w.char_device("dev/console", 5, 1)      # the kernel opens it for init's stdio
    w.file("bin/busybox", busybox, 0o755)
    w.file("init", INIT.encode(), 0o755)
    return w.finish()


def _run(cmd: list[str], cwd: Path) -> str:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"pyvm-linux-guest: {' '.join(cmd)} failed:\n{res.stderr.strip()}")
    return res.stdout


def _kernel_package(work: Path) -> str:
    """The versioned image package the meta-package depends on (linux-image-6.1.0-N-amd64)."""
    out = _run(["apt-cache", "depends", KERNEL_META], work)
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return line.split(":", 1)[1].strip()
    raise SystemExit(f"pyvm-linux-guest: apt-cache knows no kernel package behind {KERNEL_META}")


def _extract(deb: Path, member_glob: str, into: Path) -> None:
    tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    res = subprocess.run(["tar", "-x", "--wildcards", member_glob], stdin=tar.stdout, cwd=into,
                         capture_output=True, text=True)
    tar.wait()
    if tar.returncode != 0 or res.returncode != 0:
        raise SystemExit(f"pyvm-linux-guest: extracting {member_glob} from {deb.name} failed: "
                         f"{res.stderr.strip()}")


def fetch(cache: Path) -> tuple[Path, Path]:
    """(vmlinuz, initramfs) under ``cache``, fetched and built on first use."""
    cache.mkdir(parents=True, exist_ok=True)
    kernel, initrd = cache / "vmlinuz", cache / "initramfs.cpio"
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)      # concurrent test runs build it once
        if kernel.exists() and initrd.exists():
            return kernel, initrd
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            work = Path(tmp)
            image_pkg = _kernel_package(work)
            print(f"pyvm-linux-guest: apt-get download {image_pkg} {BUSYBOX}", file=sys.stderr)
            _run(["apt-get", "download", image_pkg, BUSYBOX], work)
            debs = {p.name.split("_")[0]: p for p in work.glob("*.deb")}
            _extract(debs[image_pkg], "./boot/vmlinuz-*", work)
            _extract(debs[BUSYBOX], "./bin/busybox", work)
            vmlinuz = next((work / "boot").glob("vmlinuz-*"))
            cpio = build_initramfs((work / "bin" / "busybox").read_bytes())
            (work / "initramfs.cpio").write_bytes(cpio)
            (work / "VERSION").write_text(f"{image_pkg} {vmlinuz.name}\n")
            shutil.move(str(vmlinuz), kernel.with_suffix(".tmp"))
            os.replace(kernel.with_suffix(".tmp"), kernel)
            os.replace(work / "initramfs.cpio", initrd)
            os.replace(work / "VERSION", cache / "VERSION")
    return kernel, initrd


def boot_options(kernel: Path, initrd: Path) -> list[str]:
    """The pyvm options that boot the guest (RAM size and serial port are the caller's)."""
    return ["-kernel", str(kernel), "-initrd", str(initrd), "-append", CMDLINE]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pyvm-linux-guest", description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR,
                    help=f"cache directory (default {DEFAULT_DIR})")
    what = ap.add_mutually_exclusive_group()
    what.add_argument("--args", action="store_true",
                      help="print the pyvm options that boot the guest, on one line")
    what.add_argument("--boot", action="store_true", help="boot it in pyvm (serial on stdio)")
    ap.add_argument("-m", default="512M", help="guest RAM for --boot")
    args = ap.parse_args(argv)
    kernel, initrd = fetch(args.dir)
    if args.args:
        print(" ".join(shlex.quote(a) for a in boot_options(kernel, initrd)))
        return 0
    print(f"kernel {kernel}\ninitrd {initrd}")
    if args.boot:
        cmd = [sys.executable, "-m", "pyvm", "-m", args.m, *boot_options(kernel, initrd),
               "-serial", "stdio"]
        print("pyvm-linux-guest: " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
        os.execv(sys.executable, cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
