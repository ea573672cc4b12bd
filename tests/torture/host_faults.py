"""Host-level faults for R3 (root only): a network namespace joined by a veth pair whose
link can be brought down, and a small tmpfs that fills up.  Both are context managers that
always clean up; :func:`unavailable` says why they cannot run here (not root, no ``ip``,
namespaces or mounts refused), so callers skip with that reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def unavailable() -> str | None:
    """None when netns, veth and tmpfs mounts work here; else the reason they do not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth links and tmpfs mounts)"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"pyvm-probe-{os.getpid()}"
    try:
        made = _ip("netns", "add", probe, check=False)
        if made.returncode != 0:
            return f"ip netns add failed: {made.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    with tempfile.TemporaryDirectory(prefix="pyvm-tmpfs-probe-") as d:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", d],
                                 capture_output=True, text=True, timeout=30)
        if mounted.returncode != 0:
            return f"mount -t tmpfs failed: {mounted.stderr.strip()}"
        subprocess.run(["umount", d], capture_output=True, timeout=30)
    return None


@dataclass(frozen=True)
class VethNamespace:
    """A namespace ``name`` reached from the host at ``inside`` over a veth pair."""

    name: str
    inside: str             # the namespace end's address
    inner_link: str         # the namespace end's link name

    @property
    def prefix(self) -> tuple[str, ...]:
        """Run a command inside the namespace."""
        return ("ip", "netns", "exec", self.name)

    def link_down(self) -> None:
        """Bring the namespace end of the veth pair down (inside the namespace)."""
        _ip("netns", "exec", self.name, "ip", "link", "set", self.inner_link, "down")


@contextlib.contextmanager
def veth_namespace() -> Iterator[VethNamespace]:
    tag = os.getpid() % 100000
    name, outer, inner = f"pyvm-r3-{tag}", f"pvo{tag}", f"pvi{tag}"
    net = f"10.213.{tag % 250}"
    try:
        _ip("netns", "add", name)
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", name)
        _ip("addr", "add", f"{net}.1/30", "dev", outer)
        _ip("link", "set", outer, "up")
        _ip("netns", "exec", name, "ip", "addr", "add", f"{net}.2/30", "dev", inner)
        _ip("netns", "exec", name, "ip", "link", "set", inner, "up")
        _ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
        yield VethNamespace(name, f"{net}.2", inner)
    finally:
        _ip("link", "del", outer, check=False)      # deletes the pair
        _ip("netns", "del", name, check=False)


@contextlib.contextmanager
def small_tmpfs(parent: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (mount's syntax, e.g. ``4m``) mounted under ``parent``."""
    mountpoint = Path(tempfile.mkdtemp(dir=parent, prefix="tmpfs-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                    str(mountpoint)], check=True, capture_output=True, timeout=30)
    try:
        yield mountpoint
    finally:
        done = subprocess.run(["umount", str(mountpoint)], capture_output=True, timeout=30)
        if done.returncode != 0:            # still busy: detach it now, freed when unused
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, timeout=30)
        mountpoint.rmdir()
