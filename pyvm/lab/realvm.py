"""Real migrations for the lab: two pyvm processes, a policy, and what happened.

:func:`migrate` starts a source running a guest and a destination waiting with
``-incoming``, sets ``max-bandwidth``, ``downtime-limit`` and ``x-policy`` over QMP,
migrates, and polls ``query-migrate`` every ``poll`` seconds until the end.  From the
polls it rebuilds rounds (each change of ``dirty-sync-count``: the remaining bytes after
that sync, the bytes moved since the one before) so the lab's figures draw a real
migration like a simulated one.  Rounds shorter than the poll period merge into the next.

For ``dirty.elf`` (``firmware/dirty.s``: every write increments the first 32-bit word of
a page of its range) the guest's own progress is read with ``pmemsave`` of that range:
the sum of those words is the number of writes done so far.

``workdir`` keeps the processes' stderr; the QMP and migration sockets go to a short
temporary folder (a Unix socket path holds at most 108 bytes), removed at the end.

Processes may be started under a command prefix (``ip netns exec NS``, for the WAN
harness); the QMP sockets are files, reachable from any network namespace.
"""

from __future__ import annotations

import ctypes
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from pyvm.lab.errors import LabError
from pyvm.lab.simulate import SimResult
from pyvm.lab.workloads import parse_size
from pyvm.migration.policy import PAGE_SIZE, RoundRecord

POLL = 0.05
PR_SET_PDEATHSIG = 1            # linux/prctl.h
#: the source's ``-d migration`` line for the switchover, with the downtime to the µs
#: (``pyvm/migration/control/precopy.py``, ``_complete``)
_SWITCHOVER_LOG = re.compile(r"migration: switchover: .*; downtime \d+ ms \(([\d.]+) ms\)")


def logged_downtime(log: str) -> float | None:
    """The downtime (seconds, to the µs) a source's ``-d migration`` log shows for its
    switchover, or None: ``query-migrate`` rounds it down to whole milliseconds."""
    found = _SWITCHOVER_LOG.findall(log)
    return float(found[-1]) / 1e3 if found else None


def parse_append(append: str) -> dict[str, str]:
    """``key=value`` words of a guest command line."""
    return dict(w.split("=", 1) for w in append.split() if "=" in w)


def dirty_range(append: str) -> tuple[int, int]:
    """The byte range ``dirty.elf`` writes for ``append`` (``start``/``size`` in MiB,
    defaults 1 and 8, as firmware/dirty.s reads them)."""
    kv = parse_append(append)
    return int(kv.get("start", 1)) << 20, int(kv.get("size", 8)) << 20


@dataclass
class RealResult:
    """One real migration.  Times in seconds; ``samples``: (t, transferred bytes,
    remaining bytes, dirty-sync-count); ``progress``: (t, guest writes so far)."""

    policy: str
    status: str
    error: str = ""
    total_time: float = math.nan
    #: seconds; to the µs when the source logged its switchover (``-d migration``),
    #: else ``query-migrate``'s whole milliseconds
    downtime: float = math.nan
    setup_time: float = 0.0
    bytes_sent: int = 0
    downtime_bytes: int = 0
    rounds: int = 0
    samples: list[tuple[float, int, int, int]] = field(default_factory=list)
    progress: list[tuple[float, int]] = field(default_factory=list)
    history: list[RoundRecord] = field(default_factory=list)
    #: pages that read all zero just before the migration started (when asked for)
    zero: np.ndarray | None = None
    #: seconds from that reading to the ``migrate`` command (the guest writes meanwhile)
    zero_age: float = 0.0

    def as_sim(self, trace: str = "", link: str = "real") -> SimResult:
        """The same figures in the simulator's result type (for tables and plots)."""
        return SimResult(self.policy, trace, link, self.status, rounds=self.rounds,
                         pages_sent=0, bytes_sent=self.bytes_sent, total_time=self.total_time,
                         downtime=self.downtime, error=self.error, history=list(self.history),
                         precopy_time=self.total_time - self.downtime
                         if not math.isnan(self.downtime) else self.total_time)


def rounds_from_samples(samples: Sequence[tuple[float, int, int, int]]) -> list[RoundRecord]:
    """Rounds rebuilt from polls: one record per increase of ``dirty-sync-count``
    after the setup sync."""
    out: list[RoundRecord] = []
    last_t, last_bytes, last_sync = 0.0, 0, 1
    for t, moved, remaining, sync in samples:
        if sync > last_sync and sync >= 2:
            out.append(RoundRecord(len(out), last_t, t - last_t, 0, moved - last_bytes, 0,
                                   remaining // PAGE_SIZE, 0))
            last_t, last_bytes = t, moved
        last_sync = max(last_sync, sync)
    return out


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the lab process dies (prctl(2)
    PR_SET_PDEATHSIG), so a killed lab run leaves no VM behind."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class _Vm:
    """One ``python -m pyvm`` process with a QMP socket in ``workdir``."""

    def __init__(self, workdir: str, sockdir: str, name: str, args: Sequence[str],
                 prefix: Sequence[str] = (), serial: str = "null") -> None:
        from pyvm import qmp_client

        self.sock = os.path.join(sockdir, f"{name}.qmp")
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        self.log_path = os.path.join(workdir, f"{name}.stderr")
        cmd = [*prefix, sys.executable, "-m", "pyvm", *args, "-display", "none",
               "-serial", serial, "-qmp", f"unix:{self.sock},server=on,wait=off"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log,
                                         preexec_fn=_die_with_parent)
        try:
            deadline = time.monotonic() + 30
            while not os.path.exists(self.sock):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise LabError(f"{name}: pyvm did not start: {self.stderr()}")
                time.sleep(0.02)
            self.qmp = qmp_client.connect(self.sock, timeout=20)
        except BaseException:
            self.kill()
            raise

    def stderr(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace").strip()[-500:]
        except OSError:
            return ""

    def cmd(self, name: str, **args: Any) -> Any:
        from pyvm import qmp_client

        try:
            return qmp_client.command(self.qmp, name, **args)
        except qmp_client.ToolError as err:
            raise LabError(str(err)) from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        qmp = getattr(self, "qmp", None)
        if qmp is not None:
            try:
                qmp.close()
            except Exception:  # noqa: BLE001 - the process is gone already
                pass


def guest_writes(vm: _Vm, rng: tuple[int, int], scratch: str) -> int:
    """dirty.elf's write count: the first words of its range's pages, summed."""
    vm.cmd("pmemsave", val=rng[0], size=rng[1], filename=scratch)
    data = np.fromfile(scratch, dtype="<u4")
    return int(data[::PAGE_SIZE // 4].sum(dtype=np.uint64))


def _read_text(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def migrate(kernel: str, append: str, ram: str, policy: str, *, workdir: str,
            max_bandwidth: int = 0, downtime_limit_ms: int = 300, warmup: float = 0.5,
            timeout: float = 120.0, poll: float = POLL, progress: bool = True,
            zero_scan: bool = False,
            src_prefix: Sequence[str] = (), dst_prefix: Sequence[str] = (),
            uri: str = "", incoming: str = "", workload: str = "",
            src_args: Sequence[str] = (), progress_every: float = 4 * POLL) -> RealResult:
    """Migrate a running guest from one pyvm process to another under ``policy``.

    ``workload`` (:mod:`pyvm.lab.linux_workloads`, e.g. ``dd-tmpfs:mb=8``): the guest is
    the Linux one instead of ``kernel``/``append``; the source boots to its shell, the
    workload is typed on its serial console, and ``warmup`` counts from the workload's
    marker.  Progress counters are ``dirty.elf``'s, so ``progress`` is off then.
    ``progress``: read ``dirty.elf``'s write counters before the migration, every
    ``progress_every`` seconds during it (``math.inf``: never; each reading is a
    ``pmemsave`` of the range, which costs the source CPU) and once more after it
    completed (the paused source's final count).  ``src_args``: more options for the source (``-d migration`` logs every round into
    ``workdir/src.stderr``).  ``uri``/``incoming`` default to a unix socket in ``workdir``.  Returns when the
    migration completed or failed, or after ``timeout`` seconds (status ``timeout``);
    both processes are killed before it returns, whatever happened.
    """
    os.makedirs(workdir, exist_ok=True)
    # Unix socket paths are short (108 bytes): the sockets live in a fresh short folder.
    sockdir = tempfile.mkdtemp(prefix="pyvm-lab-")
    if not uri:
        path = os.path.join(sockdir, "migrate.sock")
        uri = incoming = f"unix:{path}"
    serial = "null"
    if workload:
        from pyvm.lab.linux_workloads import (WorkloadConsole, linux_cmdline, linux_files,
                                              parse_workload, serial_path)

        wl = parse_workload(workload)
        kernel, initrd = linux_files()
        guest = ["-m", ram, "-kernel", kernel, "-initrd", initrd, "-append", linux_cmdline()]
        serial = f"unix:{serial_path(sockdir)},server=on,wait=off"
        progress = False
    else:
        guest = ["-m", ram, "-kernel", kernel, "-append", append]
    scratch = os.path.join(workdir, "progress.bin")
    rng = dirty_range(append)
    src = dst = None
    console = None
    try:
        src = _Vm(workdir, sockdir, "src", [*guest, *src_args], src_prefix, serial)
        if workload:
            console = WorkloadConsole(serial_path(sockdir))
            console.start(wl)
        dst = _Vm(workdir, sockdir, "dst", [*guest, "-S", "-incoming", incoming], dst_prefix)
        time.sleep(warmup)      # the guest's own start-up, as 'record --warmup' waits
        src.cmd("migrate-set-parameters", **{
            "x-policy": policy, "downtime-limit": downtime_limit_ms,
            "max-bandwidth": max_bandwidth})
        res = RealResult(policy, "timeout")
        if progress:
            # Read first: a pmemsave stalls the guest, and dirty.elf catches the ticks it
            # missed up afterwards, so the stall belongs inside the measured span.
            before = time.monotonic()
            writes = guest_writes(src, rng, scratch)
            read_at = (before + time.monotonic()) / 2     # pmemsave's copy, about
        if zero_scan:
            before = time.monotonic()
            src.cmd("pmemsave", val=0, size=parse_size(ram), filename=scratch)
            scanned_at = (before + time.monotonic()) / 2
            pages = np.fromfile(scratch, dtype=np.uint64).reshape(-1, PAGE_SIZE // 8)
            res.zero = np.logical_not(pages.any(axis=1))
        t0 = time.monotonic()
        if zero_scan:
            res.zero_age = t0 - scanned_at
        if progress:
            res.progress.append((read_at - t0, writes))
        src.cmd("migrate", uri=uri)
        next_progress = t0 + progress_every
        cancelled_at = 0.0
        while True:
            info = src.cmd("query-migrate")
            t = time.monotonic() - t0
            ram_info = info.get("ram", {})
            res.samples.append((t, int(ram_info.get("transferred", 0)),
                                int(ram_info.get("remaining", 0)),
                                int(ram_info.get("dirty-sync-count", 0))))
            status = info.get("status", "")
            if status in ("completed", "failed", "cancelled") or \
                    (cancelled_at and t > cancelled_at + 10):
                res.status = status
                res.error = info.get("error-desc", "")
                res.total_time = info.get("total-time", 0) / 1e3
                res.downtime = info.get("downtime", math.nan) / 1e3 \
                    if "downtime" in info else math.nan
                res.setup_time = info.get("setup-time", 0) / 1e3
                res.bytes_sent = int(ram_info.get("transferred", 0))
                res.downtime_bytes = int(ram_info.get("downtime-bytes", 0))
                res.rounds = max(0, int(ram_info.get("dirty-sync-count", 2)) - 2)
                if status != "completed" and res.samples[:-1]:
                    # no statistics after a cancel or failure: the last poll's, then
                    t, moved, _, sync = max(res.samples, key=lambda s: s[1])
                    res.total_time, res.bytes_sent, res.rounds = t, moved, max(0, sync - 1)
                break
            if t > timeout and not cancelled_at:
                src.cmd("migrate_cancel")       # the guest keeps running on the source
                cancelled_at = t
            if progress and status == "active" and time.monotonic() >= next_progress:
                res.progress.append((time.monotonic() - t0, guest_writes(src, rng, scratch)))
                next_progress = time.monotonic() + progress_every
            time.sleep(poll)
        if res.status == "completed":
            exact = logged_downtime(_read_text(src.log_path))
            if exact is not None and abs(exact - res.downtime) < 0.0011:
                res.downtime = exact
        if progress and res.status == "completed":
            # the source is paused now: its counters are the guest's last before the stop
            res.progress.append((res.total_time - res.downtime, guest_writes(src, rng, scratch)))
        res.history = rounds_from_samples(res.samples)
        return res
    finally:
        if console is not None:
            console.close()
        for vm in (src, dst):
            if vm is not None:
                vm.kill()
        shutil.rmtree(sockdir, ignore_errors=True)
