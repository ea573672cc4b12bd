"""Migration throughput per transport, next to the raw transport moving the same bytes.

    .venv/bin/python bench/migration.py [--size-mib 1024] [--transports tcp,unix,file,exec,rdma] [--repeat 3]
    .venv/bin/python bench/migration.py --multifd [--qemu] [--file [--no-tcp]] [--size-mib 256]
                                        [--repeat 3]

For each transport it migrates a paused guest whose RAM is full of random bytes (a
private mapping of a random file: every page is a PAGE record) and one whose RAM is
zero (idle: ZERO records), between two real pyvm processes.  The destination is started
first with ``-incoming defer`` and its start-up is not timed:

- tcp, unix, rdma: from ``migrate`` on the source to ``completed`` on the destination;
- file, exec: save (``migrate`` to the source's ``completed``) plus restore
  (``migrate-incoming`` to the destination's ``completed``).

The fully dirty case runs twice: with the destination's RAM fresh (each page the stream
writes is faulted in on the way) and with ``prealloc=on`` on both sides (RAM populated at
start-up, as a destination prepared for a migration is; the source's pages are then
resident, as a running guest's are).

In the same run it times the raw transport moving the same number of bytes: a socket
copy (tcp, unix, and rdma over libfabric's tcp provider), a file write + fsync + read
(file), a pipe into ``cat > FILE`` and back out of ``cat FILE`` (exec).  Those move the
bytes through a small buffer that stays in the cache; a migration reads the source's RAM
and writes the destination's.  So for the sockets it also times a copy from the random
file's pages into fresh memory ("raw RAM to RAM", both populated first), the memory
traffic any migration of that RAM has, and prints pyvm's throughput against it.
Every time is the median of ``--repeat`` runs (the machines this runs on are noisy).

``--multifd`` instead migrates fully dirty RAM (random and compressible pages) over tcp:
the single stream and multifd 1/2/4 channels with none/zlib/zstd, pyvm and (``--qemu``)
QEMU 7.2, with wall time, compression ratio and CPU seconds per GiB; ``--file`` adds the
same RAM saved to and restored from a file on disk: the plain file stream, mapped-ram, and
mapped-ram with multifd at 1/2/4 channels (threads that pwrite the save and pread the
restore), with save and restore times and the file size.
Prints one line per transport and, last, ``ratio=<raw time / pyvm time>``: the smallest
over tcp, unix, file and exec, fully dirty, preallocated (rdma's is printed on its line).
"""

from __future__ import annotations

import argparse
import mmap
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.vmproc import VmProcess  # noqa: E402

from pyvm.guests import guest_path  # noqa: E402


def raw_socket(family: int, addr, nbytes: int, ram: Path | None = None) -> float:
    """A socket copy of ``nbytes`` through a 1 MiB buffer on each side; with ``ram`` (a
    file of ``nbytes``), from that file's pages into ``nbytes`` of fresh memory instead,
    both populated first: the memory traffic a migration cannot avoid."""
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.bind(addr)
    srv.listen(1)
    bound = srv.getsockname()
    got = [0]
    if ram is not None:
        with open(ram, "rb") as f:
            source = mmap.mmap(f.fileno(), nbytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
        source.madvise(getattr(mmap, "MADV_POPULATE_READ", 22))
        target = mmap.mmap(-1, nbytes)
        target.madvise(getattr(mmap, "MADV_POPULATE_WRITE", 23))
        data = memoryview(source)
        chunks = [data[off:off + (1 << 20)] for off in range(0, nbytes, 1 << 20)]
        into = memoryview(target)
    else:
        chunks = [memoryview(os.urandom(1 << 20))] * (nbytes >> 20)
        into = memoryview(bytearray(1 << 20))

    def reader() -> None:
        c, _ = srv.accept()
        while True:
            at = got[0] % into.nbytes
            n = c.recv_into(into[at:at + (1 << 20)])
            if not n:
                break
            got[0] += n
        c.close()
    t = threading.Thread(target=reader)
    t.start()
    t0 = time.perf_counter()
    s = socket.socket(family, socket.SOCK_STREAM)
    s.connect(bound)
    for chunk in chunks:
        s.sendall(chunk)
    s.close()
    t.join()
    srv.close()
    assert got[0] == nbytes
    return time.perf_counter() - t0


def raw_file(path: Path, nbytes: int) -> float:
    data = os.urandom(1 << 20)
    buf = bytearray(1 << 20)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(nbytes >> 20):
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - t0


def raw_exec(path: Path, nbytes: int) -> float:
    data = os.urandom(1 << 20)
    buf = bytearray(1 << 20)
    t0 = time.perf_counter()
    with subprocess.Popen(["/bin/sh", "-c", f"cat > {path}"], stdin=subprocess.PIPE) as p:
        assert p.stdin is not None
        for _ in range(nbytes >> 20):
            p.stdin.write(data)
        p.stdin.close()
    with subprocess.Popen(["/bin/sh", "-c", f"cat {path}"], stdout=subprocess.PIPE) as p:
        assert p.stdout is not None
        while p.stdout.readinto(buf):
            pass
    return time.perf_counter() - t0


def cpu_seconds(vm: VmProcess) -> float:
    """User + system CPU time the process used so far (its threads included)."""
    with open(f"/proc/{vm.proc.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of ``pid`` so far."""
    out: dict[int, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def busiest(before: dict[int, float], after: dict[int, float], n: int = 3) -> list[float]:
    """The ``n`` largest per-thread CPU seconds between two :func:`thread_cpu` samples."""
    return sorted((after[t] - before.get(t, 0.0) for t in after), reverse=True)[:n]


def wait_status(vm: VmProcess, states: tuple[str, ...]) -> dict:
    """Block on the VM's MIGRATION events (capability ``events``) until one of ``states``:
    exact, and no polling load on the processes being measured."""
    deadline = time.monotonic() + 600
    while True:
        event = vm.qmp.pull_event(wait=max(0.1, deadline - time.monotonic()))
        if event is None:
            raise AssertionError(f"{vm.name}: no MIGRATION event in {states}")
        if event["event"] == "MIGRATION" and event["data"]["status"] in states:
            return vm.cmd("query-migrate")


def migrate(tmp: Path, transport: str, src_args: list[str], dst_args: list[str]) -> dict:
    guest = ["-kernel", guest_path("memcheck.elf"), "-display", "none", "-S"]
    state = tmp / "state"
    env = {"PYVM_RDMA_PROVIDER": os.environ.get("PYVM_RDMA_PROVIDER", "tcp")}
    dst = VmProcess(tmp, "dst", *dst_args, *guest, "-incoming", "defer", serial=False, env=env)
    src = VmProcess(tmp, "src", *src_args, *guest, serial=False, env=env)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})   # default is 128 MiB/s
    for vm in (src, dst):
        vm.cmd("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
    try:
        if transport in ("tcp", "unix", "rdma"):
            if transport == "unix":
                uri = f"unix:{tmp / 'mig.sock'}"
                dst.cmd("migrate-incoming", uri=uri)
            else:
                s = socket.socket()
                s.bind(("127.0.0.1", 0))
                uri = f"{transport}:127.0.0.1:{s.getsockname()[1]}"
                s.close()
                dst.cmd("migrate-incoming", uri=uri)
                if transport == "tcp":
                    uri = "tcp:127.0.0.1:" + dst.cmd("query-migrate")["socket-address"][0]["port"]
            cpu0 = cpu_seconds(src), cpu_seconds(dst)
            t0 = time.perf_counter()
            src.cmd("migrate", uri=uri)
            info = wait_status(src, ("completed", "failed", "cancelled"))
            done = wait_status(dst, ("completed", "failed"))
            wall = time.perf_counter() - t0
            cpu = cpu_seconds(src) - cpu0[0], cpu_seconds(dst) - cpu0[1]
        else:
            cpu = (0.0, 0.0)
            out, back = ((f"file:{state}", f"file:{state}") if transport == "file"
                         else (f"exec:cat > {state}", f"exec:cat {state}"))
            t0 = time.perf_counter()
            src.cmd("migrate", uri=out)
            info = wait_status(src, ("completed", "failed", "cancelled"))
            t1 = time.perf_counter()
            dst.cmd("migrate-incoming", uri=back)
            done = wait_status(dst, ("completed", "failed"))
            wall = (t1 - t0) + (time.perf_counter() - t1)
    finally:
        src.close()
        dst.close()
    assert info["status"] == "completed" and done["status"] == "completed", (info, done)
    return {"wall": wall, "bytes": info["ram"]["transferred"], "cpu": cpu}


# -- multifd (``--multifd``) ------------------------------------------------------------------
MULTIFD_CASES = [("single stream", 0, "none")] + [
    (f"multifd {n} {comp}", n, comp) for comp in ("none", "zlib", "zstd") for n in (1, 2, 4)]


def _compressible_ram(path: Path, size_mib: int) -> None:
    """Pages of text-like bytes (a small alphabet, random order): every page is different
    and non-zero, and compresses about 2:1 -- a guest's page cache more than its noise."""
    rng = np.random.default_rng(7)
    with open(path, "wb") as f:
        for _ in range(size_mib):
            f.write(rng.integers(97, 113, 1 << 20, dtype="uint8").tobytes())


def _multifd_settings(vm, channels: int, compression: str) -> None:
    vm.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
    if channels:
        vm.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
        vm.cmd("migrate-set-parameters", **{"multifd-channels": channels,
                                            "multifd-compression": compression})


def _poll_status(vm, states: tuple[str, ...], sample: Callable[[], None] | None = None) -> dict:
    deadline = time.monotonic() + 900
    last = 0.0
    while time.monotonic() < deadline:
        info = vm.cmd("query-migrate")
        if info.get("status") in states:
            return info
        if sample is not None and time.monotonic() - last > 0.1:
            sample()
            last = time.monotonic()
        time.sleep(0.01)
    raise AssertionError(f"{vm.name}: migration not in {states}")


def multifd_once(tmp: Path, qemu: str | None, mem: Path, size_mib: int, channels: int,
                 compression: str) -> dict:
    """One paused guest whose RAM is ``mem`` (private mapping) migrated over tcp, pyvm to
    pyvm or (``qemu`` given) QEMU to QEMU; both processes are started first, not timed."""
    backend = ["-object", f"memory-backend-file,id=r,size={size_mib}M,mem-path={mem},"
               f"share=off,prealloc=on", "-machine", "memory-backend=r"]
    fresh = ["-object", f"memory-backend-ram,id=r,size={size_mib}M,prealloc=on",
             "-machine", "memory-backend=r"]
    port = socket.create_server(("127.0.0.1", 0))
    uri = f"tcp:127.0.0.1:{port.getsockname()[1]}"
    port.close()
    if qemu is None:
        guest = ["-kernel", guest_path("memcheck.elf"), "-display", "none", "-S"]
        dst = VmProcess(tmp, "dst", *fresh, *guest, "-incoming", "defer", serial=False,
                        connect_timeout=180)
        src = VmProcess(tmp, "src", *backend, *guest, serial=False, connect_timeout=180)
    else:
        from qemu_compare import Vm
        base = [qemu, "-machine", "pc", "-accel", "tcg", "-nodefaults", "-m", f"{size_mib}M",
                "-display", "none", "-S"]
        dst = Vm(tmp, "qdst", [*base, *fresh, "-incoming", "defer"], connect_timeout=180)
        src = Vm(tmp, "qsrc", [*base, *backend], connect_timeout=180)
    try:
        for vm in (src, dst):
            _multifd_settings(vm, channels, compression)
        dst.cmd("migrate-incoming", uri=uri)
        cpu0 = cpu_seconds(src), cpu_seconds(dst)
        threads0 = thread_cpu(src.proc.pid), thread_cpu(dst.proc.pid)
        t0 = time.perf_counter()
        seen: tuple[dict[int, float], dict[int, float]] = ({}, {})

        def sample() -> None:
            # page channel threads end with the migration: keep the last figure of each
            for vm, into in ((src, seen[0]), (dst, seen[1])):
                into.update(thread_cpu(vm.proc.pid))
        src.cmd("migrate", uri=uri)
        info = _poll_status(src, ("completed", "failed", "cancelled"), sample)
        done = _poll_status(dst, ("completed", "failed"), sample)
        wall = time.perf_counter() - t0
        cpu = cpu_seconds(src) - cpu0[0] + cpu_seconds(dst) - cpu0[1]
        threads = (busiest(threads0[0], seen[0]), busiest(threads0[1], seen[1]))
    finally:
        src.close()
        dst.close()
    assert info["status"] == "completed" and done["status"] == "completed", (info, done)
    ram = info["ram"]
    # RAM bytes over every byte sent (main stream and page channels alike)
    return {"wall": wall, "cpu": cpu, "ratio": size_mib * (1 << 20) / max(ram["transferred"], 1),
            "threads": threads}


FILE_CASES = [("plain file stream", False, 0), ("mapped-ram", True, 0)] + [
    (f"mapped-ram multifd {n}", True, n) for n in (1, 2, 4)]


def file_once(tmp: Path, disk: Path, mem: Path, size_mib: int, mapped: bool,
              channels: int, max_bandwidth: int = 1 << 40) -> dict:
    """One paused pyvm guest whose RAM is ``mem`` saved to a file on disk and restored into
    a fresh VM (``-incoming defer``): the plain file stream, or mapped-ram (with multifd on
    both sides at ``channels`` channels: threads pwrite the save and pread the restore).
    Both VMs are started before the timing.  ``max_bandwidth``: the save's (QEMU's default
    is 128 MiB/s; unlimited by default here)."""
    backend = ["-object", f"memory-backend-file,id=r,size={size_mib}M,mem-path={mem},"
               f"share=off,prealloc=on", "-machine", "memory-backend=r"]
    fresh = ["-object", f"memory-backend-ram,id=r,size={size_mib}M,prealloc=on",
             "-machine", "memory-backend=r"]
    guest = ["-kernel", guest_path("memcheck.elf"), "-display", "none", "-S"]
    state = disk / "state"
    state.unlink(missing_ok=True)
    dst = VmProcess(tmp, "fdst", *fresh, *guest, "-incoming", "defer", serial=False,
                    connect_timeout=180)
    src = VmProcess(tmp, "fsrc", *backend, *guest, serial=False, connect_timeout=180)
    try:
        for vm in (src, dst):
            caps = (["mapped-ram"] if mapped else []) + (["multifd"] if channels else [])
            if caps:
                vm.cmd("migrate-set-capabilities",
                       capabilities=[{"capability": c, "state": True} for c in caps])
            if channels:
                vm.cmd("migrate-set-parameters", **{"multifd-channels": channels})
        src.cmd("migrate-set-parameters", **{"max-bandwidth": max_bandwidth})
        cpu0 = cpu_seconds(src)
        t0 = time.perf_counter()
        src.cmd("migrate", uri=f"file:{state}")
        info = _poll_status(src, ("completed", "failed", "cancelled"))
        save = time.perf_counter() - t0
        save_cpu = cpu_seconds(src) - cpu0
        assert info["status"] == "completed", info
        cpu1 = cpu_seconds(dst)
        t0 = time.perf_counter()
        dst.cmd("migrate-incoming", uri=f"file:{state}")
        done = _poll_status(dst, ("completed", "failed"))
        restore = time.perf_counter() - t0
        restore_cpu = cpu_seconds(dst) - cpu1
        assert done["status"] == "completed", done
    finally:
        src.close()
        dst.close()
    size = state.stat().st_size
    state.unlink()
    return {"save": save, "restore": restore, "cpu": save_cpu + restore_cpu, "size": size,
            "save_cpu": save_cpu, "restore_cpu": restore_cpu}


def file_bench(a: argparse.Namespace, tmp: Path, contents: dict[str, Path]) -> None:
    """The same RAM saved to and restored from a file on disk (pyvm only: QEMU 7.2 has
    no mapped-ram)."""
    size = a.size_mib << 20
    results: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="pyvm-bench-file-") as d:
        for _ in range(a.repeat):
            for content, mem in contents.items():
                for label, mapped, n in FILE_CASES:
                    run = file_once(tmp, Path(d), mem, a.size_mib, mapped, n,
                                    a.file_max_bandwidth << 20)
                    results.setdefault((content, label), []).append(run)
                    print(f"  ({content} file {label}: save {run['save']:.2f} s, restore "
                          f"{run['restore']:.2f} s)", file=sys.stderr, flush=True)
    print(f"{a.size_mib} MiB paused guest saved to a file on disk (max-bandwidth "
          f"{a.file_max_bandwidth} MiB/s) and restored, pyvm; median "
          f"of {a.repeat} (min..max); CPU s/GiB: the saving source, the restoring destination")
    for content in contents:
        for label, _, _ in FILE_CASES:
            runs = results[(content, label)]
            parts = []
            for key in ("save", "restore"):
                vals = [r[key] for r in runs]
                parts.append(f"{key} {statistics.median(vals):6.2f} s "
                             f"({min(vals):.2f}..{max(vals):.2f})")
            gib = size / (1 << 30)
            save_cpu = statistics.median(r["save_cpu"] for r in runs) / gib
            restore_cpu = statistics.median(r["restore_cpu"] for r in runs) / gib
            print(f"{content:>12} file {label:<22} {'  '.join(parts)}  file "
                  f"{statistics.median(r['size'] for r in runs) / size:5.3f} x RAM  "
                  f"CPU s/GiB save {save_cpu:5.2f} restore {restore_cpu:5.2f}", flush=True)
        for key in ("save", "restore"):
            one = statistics.median(r[key] for r in results[(content, "mapped-ram multifd 1")])
            two = statistics.median(r[key] for r in results[(content, "mapped-ram multifd 2")])
            print(f"{content:>12} file mapped-ram multifd {key}: 2 channels / 1 channel "
                  f"= {two / one:.3f}", flush=True)


def multifd_bench(a: argparse.Namespace) -> None:
    """Fully dirty RAM over tcp: the single stream and multifd 1/2/4 channels with
    none/zlib/zstd, random and compressible pages, pyvm and (with ``--qemu``) QEMU in the
    same run; the cases interleaved, each the median of ``--repeat`` runs."""
    qemu = None
    if a.qemu:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from qemu_compare import ensure_qemu
        qemu = ensure_qemu()
    size = a.size_mib << 20
    runners = [("pyvm", None)] + ([("QEMU", qemu)] if qemu else [])
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
        tmp = Path(d)
        contents = {"random": tmp / "random.ram", "compressible": tmp / "text.ram"}
        with open(contents["random"], "wb") as f:
            for _ in range(a.size_mib):
                f.write(os.urandom(1 << 20))
        _compressible_ram(contents["compressible"], a.size_mib)
        if a.file:
            file_bench(a, tmp, contents)
        if not a.tcp:
            return
        results: dict[tuple[str, str, str], list[dict]] = {}
        cases = [c for c in MULTIFD_CASES if not a.cases or c[0] in a.cases.split(",")]
        if a.contents:
            contents = {k: v for k, v in contents.items() if k in a.contents.split(",")}
        for _ in range(a.repeat):               # interleaved: noise hits every case alike
            for content, mem in contents.items():
                for who, q in runners:
                    for label, n, comp in cases:
                        run = multifd_once(tmp, q, mem, a.size_mib, n, comp)
                        results.setdefault((content, who, label), []).append(run)
                        src_t, dst_t = run["threads"]
                        print(f"  ({content} {who} {label}: {run['wall']:.2f} s; busiest threads, "
                              f"CPU s: source {', '.join(f'{t:.2f}' for t in src_t)}; "
                              f"destination {', '.join(f'{t:.2f}' for t in dst_t)})",
                              file=sys.stderr, flush=True)
        print(f"{a.size_mib} MiB paused guest, every page non-zero, tcp 127.0.0.1, "
              f"{os.cpu_count()} CPUs; median of {a.repeat} (min..max); "
              f"CPU s/GiB = source + destination CPU seconds per GiB of RAM")
        for content in contents:
            for who, _ in runners:
                single = results.get((content, who, "single stream"))
                base = statistics.median(r["wall"] for r in single) if single else float("nan")
                for label, _, _ in cases:
                    runs = results[(content, who, label)]
                    walls = [r["wall"] for r in runs]
                    wall = statistics.median(walls)
                    cpu = statistics.median(r["cpu"] for r in runs) / (size / (1 << 30))
                    ratio = statistics.median(r["ratio"] for r in runs)
                    print(f"{content:>12} {who:>4} {label:<16} {wall:6.2f} s "
                          f"({min(walls):.2f}..{max(walls):.2f}) {size / wall / 1e6:6.0f} MB/s "
                          f"speed-up vs single {base / wall:4.2f}  compression {ratio:4.2f}:1  "
                          f"CPU {cpu:5.2f} s/GiB", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--multifd", action="store_true",
                    help="multifd 1/2/4 channels x none/zlib/zstd vs the single stream instead")
    ap.add_argument("--qemu", action="store_true", help="with --multifd: QEMU 7.2 too")
    ap.add_argument("--file", action="store_true",
                    help="with --multifd: also save/restore through a file (plain stream, "
                         "mapped-ram, mapped-ram + multifd 1/2/4 channels)")
    ap.add_argument("--file-max-bandwidth", type=int, default=1 << 20,
                    help="with --file: the save's max-bandwidth in MiB/s (QEMU's default: 128)")
    ap.add_argument("--cases", default="",
                    help="with --multifd: only these tcp cases (comma-separated labels, e.g. "
                         "'multifd 1 zlib,multifd 2 zlib')")
    ap.add_argument("--contents", default="", help="with --multifd: random and/or compressible")
    ap.add_argument("--no-tcp", dest="tcp", action="store_false",
                    help="with --multifd --file: the file cases only")
    ap.add_argument("--transports", default="tcp,unix,file,exec,rdma",
                    help="rdma uses libfabric's provider from PYVM_RDMA_PROVIDER (default tcp)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per case; the median is shown")
    a = ap.parse_args()
    if a.multifd:
        multifd_bench(a)
        return
    size = a.size_mib << 20
    ratios = []
    walls: dict[str, float] = {}
    print(f"{a.size_mib} MiB guest; times in seconds, MB/s = RAM size / time", flush=True)
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
        tmp = Path(d)
        rand = tmp / "random.ram"
        with open(rand, "wb") as f:
            for _ in range(a.size_mib):
                f.write(os.urandom(1 << 20))

        def dirty(prealloc: str) -> list[str]:
            return ["-object", f"memory-backend-file,id=r,size={a.size_mib}M,mem-path={rand},"
                    f"share=off,prealloc={prealloc}", "-machine", "memory-backend=r"]

        def fresh(prealloc: str) -> list[str]:
            return ["-object", f"memory-backend-ram,id=r,size={a.size_mib}M,prealloc={prealloc}",
                    "-machine", "memory-backend=r"]

        for tr in a.transports.split(","):
            if tr in ("tcp", "rdma"):
                def raw_once() -> float:
                    return raw_socket(socket.AF_INET, ("127.0.0.1", 0), size)
            elif tr == "unix":
                def raw_once() -> float:
                    (tmp / "raw.sock").unlink(missing_ok=True)
                    return raw_socket(socket.AF_UNIX, str(tmp / "raw.sock"), size)
            elif tr == "file":
                def raw_once() -> float:
                    return raw_file(tmp / "raw.bin", size)
            else:
                def raw_once() -> float:
                    return raw_exec(tmp / "raw.bin", size)

            def median_of(run: Callable[[], float]) -> float:
                return statistics.median(run() for _ in range(a.repeat))
            raw = median_of(raw_once)
            (tmp / "raw.bin").unlink(missing_ok=True)
            ram_to_ram = None
            if tr in ("tcp", "unix"):
                def ram_once() -> float:
                    (tmp / "raw.sock").unlink(missing_ok=True)
                    if tr == "tcp":
                        return raw_socket(socket.AF_INET, ("127.0.0.1", 0), size, rand)
                    return raw_socket(socket.AF_UNIX, str(tmp / "raw.sock"), size, rand)
                ram_to_ram = median_of(ram_once)
            pre = [migrate(tmp, tr, dirty("on"), fresh("on")) for _ in range(a.repeat)]
            r_pre = statistics.median(run["wall"] for run in pre)
            r_fresh = median_of(lambda: migrate(tmp, tr, dirty("off"), fresh("off"))["wall"])
            idle = [migrate(tmp, tr, fresh("off"), fresh("off")) for _ in range(a.repeat)]
            r_idle = statistics.median(run["wall"] for run in idle)
            ratio = raw / r_pre
            if tr != "rdma":
                ratios.append(ratio)
            walls[tr] = r_pre

            def rate(t: float) -> str:
                return f"{t:5.2f} ({size / t / 1e6:6.0f} MB/s)"
            print(f"{tr:>5}: raw {rate(raw)} | dirty, prealloc {rate(r_pre)} ratio {ratio:.2f}"
                  f" | dirty, fresh dest {rate(r_fresh)} ratio {raw / r_fresh:.2f}"
                  f" | idle {r_idle:5.2f} ({idle[0]['bytes'] >> 10} KiB sent)", flush=True)
            if ram_to_ram is not None:
                cpu_src = statistics.median(run["cpu"][0] for run in pre)
                cpu_dst = statistics.median(run["cpu"][1] for run in pre)
                print(f"{'':>5}  raw RAM to RAM {rate(ram_to_ram)}: pyvm (prealloc) / raw RAM to RAM "
                      f"throughput {ram_to_ram / r_pre:.2f}; pyvm CPU seconds: source {cpu_src:.2f}, "
                      f"destination {cpu_dst:.2f}", flush=True)
    if "tcp" in walls and "rdma" in walls:
        provider = os.environ.get("PYVM_RDMA_PROVIDER", "tcp")
        print(f"rdma (libfabric provider {provider}) / tcp transport throughput: "
              f"{walls['tcp'] / walls['rdma']:.2f}")
    if ratios:
        print(f"ratio={min(ratios):.2f}")


if __name__ == "__main__":
    main()
