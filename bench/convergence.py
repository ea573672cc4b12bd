"""Precopy convergence: a guest dirtying at ~1/4 of the link completes, a faster one never does.

    .venv/bin/python bench/convergence.py [--link-mib 8] [--size-mib 64] [--budget 30] [--transport tcp]
                                          [--dirty-share 0.25]

Both cases live-migrate a running guest between two real pyvm processes over tcp (or
``--transport rdma``: libfabric, its tcp provider on a machine without an RDMA NIC) on
127.0.0.1 with ``max-bandwidth`` set to ``--link-mib`` MiB/s (the link) and QEMU's default
``downtime-limit`` (300 ms).

1. ``memcheck`` with ``rate=N`` (N pages per 100 Hz tick: N*100 pages/s), N chosen so the
   dirty rate is about ``--dirty-share`` of the link (a quarter by default).  It must complete with the measured
   ``downtime`` at most ``downtime-limit``; the destination then runs on without a FAIL line.
   If it is still ``active`` after ``--budget`` seconds the bench prints the last
   ``query-migrate`` figures (``mbps``, ``transferred``) and fails.
2. ``ab`` (one byte of every page of a ``--fast-mib`` MiB range incremented per pass, as
   fast as the vCPU goes), dirtying faster than the link.  It must not complete within
   ``--budget`` seconds and ``query-migrate`` must say so honestly: ``active``,
   ``dirty-sync-count`` growing, ``expected-downtime`` above the limit.  Then
   ``migrate_cancel``; the source guest must be running and printing again.

3. With ``--small-mib M``, instead of the two cases above: ``ab`` over a working set of M MiB,
   re-dirtied continuously but small enough to fit in the downtime at the link's rate.
   It must complete (the estimate of the bandwidth has to be real for that: with none,
   the few pages always dirty never fit), within ``--budget`` seconds.

4. With ``--hot``, instead: what makes a guest that precopy cannot move finish, in one
   table from one run.  The hot guest is ``store-loop`` rewriting 32 MiB of a 64 MiB VM
   word by word (CPU-bound, so throttling its vCPU slows its writes; its progress counter
   is in its registers, read once ECX shows store-loop runs: QEMU starts in its BIOS).
   One function per case (``HOT_CASES``, ``--cases`` picks some):

   * ``plain``: precopy alone; cancelled after ``--budget`` s if still active;
   * ``auto-converge``: the capability with QEMU's default parameters;
   * ``dirty-limit``: the capability with ``vcpu-dirty-limit`` 1 MB/s; QEMU 7.2 on TCG
     refuses it, and the row prints QEMU's own texts;
   * ``postcopy`` and ``postcopy 1 GiB``: ``postcopy-ram`` on both sides and
     ``migrate-start-postcopy`` after ``--postcopy-after`` syncs, the same guest in a
     64 MiB and a 1 GiB VM (the downtime should not grow with RAM);

   each for pyvm and, in the same run, QEMU 7.2 TCG (Debian's qemu-system-x86) running
   the same guest image, unless ``--no-qemu``.  Like for like: QEMU's TCG runs the guest
   tens of times faster than pyvm, so each VM gets a link of ``--link-share`` times its
   own guest's store rate (measured over 3 s just before the migration) and a downtime
   limit of 300 ms x ``--link-mib`` / that link: the guest dirties the same share of the
   link on both, and its hot range takes as many downtime limits to send
   (``--fixed-link``: ``--link-mib`` and 300 ms for both instead).  Printed per case:
   status, total time, downtime, the peak ``cpu-throttle-percentage`` seen, and the
   guest slowdown: 1 - the guest's progress rate from ``migrate`` to the end (counted on
   the destination after a postcopy) / its rate measured just before.

Last line: ``ratio=<measured downtime / downtime-limit>`` of case 1 (target <= 1.0); with
``--hot``: ``ratio=<pyvm auto-converge total time / QEMU auto-converge total time>``.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # progress as it runs
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(1, str(Path(__file__).resolve().parent))
from tests.vmproc import VmProcess  # noqa: E402
from tests.hot_guest import _REG, HOT_MIB, ONE_PASS, RAM_MIB  # noqa: E402

from pyvm.guests import guest_path  # noqa: E402

PAGE = 4096
TICK_HZ = 100                 # memcheck's rate= is pages per tick of its 100 Hz PIT timer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pair(tmp: Path, args: list[str], link: int,
         transport: str = "tcp") -> tuple[VmProcess, VmProcess, str]:
    """A running source and a destination with the same arguments; returns the URI."""
    if transport == "rdma":
        port = _free_port()
        dst = VmProcess(tmp, "dst", *args, "-incoming", f"rdma:127.0.0.1:{port}")
    else:
        dst = VmProcess(tmp, "dst", *args, "-incoming", "tcp:127.0.0.1:0")
        port = dst.cmd("query-migrate")["socket-address"][0]["port"]
    src = VmProcess(tmp, "src", *args)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": link})
    return src, dst, f"{transport}:127.0.0.1:{port}"


def converging(tmp: Path, size_mib: int, link: int, transport: str, budget: float,
               share: float = 0.25) -> float:
    rate = max(1, round(link * share / PAGE / TICK_HZ))
    dirty = rate * TICK_HZ * PAGE
    args = ["-m", f"{size_mib}M", "-kernel", guest_path("memcheck.elf"),
            "-append", f"start=1 size=16 rate={rate}", "-display", "none"]
    src, dst, uri = pair(tmp, args, link, transport)
    try:
        src.wait_serial("memcheck gen 1 ok", timeout=120)
        limit = src.cmd("query-migrate-parameters")["downtime-limit"]
        t0 = time.perf_counter()
        src.cmd("migrate", uri=uri)
        seen: dict[str, Any] = {}
        while True:
            info = src.cmd("query-migrate")
            if info["status"] == "active":
                seen = info
            if info["status"] in ("completed", "failed", "cancelled"):
                break
            if time.perf_counter() - t0 > budget:
                ram = info.get("ram", {})
                print(f"converging: NOT completed after {budget:.0f} s over {transport}: status "
                      f"{info['status']}, mbps {ram.get('mbps', 0):.3f}, transferred "
                      f"{ram.get('transferred', 0) / 1e6:.0f} MB, dirty-sync-count "
                      f"{ram.get('dirty-sync-count')}, expected-downtime "
                      f"{info.get('expected-downtime')} ms")
                src.cmd("migrate_cancel")
                raise SystemExit(1)
            time.sleep(0.1)
        wall = time.perf_counter() - t0
        assert info["status"] == "completed", info
        measured_rate = seen.get("ram", {}).get("dirty-pages-rate", 0) * PAGE
        print(f"converging: memcheck rate={rate} ({dirty / 1e6:.2f} MB/s asked, "
              f"{measured_rate / 1e6:.2f} MB/s measured in the last round), link {link / 1e6:.2f} MB/s "
              f"(dirty/link {dirty / link:.2f})")
        print(f"converging: completed over {transport} in {wall:.1f} s, "
              f"{info['ram']['dirty-sync-count']} syncs, last mbps {seen.get('ram', {}).get('mbps', 0):.1f}, "
              f"downtime {info['downtime']} ms, downtime-limit {limit} ms")
        dst.wait_migration(("completed",), timeout=60)
        assert dst.status() == "running", dst.status()
        base = dst.serial().count(" ok")
        deadline = time.monotonic() + 60
        while dst.serial().count(" ok") <= base and time.monotonic() < deadline:
            time.sleep(0.1)
        out = dst.serial()
        assert "FAIL" not in out, out[-300:]
        print(f"converging: destination running, memcheck carries on ({out.count(' ok')} "
              f"generations checked there, no FAIL)")
        return int(info["downtime"]) / limit
    finally:
        src.close()
        dst.close()


def small_working_set(tmp: Path, size_mib: int, small_mib: int, link: int, budget: float,
                      transport: str) -> None:
    args = ["-m", f"{size_mib}M", "-kernel", guest_path("ab.elf"),
            "-append", f"start=1 size={small_mib} passes=1", "-display", "none"]
    src, dst, uri = pair(tmp, args, link, transport)
    try:
        src.wait_serial("B", timeout=60)
        t0 = time.perf_counter()
        src.cmd("migrate", uri=uri)
        info: dict[str, Any] = {}
        while time.perf_counter() - t0 < budget:
            info = src.cmd("query-migrate")
            if info["status"] != "active" and info["status"] != "setup":
                break
            time.sleep(0.1)
        ram = info.get("ram", {})
        print(f"small working set ({small_mib} MiB, ab) over {transport}: status {info['status']} "
              f"after {time.perf_counter() - t0:.1f} s, mbps {ram.get('mbps', 0):.3f}, "
              f"transferred {ram.get('transferred', 0) / 1e6:.1f} MB, dirty-sync-count "
              f"{ram.get('dirty-sync-count')}, downtime {info.get('downtime')} ms, "
              f"expected-downtime {info.get('expected-downtime')} ms")
        if info["status"] == "active":
            src.cmd("migrate_cancel")
            raise SystemExit(1)
    finally:
        src.close()
        dst.close()


def diverging(tmp: Path, size_mib: int, fast_mib: int, link: int, budget: float,
              transport: str) -> None:
    args = ["-m", f"{size_mib}M", "-kernel", guest_path("ab.elf"),
            "-append", f"start=1 size={fast_mib} passes=1", "-display", "none"]
    src, dst, uri = pair(tmp, args, link, transport)
    try:
        src.wait_serial("B", timeout=60)
        limit = src.cmd("query-migrate-parameters")["downtime-limit"]
        src.cmd("migrate", uri=uri)
        t0 = time.perf_counter()
        samples = []
        while time.perf_counter() - t0 < budget:
            time.sleep(budget / 6)
            info = src.cmd("query-migrate")
            assert info["status"] == "active", info
            samples.append(info)
            ram = info["ram"]
            print(f"diverging: t={time.perf_counter() - t0:5.1f} s status {info['status']}, "
                  f"dirty-sync-count {ram['dirty-sync-count']}, "
                  f"dirty-pages-rate {ram['dirty-pages-rate']} ({ram['dirty-pages-rate'] * PAGE / 1e6:.1f} MB/s "
                  f"vs link {link / 1e6:.2f} MB/s), "
                  f"expected-downtime {info.get('expected-downtime')} ms (limit {limit} ms)")
        syncs = [s["ram"]["dirty-sync-count"] for s in samples]
        assert syncs[-1] > syncs[0], syncs
        assert samples[-1]["expected-downtime"] > limit, samples[-1]
        src.cmd("migrate_cancel")
        info = src.wait_migration(("cancelled", "failed", "completed"), timeout=60)
        assert info["status"] == "cancelled", info
        before = src.serial().count("B")
        time.sleep(2)
        after = src.serial().count("B")
        status = src.status()
        assert status == "running" and after > before, (status, before, after)
        print(f"diverging: not completed after {budget:.0f} s; migrate_cancel -> {info['status']}; "
              f"source {status}, ab printed {after - before} more B in 2 s")
    finally:
        src.close()
        dst.close()


# -- 4. the hot guest: plain precopy, auto-converge, dirty-limit, pyvm and QEMU ------------------

class _Hmp:
    """The hot guest's progress counter through either monitor (``info registers``)."""

    def __init__(self, vm: Any) -> None:
        self.vm = vm

    def hmp(self, line: str) -> str:
        return str(self.vm.cmd("human-monitor-command", **{"command-line": line}))


def counter(vm: Any) -> int | None:
    """store-loop's words stored so far, or None while the vCPU is not in store-loop yet.

    QEMU starts in its BIOS, whose registers make EAX*ECX-EDX any number (a first reading
    of 125 billion was seen): that reading, taken as the start of the 2 s rate measurement,
    is what made QEMU's rates negative.  store-loop keeps ECX at the range in words."""
    out = _Hmp(vm).hmp("info registers")
    regs = {name: int(value, 16) for name, value in _REG.findall(out)}
    if regs.get("ECX") != ONE_PASS:
        return None
    return regs["EAX"] * regs["ECX"] - regs["EDX"]


def _counter_when_running(vm: Any, timeout: float = 120) -> tuple[float, int]:
    """(time, counter) once store-loop has written its whole range at least once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        w = counter(vm)
        if w is not None and w > ONE_PASS:
            return time.monotonic(), w
        time.sleep(0.1)
    raise RuntimeError(f"{vm.name}: store-loop did not run")


def _hot_argv(impl: str, ram_mib: int) -> list[str]:
    from qemu_compare import ensure_qemu                 # bench/ sits on sys.path
    guest = ["-m", f"{ram_mib}M", "-kernel", guest_path("store-loop.elf"),
             "-append", f"start=1 size={HOT_MIB}", "-display", "none"]
    if impl == "qemu":
        return [ensure_qemu(), "-machine", "pc", "-accel", "tcg", "-nodefaults", *guest]
    return [sys.executable, "-m", "pyvm", *guest]


def _settings(free_bytes: float, a: argparse.Namespace) -> dict[str, Any]:
    """The link and downtime limit of one VM: like for like, the link carries
    ``--link-share`` of what this VM's guest stores per second (measured just before the
    migration), and the downtime limit is 300 ms scaled by --link-mib / that link, so the
    hot range takes as many downtime limits to send on both VMs.  Without --like-for-like:
    --link-mib and 300 ms for both."""
    ref = a.link_mib * (1 << 20)
    if not a.like_for_like:
        return {"max-bandwidth": int(ref), "downtime-limit": 300}
    link = max(int(free_bytes * a.link_share), 1 << 20)
    return {"max-bandwidth": link, "downtime-limit": max(1, round(300 * ref / link))}


def _hot_run(tmp: Path, impl: str, label: str, a: argparse.Namespace, budget: float,
             caps: list[str], params: dict[str, Any], ram_mib: int = RAM_MIB,
             postcopy_after: int = 0) -> dict[str, Any]:
    """Migrate the hot guest with ``caps`` and ``params`` (``postcopy_after``: postcopy-ram
    on both sides and migrate-start-postcopy after that many dirty syncs); the figures."""
    from qemu_compare import Vm, free_port                # bench/ sits on sys.path
    argv = _hot_argv(impl, ram_mib)
    port = free_port()
    uri = f"tcp:127.0.0.1:{port}"
    dst = Vm(tmp, f"{impl}-{label}-dst", [*argv, "-incoming", "defer"])
    src = Vm(tmp, f"{impl}-{label}-src", argv)
    try:
        _counter_when_running(src)
        t0, w0 = time.monotonic(), counter(src)
        time.sleep(3)
        w1 = counter(src)
        assert w0 is not None and w1 is not None
        free = (w1 - w0) / (time.monotonic() - t0)          # words per second
        settings = _settings(free * 4, a)
        src.cmd("migrate-set-parameters", **settings, **params)
        if postcopy_after:
            src.cmd("migrate-set-parameters",
                    **{"max-postcopy-bandwidth": settings["max-bandwidth"]})
            caps = [*caps, "postcopy-ram"]
            dst.cmd("migrate-set-capabilities",
                    capabilities=[{"capability": "postcopy-ram", "state": True}])
        if caps:
            src.cmd("migrate-set-capabilities",
                    capabilities=[{"capability": c, "state": True} for c in caps])
        dst.cmd("migrate-incoming", uri=uri)
        t0, w0 = time.monotonic(), counter(src)
        assert w0 is not None
        src.cmd("migrate", uri=uri)
        peak, switched = 0, False
        w_end: int | None = None
        t_end = t0
        while True:
            info = src.cmd("query-migrate")
            peak = max(peak, info.get("cpu-throttle-percentage", 0))
            if (postcopy_after and not switched and info["status"] == "active"
                    and info.get("ram", {}).get("dirty-sync-count", 0) >= postcopy_after):
                src.cmd("migrate-start-postcopy")
                switched = True
            if info["status"] not in ("setup", "active", "device", "pre-switchover",
                                      "postcopy-active"):
                break
            if time.monotonic() - t0 > budget:
                w_end, t_end = counter(src), time.monotonic()
                src.cmd("migrate_cancel")
                info = {**info, "status": f"{info['status']} after {budget:.0f} s (cancelled)"}
                break
            time.sleep(0.1)
        if info["status"] == "completed" and postcopy_after:
            # the guest runs on the destination: its count there, now
            dst_done = time.monotonic() + 60
            while dst.cmd("query-migrate").get("status") != "completed" \
                    and time.monotonic() < dst_done:
                time.sleep(0.02)
            w_end, t_end = counter(dst), time.monotonic()
        elif info["status"] == "completed":
            # the source's vCPU stopped at switchover: its registers hold the final count
            w_end = counter(src)
            t_end = t0 + (info["total-time"] - info["downtime"]) / 1000
        elif "cancelled" not in info["status"]:
            w_end, t_end = counter(src), time.monotonic()
        during = ((w_end - w0) / max(t_end - t0, 1e-3)) if w_end is not None else float("nan")
        return {"status": info["status"],
                "total_s": info.get("total-time", (t_end - t0) * 1000) / 1000,
                "downtime_ms": info.get("downtime"), "peak_throttle": peak,
                "slowdown": 1 - during / free if free > 0 else float("nan"),
                "free_mib_s": free * 4 / (1 << 20),
                "link_mib_s": settings["max-bandwidth"] / (1 << 20),
                "limit_ms": settings["downtime-limit"]}
    finally:
        src.close()
        dst.close()


def hot_plain(tmp: Path, impl: str, a: argparse.Namespace) -> dict[str, Any]:
    return _hot_run(tmp, impl, "plain", a, a.budget, [], {})


def hot_auto_converge(tmp: Path, impl: str, a: argparse.Namespace) -> dict[str, Any]:
    return _hot_run(tmp, impl, "ac", a, max(a.budget, 240), ["auto-converge"], {})


def hot_dirty_limit(tmp: Path, impl: str, a: argparse.Namespace) -> dict[str, Any] | str:
    if impl == "qemu":
        return _qemu_dirty_limit_refusal(tmp)
    return _hot_run(tmp, impl, "dl", a, max(a.budget, 240), ["dirty-limit"],
                    {"vcpu-dirty-limit": 1})


def _qemu_dirty_limit_refusal(tmp: Path) -> str:
    """QEMU's own answer to a dirty limit on TCG: the capability (8.1+) and the command."""
    from qemu_compare import Vm
    vm = Vm(tmp, "qemu-dl", _hot_argv("qemu", RAM_MIB))
    texts = []
    try:
        for cmd, args in (("migrate-set-capabilities",
                           {"capabilities": [{"capability": "dirty-limit", "state": True}]}),
                          ("set-vcpu-dirty-limit", {"dirty-rate": 1})):
            try:
                vm.cmd(cmd, **args)
                texts.append(f"{cmd}: accepted")
            except Exception as err:  # noqa: BLE001 - QEMU's refusal is the result
                texts.append(str(err).split(": ", 1)[1])
    finally:
        vm.close()
    return "refused: " + "; ".join(texts)


def hot_postcopy(tmp: Path, impl: str, a: argparse.Namespace,
                 ram_mib: int = RAM_MIB) -> dict[str, Any]:
    return _hot_run(tmp, impl, f"pc{ram_mib}", a, max(a.budget, 240), [], {},
                    ram_mib=ram_mib, postcopy_after=a.postcopy_after)


def hot_postcopy_1g(tmp: Path, impl: str, a: argparse.Namespace) -> dict[str, Any]:
    return hot_postcopy(tmp, impl, a, 1024)


HOT_CASES = {"plain": hot_plain, "auto-converge": hot_auto_converge,
             "dirty-limit": hot_dirty_limit, "postcopy": hot_postcopy,
             "postcopy 1 GiB": hot_postcopy_1g}


def _row(r: dict[str, Any] | str) -> str:
    if isinstance(r, str):
        return r
    dt = "-" if r["downtime_ms"] is None else f"{r['downtime_ms']} ms"
    return (f"{r['status']}: total {r['total_s']:.1f} s, downtime {dt}, peak throttle "
            f"{r['peak_throttle']}%, guest slowdown {r['slowdown'] * 100:.0f}% (free store rate "
            f"{r['free_mib_s']:.1f} MiB/s, link {r['link_mib_s']:.1f} MiB/s, downtime-limit "
            f"{r['limit_ms']} ms)")


def hot(tmp: Path, a: argparse.Namespace, qemu: bool) -> float:
    impls = ["pyvm", "qemu"] if qemu else ["pyvm"]
    results: dict[tuple[str, str], dict[str, Any] | str] = {}
    how = (f"link = {a.link_share:g} x the guest's own store rate, downtime-limit = 300 ms x "
           f"{a.link_mib:g} MiB/s / link" if a.like_for_like
           else f"link {a.link_mib:g} MiB/s, downtime-limit 300 ms")
    print(f"hot guest: store-loop over {HOT_MIB} MiB of {RAM_MIB} MiB (postcopy also of 1 GiB); "
          f"{how}; postcopy switched after {a.postcopy_after} syncs", flush=True)
    cases = [c.strip() for c in a.cases.split(",")] if a.cases else list(HOT_CASES)
    for case in cases:
        for impl in impls:                   # interleaved: both see the same machine load
            r = results[(case, impl)] = HOT_CASES[case](tmp, impl, a)
            print(f"  ({case} {impl}: {_row(r)})", file=sys.stderr, flush=True)
    print(f"{'case':16s} {'':5s} result")
    for case in cases:
        for impl in impls:
            print(f"{case:16s} {impl:5s} {_row(results[(case, impl)])}")
    ours, theirs = results.get(("auto-converge", "pyvm")), results.get(("auto-converge", "qemu"))
    if isinstance(ours, dict) and isinstance(theirs, dict) \
            and ours["status"] == theirs["status"] == "completed":
        return float(ours["total_s"] / theirs["total_s"])
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--link-mib", type=float, default=8, help="max-bandwidth, MiB/s")
    ap.add_argument("--size-mib", type=int, default=64, help="guest RAM")
    ap.add_argument("--fast-mib", type=int, default=32, help="range the fast guest dirties")
    ap.add_argument("--budget", type=float, default=30,
                    help="seconds the fast case gets (and the slow one may take)")
    ap.add_argument("--transport", choices=("tcp", "rdma"), default="tcp")
    ap.add_argument("--dirty-share", type=float, default=0.25,
                    help="the slow guest's dirty rate as a share of the link")
    ap.add_argument("--converging-only", action="store_true", help="skip the fast guest")
    ap.add_argument("--small-mib", type=int, default=0,
                    help="run only case 3: ab re-dirtying this many MiB")
    ap.add_argument("--hot", action="store_true",
                    help="run only case 4: the hot guest plain / auto-converge / dirty-limit")
    ap.add_argument("--no-qemu", action="store_true", help="case 4 without QEMU")
    ap.add_argument("--cases", default="", help="case 4: which of " + ", ".join(HOT_CASES))
    ap.add_argument("--postcopy-after", type=int, default=2,
                    help="case 4: migrate-start-postcopy after this many dirty syncs")
    ap.add_argument("--link-share", type=float, default=0.3,
                    help="case 4, like for like: each VM's link as a share of its guest's "
                         "own store rate")
    ap.add_argument("--fixed-link", dest="like_for_like", action="store_false",
                    help="case 4: --link-mib and 300 ms for both VMs instead")
    a = ap.parse_args()
    link = int(a.link_mib * (1 << 20))
    with tempfile.TemporaryDirectory(prefix="pyvm-conv-") as d:
        if a.hot:
            print(f"ratio={hot(Path(d), a, not a.no_qemu):.2f}")
            return
        if a.small_mib:
            small_working_set(Path(d), a.size_mib, a.small_mib, link, a.budget, a.transport)
            return
        ratio = converging(Path(d), a.size_mib, link, a.transport, a.budget, a.dirty_share)
        if not a.converging_only:
            diverging(Path(d), a.size_mib, a.fast_mib, link, a.budget, a.transport)
    print(f"ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
