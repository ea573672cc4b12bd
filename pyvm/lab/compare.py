"""``pyvm-lab compare``: scenarios x policies on real VMs, from a small TOML file.

::

    policies = ["qemu", "xen-skip", "auto-converge"]   # optional, default: qemu

    [defaults]                 # optional; every scenario key may go here
    kernel = "dirty.elf"       # a packaged guest name or a path
    ram = "64M"
    max_bandwidth = "20MB"     # QEMU's max-bandwidth (0: none)
    downtime_limit = 300       # ms
    warmup = "0.5s"
    trace = "3s"               # record this long for the heatmap ("0s": no heatmap)
    timeout = "60s"

    [[scenario]]
    name = "hot-cold"
    append = "start=2 size=16 pattern=1 rate=200"
    # wan = "rate=100Mbit,delay=10ms,loss=0.001"   (pyvm.lab.wan; needs root)

    [[scenario]]
    name = "linux-dd"
    workload = "dd-tmpfs:mb=8"   # the Linux guest at its shell (pyvm.lab.linux_workloads);
                                 # kernel and append are then the Linux guest's, ram 256M

Every scenario is migrated once per policy between two fresh pyvm processes
(:func:`pyvm.lab.realvm.migrate`).  Written per scenario under the output folder:
``remaining.png`` (remaining dirty MiB per round), ``throughput.png``, ``times.png``
(total time and downtime per policy), ``progress.png`` (the guest's own writes per
second, read from ``dirty.elf``'s counters; none for a Linux workload) and ``heatmap.png`` (a recorded trace of the
same guest); plus ``summary.csv`` over everything.
"""

from __future__ import annotations

import csv
import math
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable

from pyvm.lab.errors import LabError
from pyvm.lab.link import parse_rate, parse_time
from pyvm.lab.realvm import RealResult, migrate

DEFAULTS: dict[str, Any] = {
    "kernel": "dirty.elf", "ram": "", "workload": "", "max_bandwidth": "20MB", "downtime_limit": 300,
    "warmup": "0.5s", "trace": "3s", "timeout": "60s", "append": "", "wan": "",
}


@dataclass
class Scenario:
    name: str
    kernel: str
    append: str
    ram: str
    max_bandwidth: int
    downtime_limit: int
    warmup: float
    trace: float
    timeout: float
    wan: str = ""
    workload: str = ""


@dataclass
class Plan:
    scenarios: list[Scenario]
    policies: list[str] = field(default_factory=lambda: ["qemu"])


def _scenario(raw: dict[str, Any], defaults: dict[str, Any], where: str) -> Scenario:
    unknown = set(raw) - set(DEFAULTS) - {"name"}
    if unknown:
        raise LabError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; known: "
                       f"name, {', '.join(DEFAULTS)}")
    v = {**DEFAULTS, **defaults, **raw}
    if not isinstance(v.get("name"), str) or not v["name"]:
        raise LabError(f"{where}: every scenario needs a name")
    try:
        from pyvm.guests import guest_path

        from pyvm.lab.linux_workloads import LINUX_RAM, parse_workload

        workload = str(v["workload"])
        if workload:
            parse_workload(workload)
            kernel = "linux"
        else:
            kernel = str(v["kernel"])
            kernel = kernel if os.sep in kernel else guest_path(kernel)
        bw = v["max_bandwidth"]
        return Scenario(
            v["name"], kernel, str(v["append"]),
            str(v["ram"] or (LINUX_RAM if workload else "64M")), int(bw) if isinstance(bw, int) else int(parse_rate(str(bw))),
            int(v["downtime_limit"]), parse_time(str(v["warmup"])),
            parse_time(str(v["trace"])) if v["trace"] not in ("0", "0s", 0) else 0.0,
            parse_time(str(v["timeout"])), str(v["wan"]), workload)
    except (TypeError, ValueError) as err:
        raise LabError(f"{where}: {err}") from None


def load_plan(path: str, wan: str = "") -> Plan:
    """Parse the TOML file ``path``; ``wan`` (the command line's) applies to every scenario
    that names none."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as err:
        raise LabError(f"compare: cannot read '{path}': {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise LabError(f"compare: '{path}' is not valid TOML: {err}") from None
    except UnicodeDecodeError as err:
        raise LabError(f"compare: '{path}' is not valid TOML: not UTF-8 text "
                       f"(byte 0x{err.object[err.start]:02x} at offset {err.start})") from None
    defaults = raw.get("defaults", {})
    if not isinstance(defaults, dict):
        raise LabError(f"compare: '{path}': [defaults] must be a table")
    if wan and not defaults.get("wan"):
        defaults = {**defaults, "wan": wan}
    scenarios = raw.get("scenario", [])
    if not isinstance(scenarios, list) or not scenarios:
        raise LabError(f"compare: '{path}' has no [[scenario]]")
    policies = raw.get("policies", ["qemu"])
    if not isinstance(policies, list) or not all(isinstance(p, str) for p in policies):
        raise LabError(f"compare: '{path}': policies must be a list of strings")
    from pyvm.migration.policy import parse_policy

    for p in policies:
        parse_policy(p)
    return Plan([_scenario(s, defaults, f"{path}: scenario {i + 1}")
                 for i, s in enumerate(scenarios)], policies)


def row(scenario: Scenario, r: RealResult) -> dict[str, Any]:
    writes = [w for _, w in r.progress]
    t = [tp for tp, _ in r.progress]
    rate = (writes[-1] - writes[0]) / (t[-1] - t[0]) if len(t) > 1 and t[-1] > t[0] else math.nan
    return {"scenario": scenario.name, "policy": r.policy, "status": r.status,
            "rounds": r.rounds, "total_time": r.total_time, "downtime": r.downtime,
            "bytes_sent": r.bytes_sent, "guest_writes_per_s": rate, "wan": scenario.wan,
            "error": r.error}


def run_scenario(sc: Scenario, policies: list[str], outdir: str,
                 on_result: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Every policy on ``sc``; figures into ``outdir``; returns the summary rows."""
    from pyvm.lab import plots

    os.makedirs(outdir, exist_ok=True)
    results: list[RealResult] = []
    rows = []
    for policy in policies:
        work = os.path.join(outdir, "work", policy.replace(os.sep, "_").replace(":", "_"))
        if sc.wan:
            from pyvm.lab.wan import wan_path

            with wan_path(sc.wan) as path:
                r = migrate(sc.kernel, sc.append, sc.ram, policy, workdir=work,
                            max_bandwidth=sc.max_bandwidth, downtime_limit_ms=sc.downtime_limit,
                            warmup=sc.warmup, timeout=sc.timeout, src_prefix=path.src_prefix,
                            dst_prefix=path.dst_prefix, uri=path.uri, incoming=path.incoming,
                            workload=sc.workload)
        else:
            r = migrate(sc.kernel, sc.append, sc.ram, policy, workdir=work,
                        max_bandwidth=sc.max_bandwidth, downtime_limit_ms=sc.downtime_limit,
                        warmup=sc.warmup, timeout=sc.timeout, workload=sc.workload)
        results.append(r)
        rows.append(row(sc, r))
        if on_result is not None:
            on_result(rows[-1])
    sims = [r.as_sim(sc.name) for r in results]
    title = f"{sc.name}" + (f" (WAN {sc.wan})" if sc.wan else "")
    plots.remaining_per_round(sims, os.path.join(outdir, "remaining.png"),
                              title=f"Remaining dirty memory per round: {title}")
    plots.throughput(sims, os.path.join(outdir, "throughput.png"),
                     title=f"Throughput (shaded: downtime): {title}")
    plots.times_per_policy([s.row() for s in sims], os.path.join(outdir, "times.png"),
                           title=f"Total time and downtime: {title}")
    if any(r.progress for r in results):      # dirty.elf's counters; none for Linux
        plots.guest_progress([(r.policy, r.progress, r.total_time) for r in results],
                             os.path.join(outdir, "progress.png"),
                             title=f"Guest progress during migration: {title}")
    if sc.trace > 0:
        from pyvm.lab.record import record, record_linux
        from pyvm.lab.workloads import parse_size

        if sc.workload:
            trace = record_linux([sc.workload], parse_size(sc.ram), 0.05, sc.trace,
                                 warmup=sc.warmup)[0]
        else:
            trace = record(sc.kernel, sc.append, parse_size(sc.ram), 0.05, sc.trace,
                           warmup=sc.warmup)
        plots.heatmap(trace, os.path.join(outdir, "heatmap.png"),
                      title=f"Dirty pages over time: {sc.name}")
    return rows


def write_summary(rows: list[dict[str, Any]], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["scenario"])
        w.writeheader()
        w.writerows(rows)


def summary_table(rows: list[dict[str, Any]]) -> Any:
    """A rich table of the rows."""
    from rich.table import Table    # deferred: only the compare command prints one

    table = Table(title="pyvm-lab compare")
    for col, just in (("scenario", "left"), ("policy", "left"), ("status", "left"),
                      ("rounds", "right"), ("total s", "right"), ("downtime ms", "right"),
                      ("MiB sent", "right"), ("guest kwrites/s", "right")):
        table.add_column(col, justify=just)   # type: ignore[arg-type]

    def f(x: float, scale: float = 1.0, d: int = 2) -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * scale:.{d}f}"
    for r in rows:
        table.add_row(r["scenario"], r["policy"], r["status"], str(r["rounds"]),
                      f(r["total_time"]), f(r["downtime"], 1e3, 0),
                      f(r["bytes_sent"], 1 / 2**20, 1), f(r["guest_writes_per_s"], 1e-3, 1))
    return table
