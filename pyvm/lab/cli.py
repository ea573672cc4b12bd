"""``pyvm-lab``: record dirty-page traces, simulate migration policies, sweep and plot.

    pyvm-lab record   -kernel GUEST -append ARGS -m 64M --interval 50ms --duration 5s -o T
    pyvm-lab record   --workload dd-tmpfs:mb=8 -m 256M --duration 5s -o T   (Linux guest)
    pyvm-lab info     TRACE [--plot DIR]
    pyvm-lab simulate (--trace FILE | --workload SPEC) --policy P [--policy P...] --link L
    pyvm-lab sweep    --policy P... (--trace F | --workload S)... --link L... --out results.csv
    pyvm-lab validate -kernel dirty.elf -append ARGS --policy P --max-bandwidth 20MB
    pyvm-lab compare  scenarios.toml --out DIR [--wan rate=100Mbit,delay=10ms,loss=0.001]

User errors print one line and exit 1; no traceback.

Each subcommand imports what it needs when it runs (deferred on purpose: the sweep
brings Dask, the plots matplotlib, and ``pyvm-lab --help`` should not wait for either).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Sequence

from pyvm.errors import PyvmError
from pyvm.migration.policy import BUILTIN_POLICIES, Limits, PolicyError

DEFAULT_POLICIES = list(BUILTIN_POLICIES)



def _at_least_one(text: str) -> int:
    """An argparse type: a whole number >= 1 (argparse's own error text otherwise)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: '{text}'") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n

def _limits(args: argparse.Namespace) -> Limits:
    from pyvm.lab.link import parse_rate

    return Limits(downtime_limit=args.downtime_limit / 1000.0,
                  max_bandwidth=parse_rate(args.max_bandwidth) if args.max_bandwidth else 0.0,
                  switchover_bandwidth=parse_rate(args.switchover_bandwidth)
                  if args.switchover_bandwidth else 0.0)


def _add_limits(p: argparse.ArgumentParser) -> None:
    p.add_argument("--downtime-limit", type=float, default=300.0, metavar="MS",
                   help="QEMU's downtime-limit in ms (default 300)")
    p.add_argument("--max-bandwidth", default="", metavar="RATE",
                   help="QEMU's max-bandwidth, e.g. 1GiB (default: the link's rate)")
    p.add_argument("--switchover-bandwidth", default="", metavar="RATE",
                   help="QEMU's avail-switchover-bandwidth (default: the measured rate)")
    p.add_argument("--device-bytes", type=int, default=None, metavar="N",
                   help="device state sent in the downtime (default 65536)")


def _cmd_record(args: argparse.Namespace) -> int:
    from pyvm.guests import guest_path
    from pyvm.lab.link import parse_time
    from pyvm.lab.record import record
    from pyvm.lab.trace import save
    from pyvm.lab.workloads import parse_size

    kernel = args.kernel if os.sep in args.kernel else guest_path(args.kernel)
    interval, duration = parse_time(args.interval), parse_time(args.duration)

    def progress(i: int, pages: int) -> None:
        if not args.quiet:
            print(f"\rsample {i + 1}: {pages} pages", end="", file=sys.stderr, flush=True)

    if args.workload:
        from pyvm.lab.linux_workloads import LINUX_RAM
        from pyvm.lab.record import record_linux

        def booting(spec: str) -> None:
            if not args.quiet:
                print(f"booting Linux, then starting '{spec}' at its shell", file=sys.stderr,
                      flush=True)
        trace = record_linux([args.workload], parse_size(args.m or LINUX_RAM), interval,
                             duration, warmup=parse_time(args.warmup), on_sample=progress,
                             on_workload=booting)[0]
    else:
        trace = record(kernel, args.append, parse_size(args.m or "64M"), interval, duration,
                       smp=args.smp, warmup=parse_time(args.warmup), on_sample=progress)
    if not args.quiet:
        print(file=sys.stderr)
    size = save(trace, args.output)
    print(f"recorded {trace.samples} samples of {trace.npages} pages every "
          f"{interval * 1e3:g} ms into {args.output} ({size} bytes)")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from pyvm.lab import plots
    from pyvm.lab.info import DEFAULT_WINDOWS, summary
    from pyvm.lab.trace import load

    trace = load(args.trace)
    print(summary(trace, DEFAULT_WINDOWS, os.path.getsize(args.trace)))
    if args.plot:
        os.makedirs(args.plot, exist_ok=True)
        for path in (plots.heatmap(trace, os.path.join(args.plot, "heatmap.png")),
                     plots.working_set(trace, os.path.join(args.plot, "working-set.png"),
                                       DEFAULT_WINDOWS)):
            print(f"wrote {path}")
    return 0


def _trace_arg(args: argparse.Namespace) -> tuple[Any, str]:
    from pyvm.lab.trace import load
    from pyvm.lab.workloads import synthesize

    if args.trace:
        return load(args.trace), args.trace
    return synthesize(args.workload), args.workload


def _fmt(x: float, scale: float = 1.0, digits: int = 3) -> str:
    return "-" if math.isnan(x) else f"{x * scale:.{digits}f}"


def _cmd_simulate(args: argparse.Namespace) -> int:
    from pyvm.lab import plots
    from pyvm.lab.link import LinkModel
    from pyvm.lab.simulate import DEVICE_BYTES, simulate_safely
    from pyvm.migration.policy import load_policy

    trace, name = _trace_arg(args)
    link = LinkModel.parse(args.link)
    limits = _limits(args)
    results = []
    for spec in args.policy or ["qemu"]:
        results.append(simulate_safely(trace, load_policy(spec), link, limits,
                                       device_bytes=args.device_bytes or DEVICE_BYTES,
                                       start=args.start, trace_name=name))
    if args.json:
        print(json.dumps([r.row() for r in results], indent=1))
    else:
        print(f"trace {name}: {trace.ram_bytes >> 20} MiB; link {link.label} "
              f"(effective {link.effective * 8 / 1e6:.1f} Mbit/s); "
              f"downtime-limit {limits.downtime_limit * 1e3:g} ms")
        print(f"{'policy':18} {'status':10} {'rounds':>6} {'MiB sent':>10} {'total s':>9} "
              f"{'downtime ms':>12} {'throttle':>8}")
        for r in results:
            print(f"{r.policy:18} {r.status:10} {r.rounds:6d} {r.bytes_sent / 2**20:10.1f} "
                  f"{_fmt(r.total_time):>9} {_fmt(r.downtime, 1e3, 1):>12} {r.throttle_pct:7d}%")
            if r.error:
                print(f"  {r.error}")
    if args.plot:
        os.makedirs(args.plot, exist_ok=True)
        ok = [r for r in results if r.history]
        for path in (plots.remaining_per_round(ok, os.path.join(args.plot, "remaining.png")),
                     plots.throughput(ok, os.path.join(args.plot, "throughput.png")),
                     plots.times_per_policy([r.row() for r in results],
                                            os.path.join(args.plot, "times.png")),
                     plots.heatmap(trace, os.path.join(args.plot, "heatmap.png"))):
            print(f"wrote {path}")
    return 1 if any(r.status == "failed" for r in results) else 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from pyvm.lab import plots
    from pyvm.lab.simulate import DEVICE_BYTES
    from pyvm.lab.sweep import grid, run_sweep, write_table

    traces = (args.trace or []) + (args.workload or [])
    if not traces:
        raise PyvmError("sweep: give at least one --trace or --workload")
    cells = grid(args.policy or DEFAULT_POLICIES, traces, args.link or ["1Gbit"], args.starts)
    t0 = time.monotonic()
    rows = run_sweep(cells, _limits(args), scheduler=args.scheduler, workers=args.workers,
                     device_bytes=args.device_bytes or DEVICE_BYTES)
    elapsed = time.monotonic() - t0
    write_table(rows, args.out)
    failed = sum(1 for r in rows if r["status"] == "failed")
    print(f"{len(rows)} simulated migrations in {elapsed:.1f} s "
          f"({len(rows) / elapsed:.0f}/s) -> {args.out}" + (f"; {failed} failed" if failed else ""))
    if args.plot:
        os.makedirs(args.plot, exist_ok=True)
        print(f"wrote {plots.times_per_policy(rows, os.path.join(args.plot, 'times.png'))}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from pyvm.guests import guest_path
    from pyvm.lab.link import parse_rate, parse_time
    from pyvm.lab.validate import report, validate

    kernel = args.kernel if os.sep in args.kernel else guest_path(args.kernel)
    from pyvm.lab.linux_workloads import LINUX_RAM

    results = []
    ram = args.m or (LINUX_RAM if args.workload else "64M")
    calibration = None
    for spec in args.policy or ["qemu"]:
        v = validate(kernel, args.append, ram, spec, int(parse_rate(args.max_bandwidth)),
                     downtime_limit_ms=int(args.downtime_limit),
                     interval=parse_time(args.interval), duration=parse_time(args.duration),
                     warmup=parse_time(args.warmup), link=args.link, workload=args.workload,
                     calibration=calibration, speed=args.scale_speed, runs=args.runs,
                     replays=args.replays)
        calibration = v.calibration          # measured once, for every policy
        print(report(v), flush=True)
        results.append(v)
    if args.json:
        print(json.dumps([{"policy": v.measured.policy, "rows": v.rows()} for v in results],
                         indent=1))
    return 1 if any(v.measured.status != "completed" for v in results) else 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from pyvm.lab.compare import load_plan, run_scenario, summary_table, write_summary

    plan = load_plan(args.file, args.wan)
    rows: list[dict[str, Any]] = []
    for sc in plan.scenarios:
        print(f"scenario {sc.name}: {len(plan.policies)} migration(s)"
              + (f" over WAN {sc.wan}" if sc.wan else ""), flush=True)
        rows += run_scenario(sc, plan.policies, os.path.join(args.out, sc.name))
        for name in ("remaining", "throughput", "times", "progress", "heatmap"):
            path = os.path.join(args.out, sc.name, name + ".png")
            if os.path.exists(path):
                print(f"wrote {path}")
    summary = os.path.join(args.out, "summary.csv")
    write_summary(rows, summary)
    from rich.console import Console   # deferred: only this command prints a rich table

    Console(width=120).print(summary_table(rows))
    print(f"wrote {summary}")
    return 1 if any(r["status"] != "completed" for r in rows) else 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="pyvm-lab", description="pyvm's migration lab: record dirty-page traces of real "
        "guests, replay them under migration policies and link models, sweep and plot.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("record", help="run a guest and record its dirty pages")
    p.add_argument("-kernel", "--kernel", default="hello.elf",
                   help="guest image: a path or a packaged name (default hello.elf)")
    p.add_argument("-append", "--append", default="", help="the guest's command line")
    p.add_argument("-m", default="", help="RAM size (default 64M; 256M with --workload)")
    p.add_argument("-smp", "--smp", type=int, default=1)
    p.add_argument("--workload", metavar="NAME[:key=N]", default="",
                   help="record the Linux guest (pyvm-linux-guest) running a busybox "
                   "workload at its shell instead of -kernel: memloop[:mb=8], "
                   "dd-tmpfs[:mb=8], churn[:files=64] or idle; recording starts once it runs")
    p.add_argument("--interval", default="50ms", help="sample period (default 50ms)")
    p.add_argument("--duration", default="5s", help="recording length (default 5s)")
    p.add_argument("--warmup", default="0.5s", help="run this long before recording")
    p.add_argument("-o", "--output", required=True, help="trace file to write")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(fn=_cmd_record)

    p = sub.add_parser("info", help="summarise a trace (writable working set)")
    p.add_argument("trace")
    p.add_argument("--plot", metavar="DIR", help="write heatmap.png and working-set.png")
    p.set_defaults(fn=_cmd_info)

    p = sub.add_parser("simulate", help="replay a trace under policies and a link")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", help="a trace file from 'record'")
    src.add_argument("--workload", help="a synthetic workload, e.g. zipf:rate=50000,ram=64M")
    p.add_argument("--policy", action="append",
                   help=f"a policy: {', '.join(BUILTIN_POLICIES)}, module:Class or "
                   "file.py:Class (repeat to compare; default qemu)")
    p.add_argument("--link", default="1Gbit", help="RATE[,rtt=T][,loss=F][,jitter=T]")
    p.add_argument("--start", type=float, default=0.0, help="guest time to start at (s)")
    _add_limits(p)
    p.add_argument("--plot", metavar="DIR", help="write remaining.png, throughput.png, "
                   "times.png and heatmap.png")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(fn=_cmd_simulate)

    p = sub.add_parser("sweep", help="policies x traces x links on Dask")
    p.add_argument("--policy", action="append", help="repeatable (default: every built-in)")
    p.add_argument("--trace", action="append", help="trace file (repeatable)")
    p.add_argument("--workload", action="append", help="synthetic workload (repeatable)")
    p.add_argument("--link", action="append", help="link model (repeatable; default 1Gbit)")
    p.add_argument("--starts", type=int, default=1,
                   help="start times spread over each trace (default 1)")
    p.add_argument("--scheduler", metavar="tcp://HOST:PORT",
                   help="an existing Dask scheduler (default: a LocalCluster)")
    p.add_argument("--workers", type=int, default=2, help="LocalCluster processes (default 2)")
    p.add_argument("--out", default="sweep.csv", help="results table, .csv or .parquet")
    _add_limits(p)
    p.add_argument("--plot", metavar="DIR", help="write times.png")
    p.set_defaults(fn=_cmd_sweep)

    p = sub.add_parser("validate", help="migrate a real guest and compare with the "
                       "simulation of its trace")
    p.add_argument("-kernel", "--kernel", default="dirty.elf",
                   help="guest image: a path or a packaged name (default dirty.elf)")
    p.add_argument("-append", "--append", default="start=2 size=16 pattern=1 rate=200",
                   help="the guest's command line")
    p.add_argument("-m", default="", help="RAM size (default 64M; 256M with --workload)")
    p.add_argument("--workload", metavar="NAME[:key=N]", default="",
                   help="the Linux guest running this busybox workload instead of -kernel "
                   "(as for record)")
    p.add_argument("--policy", action="append", help="repeatable (default qemu)")
    p.add_argument("--max-bandwidth", default="20MB",
                   help="QEMU's max-bandwidth: the precopy link rate (default 20MB)")
    p.add_argument("--downtime-limit", type=float, default=300.0, metavar="MS")
    p.add_argument("--link", default="measure",
                   help="the channel's own rate (default: measured, with the fixed costs "
                   "of a round and of the switchover, by calibration migrations of the "
                   "same guest under qemu, once for all policies)")
    p.add_argument("--interval", default="50ms", help="trace sample period (default 50ms)")
    p.add_argument("--duration", default="10s", help="trace length (default 10s)")
    p.add_argument("--warmup", default="0.5s", help="guest run time before both start")
    p.add_argument("--runs", type=_at_least_one, default=3,
                   help="real migrations per policy (default 3); medians are compared")
    p.add_argument("--replays", type=_at_least_one, default=5,
                   help="simulations per real migration, from evenly spread points of the "
                        "trace (default 5)")
    p.add_argument("--scale-speed", action="store_true",
                   help="dirty.elf: scale the trace's time by the guest's writes per second "
                   "while migrated over while recorded (always measured and printed)")
    p.add_argument("--json", action="store_true", help="also print the rows as JSON")
    p.set_defaults(fn=_cmd_validate)

    p = sub.add_parser("compare", help="scenarios x policies on real VMs, with figures")
    p.add_argument("file", help="a TOML file of scenarios and policies (see docs/lab.md)")
    p.add_argument("--out", default="compare-out", help="output folder (default compare-out)")
    p.add_argument("--wan", default="", metavar="rate=R,delay=T,loss=F",
                   help="migrate over two network namespaces shaped like this (needs root)")
    p.set_defaults(fn=_cmd_compare)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except (PyvmError, PolicyError) as err:
        print(f"pyvm-lab: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
