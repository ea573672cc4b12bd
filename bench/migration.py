"""Migration throughput per transport, next to the raw transport moving the same bytes.

    python bench/migration.py [--size-mib 1024] [--transports tcp,unix,file,exec]

For each transport it migrates a paused guest whose RAM is full of random bytes (a
private mapping of a random file: every page is a PAGE record) and one whose RAM is
zero (idle: ZERO records), between two real pyvm processes (file and exec: save, then
restore).  In the same run it times the raw transport moving the same number of bytes:
a socket copy (tcp, unix, and rdma over libfabric's tcp provider), a file write + fsync
(file), ``cat`` in a pipeline (exec).
Prints one line per case and ``ratio=<raw time / pyvm time>`` for fully dirty memory.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.vmproc import VmProcess  # noqa: E402

from pyvm.guests import guest_path  # noqa: E402


def raw_socket(family: int, addr, nbytes: int) -> float:
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.bind(addr)
    srv.listen(1)
    bound = srv.getsockname()
    got = [0]

    def reader() -> None:
        c, _ = srv.accept()
        buf = bytearray(1 << 20)
        while True:
            n = c.recv_into(buf)
            if not n:
                break
            got[0] += n
        c.close()
    t = threading.Thread(target=reader)
    t.start()
    data = memoryview(os.urandom(1 << 20))
    t0 = time.perf_counter()
    s = socket.socket(family, socket.SOCK_STREAM)
    s.connect(bound)
    for _ in range(nbytes >> 20):
        s.sendall(data)
    s.close()
    t.join()
    srv.close()
    assert got[0] == nbytes
    return time.perf_counter() - t0


def raw_file(path: Path, nbytes: int) -> float:
    data = os.urandom(1 << 20)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(nbytes >> 20):
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def raw_cat(src: Path, dst: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(f"cat {src} | cat > {dst}", shell=True, check=True)
    return time.perf_counter() - t0


def migrate(tmp: Path, transport: str, ram_args: list[str]) -> dict:
    args = [*ram_args, "-kernel", guest_path("memcheck.elf"), "-display", "none", "-S"]
    state = tmp / "state"
    if transport in ("tcp", "unix"):
        incoming = "tcp:127.0.0.1:0" if transport == "tcp" else f"unix:{tmp / 'mig.sock'}"
        dst = VmProcess(tmp, "dst", *args, "-incoming", incoming, serial=False)
        uri = incoming
        if transport == "tcp":
            uri = "tcp:127.0.0.1:" + dst.cmd("query-migrate")["socket-address"][0]["port"]
    elif transport == "rdma":
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        uri = f"rdma:127.0.0.1:{s.getsockname()[1]}"
        s.close()
        dst = VmProcess(tmp, "dst", *args, "-incoming", uri, serial=False,
                        env={"PYVM_RDMA_PROVIDER": os.environ.get("PYVM_RDMA_PROVIDER", "tcp")})
    src = VmProcess(tmp, "src", *args, serial=False,
                    env={"PYVM_RDMA_PROVIDER": os.environ.get("PYVM_RDMA_PROVIDER", "tcp")})
    if transport == "file":
        uri = f"file:{state}"
    elif transport == "exec":
        uri = f"exec:cat > {state}"
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})   # default is 128 MiB/s
    t0 = time.perf_counter()
    src.cmd("migrate", uri=uri)
    info = src.wait_migration(timeout=600)
    if transport in ("file", "exec"):
        incoming = f"file:{state}" if transport == "file" else f"exec:cat {state}"
        dst = VmProcess(tmp, "dst", *args, "-incoming", incoming, serial=False)
    dst.wait_migration(("completed", "failed"), timeout=600)
    wall = time.perf_counter() - t0
    src.close()
    dst.close()
    assert info["status"] == "completed", info
    return {"wall": wall, "total_ms": info["total-time"], "bytes": info["ram"]["transferred"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--transports", default="tcp,unix,file,exec,rdma",
                    help="rdma uses libfabric's provider from PYVM_RDMA_PROVIDER (default tcp)")
    a = ap.parse_args()
    size = a.size_mib << 20
    ratios = []
    walls: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
        tmp = Path(d)
        rand = tmp / "random.ram"
        with open(rand, "wb") as f:
            for _ in range(a.size_mib):
                f.write(os.urandom(1 << 20))
        dirty = ["-object", f"memory-backend-file,id=r,size={a.size_mib}M,mem-path={rand},share=off",
                 "-machine", "memory-backend=r"]
        idle = ["-m", f"{a.size_mib}M"]
        for tr in a.transports.split(","):
            if tr in ("tcp", "rdma"):
                raw = raw_socket(socket.AF_INET, ("127.0.0.1", 0), size)
            elif tr == "unix":
                raw = raw_socket(socket.AF_UNIX, str(tmp / "raw.sock"), size)
            elif tr == "file":
                raw = raw_file(tmp / "raw.bin", size)
            else:
                raw = raw_cat(rand, tmp / "raw.bin")
            (tmp / "raw.bin").unlink(missing_ok=True)
            r_dirty = migrate(tmp, tr, dirty)
            r_idle = migrate(tmp, tr, idle)
            ratio = raw / r_dirty["wall"]
            ratios.append(ratio)
            walls[tr] = r_dirty["wall"]
            print(f"{tr:>5}: dirty {r_dirty['wall']:6.2f} s ({size / r_dirty['wall'] / 1e6:7.1f} MB/s), "
                  f"idle {r_idle['wall']:5.2f} s ({r_idle['bytes'] >> 10} KiB sent), "
                  f"raw {raw:5.2f} s ({size / raw / 1e6:7.1f} MB/s), ratio {ratio:.2f}")
    if "tcp" in walls and "rdma" in walls:
        provider = os.environ.get("PYVM_RDMA_PROVIDER", "tcp")
        print(f"rdma (libfabric provider {provider}) / tcp transport throughput: "
              f"{walls['tcp'] / walls['rdma']:.2f}")
    print(f"ratio={min(ratios):.2f}")


if __name__ == "__main__":
    main()
