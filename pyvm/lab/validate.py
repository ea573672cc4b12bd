"""``pyvm-lab validate``: a real migration against the simulation of the same guest.

1. **record** the guest (in this process, :func:`pyvm.lab.record.record`) for
   ``duration`` seconds after ``warmup``, noting which pages were zero when the
   recording started and, for ``dirty.elf``, its write counters at both ends;
2. **calibrate** (``link="measure"``, the default), like a link before an experiment
   (:func:`calibrate`): migrations of the same guest, each source logging its rounds
   and its switchover (``-d migration``), one without ``max-bandwidth`` and six with
   (:mod:`pyvm.lab.calibration_policy`).  From them: the channel's rate (the largest
   round's bytes over that round's sending time), the final copy's rate and the
   switchover's fixed cost (a line through downtime over downtime bytes), and the
   fixed costs of the set-up and of a round (the precopy time no round spent sending);
3. **migrate** the same guest with the same parameters between two pyvm processes under
   the policy (:func:`pyvm.lab.realvm.migrate`) ``runs`` times, with ``max-bandwidth``
   as the link, the downtime read to the microsecond from the source's log, and
   ``dirty.elf``'s counters read just before it starts and once the source has stopped;
4. **simulate** the trace under the same policy, ``max-bandwidth`` and
   ``downtime-limit`` (:func:`pyvm.lab.simulate.simulate`) with the calibrated costs,
   ``replays`` times per real run (:func:`replay_starts`), starting from the pages
   that were zero when that real migration started (read with ``pmemsave``),
   optionally (``speed``) with the trace's time scaled by the guest's
   speed: its writes per second during the real migration over those during the
   recording (the recorded guest and the migrated one need not get the same CPU: the
   migration thread competes with the vCPU for the interpreter, other processes for the
   cores), and each sample's
   pages spread over its interval (``spread``: rounds much shorter than the interval
   happen, when a round fits in what is left of the rate limit's window);
5. compare the medians of total time, bytes, downtime, rounds and downtime bytes:
   error = median predicted / median measured - 1.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from pyvm.lab.calibration_policy import HOLD_SPEC as HOLD
from pyvm.lab.calibration_policy import SPEC as CALIBRATE
from pyvm.lab.errors import LabError
from pyvm.lab.link import LinkModel
from pyvm.lab.realvm import RealResult, dirty_range, migrate
from pyvm.lab.record import record, record_linux
from pyvm.lab.simulate import SimResult, simulate_safely
from pyvm.lab.trace import Trace
from pyvm.lab.workloads import parse_size
from pyvm.migration.policy import PAGE_SIZE, Limits, load_policy

#: pyvm's device state for a one-vCPU PC, with the vmdesc trailer and globalstate
#: (measured: a paused 32 MiB guest's stream minus its ram sections is ~7.4 KB).
PYVM_DEVICE_BYTES = 7600
#: ``link="measure"``: the channel's own rate comes from a calibration migration.
DEFAULT_LINK = "measure"
METRICS = ("total_time", "bytes_sent", "downtime", "rounds", "downtime_bytes")


@dataclass
class Validation:
    """One policy's validation.  ``measured``/``predicted``: the first real run and its
    first replay (for figures); ``measured_runs``/``predicted_runs``: all of them (empty:
    just those two).  Errors compare the medians of the two sides."""

    measured: RealResult
    predicted: SimResult
    trace: Trace
    link: str = ""
    calibration: "Calibration | None" = None
    #: the guest's speed during the real migration over its speed while recorded
    guest_speed: float = 1.0
    #: dirty.elf's writes per second while recorded and while migrated
    write_rates: tuple[float, float] = (math.nan, math.nan)
    measured_runs: list[RealResult] = field(default_factory=list)
    predicted_runs: list[SimResult] = field(default_factory=list)

    def values(self, side: str, metric: str) -> list[float]:
        """``metric`` of every run of ``side`` ("measured" or "predicted"), NaNs left out."""
        runs: Sequence[Any] = (self.measured_runs or [self.measured]) if side == "measured" \
            else (self.predicted_runs or [self.predicted])
        xs = [float(getattr(r, metric)) for r in runs]
        return [x for x in xs if not math.isnan(x)]

    def median(self, side: str, metric: str) -> float:
        xs = self.values(side, metric)
        return float(np.median(xs)) if xs else math.nan

    def errors(self) -> dict[str, float]:
        """Relative error of each metric's median (predicted / measured - 1; NaN when
        unknown)."""
        out = {}
        for m in METRICS:
            real, sim = self.median("measured", m), self.median("predicted", m)
            out[m] = sim / real - 1 if real and not math.isnan(real) and not math.isnan(sim) \
                else math.nan
        return out

    def rows(self) -> list[dict[str, Any]]:
        errs = self.errors()
        out = []
        for m in METRICS:
            row: dict[str, Any] = {"metric": m, "error": errs[m]}
            for side in ("measured", "predicted"):
                xs = self.values(side, m)
                row[side] = self.median(side, m)
                row[side + "_range"] = (min(xs), max(xs)) if xs else (math.nan, math.nan)
                row[side + "_runs"] = len(xs)
            out.append(row)
        return out


def zero_pages(machine: Any) -> np.ndarray:
    """One bool per page of the machine's RAM: True where the page reads all zero."""
    from pyvm.fastpath import find_zero_pages_at

    masks = []
    for block in machine.ram:
        out = np.zeros(block.npages, dtype=np.uint8)
        find_zero_pages_at(block.mem, np.arange(block.npages, dtype=np.int64), out)
        masks.append(out.view(np.bool_))
    return np.concatenate(masks)


@dataclass
class Calibration:
    """What a calibration migration (the same guest, policy ``qemu``, no
    ``max-bandwidth``) measured of this machine's pyvm: the channel's rate, and the fixed
    costs the model adds to the bytes' transfer time."""

    #: bytes/s the channel moves pages at: the largest round's bytes over its time
    line_rate: float
    #: seconds of a switchover besides its bytes: stopping the vCPUs, the last sync,
    #: saving the devices (the calibration's downtime minus its bytes at line_rate)
    switchover_cost: float = 0.0
    #: seconds each round costs besides sending: the sync and the policy's answer
    round_cost: float = 0.0
    #: seconds of set-up before the first round (``query-migrate``'s ``setup-time``)
    setup_cost: float = 0.0
    #: bytes/s of the final copy (0: line_rate): the slope of the calibrations' downtime
    #: over their downtime bytes
    final_rate: float = 0.0

    def text(self) -> str:
        return (f"channel {self.line_rate / 1e6:.0f} MB/s, set-up {self.setup_cost * 1e3:.0f} "
                f"ms, switchover {self.switchover_cost * 1e3:.1f} ms"
                + (f" + bytes at {self.final_rate / 1e6:.0f} MB/s" if self.final_rate else "")
                + f", round {self.round_cost * 1e3:.2f} ms")


def fit_switchover(points: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    """(fixed seconds, bytes/s) of ``downtime = fixed + bytes / rate`` through
    (downtime bytes, downtime seconds) points: the median of the pairwise slopes
    (Theil and Sen's estimator: one run's scheduler hiccup does not tilt it) and the
    median of what each point leaves for the fixed part.  None when the points do not
    give a positive slope (too close in bytes, or too noisy)."""
    slopes = [(d2 - d1) / (b2 - b1) for i, (b1, d1) in enumerate(points)
              for b2, d2 in points[i + 1:] if abs(b2 - b1) >= 256 * 1024]
    if not slopes:
        return None
    slope = float(np.median(slopes))
    if not slope > 0:
        return None
    fixed = float(np.median([d - b * slope for b, d in points]))
    return max(0.0, fixed), 1.0 / slope


_ROUND_LOG = re.compile(r"migration: round (\d+): sent (\d+) bytes \((\d+) pages\) in (\d+) ms")


def _logged_rounds(log: str) -> list[tuple[int, int]]:
    """(bytes, milliseconds sending) of each round a source's ``-d migration`` log shows
    (``pyvm/migration/control/precopy.py`` writes a line per round)."""
    return [(int(b), int(ms)) for _, b, _, ms in _ROUND_LOG.findall(log)]


def _check(cal: RealResult, rounds: list[tuple[int, int]]) -> None:
    if cal.status != "completed" or not rounds or not cal.downtime > 0:
        raise LabError(f"validate: the calibration migration {cal.status}"
                       + (f": {cal.error}" if cal.error else ": no rounds logged"))


def line_rate_from(cal: RealResult, log: str) -> float:
    """The channel's rate from a migration without ``max-bandwidth``: its largest round's
    bytes over the time spent sending them."""
    rounds = _logged_rounds(log)
    _check(cal, rounds)
    big, ms = max(rounds)
    return big / max(ms, 1) * 1e3


def costs_from(cal: RealResult, log: str, line_rate: float) -> tuple[float, float, float]:
    """(switchover, round, set-up) fixed costs from a migration under the measured run's
    ``max-bandwidth``: its downtime minus its downtime bytes at ``line_rate``, the
    precopy time no round spent sending, per round, and its ``setup-time``."""
    rounds = _logged_rounds(log)
    _check(cal, rounds)
    switchover = max(0.0, cal.downtime - cal.downtime_bytes / line_rate)
    sending = sum(r[1] for r in rounds) / 1e3
    per_round = max(0.0, (cal.total_time - cal.downtime - cal.setup_time - sending) / len(rounds))
    return switchover, per_round, cal.setup_time


def calibrate(kernel: str, append: str, ram: str, workdir: str, warmup: float,
              max_bandwidth: int, downtime_limit_ms: int, workload: str = "",
              runs: int = 7) -> Calibration:
    """Migrate the guest ``runs`` times, its source logging every round, under QEMU's
    rounds stopped after the third (:mod:`pyvm.lab.calibration_policy`: a calibration
    must end, and QEMU's rule does not on a guest that outruns the link):
    first without ``max-bandwidth`` for the channel's rate, then with the measured run's
    ``max-bandwidth`` and ``downtime-limit`` for the fixed costs (medians: one run's
    figures vary with what else the machine runs), every other run letting the guest
    write for a second after round 0 before its final copy (``CalibrateHold``): the line
    through their downtimes over their downtime bytes (:func:`fit_switchover`) gives the
    final copy's rate and the switchover's fixed cost.  When it gives no rate, the
    final copy goes at the channel's rate and the fixed cost is the median of the
    downtimes less their bytes at that rate.  The fixed costs need the rate limit:
    without it the source outruns the destination, the socket's buffers fill, and the
    switchover waits for the destination to drain them."""
    def run(i: int, bw: int, spec: str = CALIBRATE) -> tuple[RealResult, str]:
        where = os.path.join(workdir, str(i))
        cal = migrate(kernel, append, ram, spec, workdir=where, warmup=warmup,
                      progress=False, workload=workload, src_args=["-d", "migration"],
                      max_bandwidth=bw, downtime_limit_ms=downtime_limit_ms)
        try:
            with open(os.path.join(where, "src.stderr"), errors="replace") as f:
                return cal, f.read()
        except OSError:
            return cal, ""
    line = line_rate_from(*run(0, 0))
    limited = [run(i, max_bandwidth, HOLD if i % 2 == 0 else CALIBRATE)
               for i in range(1, max(2, runs))]
    # the held runs' rounds are syncs with nothing to send: their round cost is no guide
    costs = [costs_from(r, log, line) for i, (r, log) in enumerate(limited, 1) if i % 2]
    fit = fit_switchover([(float(r.downtime_bytes), r.downtime) for r, _ in limited])
    if fit is not None:
        switchover, final = fit
    else:
        switchover, final = float(np.median([c[0] for c in costs])), 0.0
    return Calibration(line, switchover, float(np.median([c[1] for c in costs])),
                       float(np.median([c[2] for c in costs])), final)


class _Counters:
    """``dirty.elf``'s write counters read in this process (the first word of each page
    of its range, as :func:`pyvm.lab.realvm.guest_writes` reads them over QMP)."""

    def __init__(self, append: str) -> None:
        self.start, self.size = dirty_range(append)
        self.readings: list[tuple[float, int]] = []

    def read(self, machine: Any) -> None:
        for block in machine.ram:
            if block.gpa <= self.start and self.start + self.size <= block.gpa + block.size:
                off = self.start - block.gpa
                words = np.frombuffer(block.mem, dtype="<u4", count=self.size // 4,
                                      offset=off)[::PAGE_SIZE // 4]
                self.readings.append((time.monotonic(), int(words.sum(dtype=np.uint64))))
                return

    def rate(self) -> float:
        if len(self.readings) < 2 or self.readings[-1][0] <= self.readings[0][0]:
            return math.nan
        (t0, w0), (t1, w1) = self.readings[0], self.readings[-1]
        return (w1 - w0) / (t1 - t0)


def progress_rate(res: RealResult) -> float:
    """Guest writes per second between the first and the last progress reading."""
    if len(res.progress) < 2 or res.progress[-1][0] <= res.progress[0][0]:
        return math.nan
    (t0, w0), (t1, w1) = res.progress[0], res.progress[-1]
    return (w1 - w0) / (t1 - t0)


def replay_starts(trace: Trace, replays: int) -> list[float]:
    """Guest times the simulation of a validation starts at: ``replays`` points spread
    evenly over the trace (a real migration starts at no particular point of the
    guest's behaviour, and the trace's first sample is as arbitrary as any)."""
    n = max(1, replays)
    return [trace.duration * j / n for j in range(n)]


def validate(kernel: str, append: str, ram: str, policy: str, max_bandwidth: int, *,
             downtime_limit_ms: int = 300, interval: float = 0.05, duration: float = 10.0,
             warmup: float = 0.5, link: str = DEFAULT_LINK, workdir: str | None = None,
             device_bytes: int = PYVM_DEVICE_BYTES, workload: str = "",
             speed: bool = False, calibration_runs: int = 7,
             calibration: Calibration | None = None, timeout: float = 120.0,
             runs: int = 3, replays: int = 5) -> Validation:
    """Record, migrate and simulate the guest; see the module docstring.  ``workload``:
    the Linux guest running that workload (:mod:`pyvm.lab.linux_workloads`) instead of
    ``kernel`` and ``append``.  The guest's speed during the migration over its speed while
    recorded is measured for ``dirty.elf`` (its write counters) and reported; ``speed``
    also scales the trace's time by it (off by default: the reading before the
    migration stalls the guest, which loses the writes of the stall, so the ratio reads
    low by up to 20% on a guest whose rate its timer fixes).  ``calibration``: reuse one
    (:func:`calibrate` of the same guest and limits) instead of measuring it again.
    ``timeout``: the real migration is cancelled after that many seconds, and the
    simulation gives up at the same time.  ``runs``: real migrations; ``replays``:
    simulations per real run, from its zero pages, starting at
    :func:`replay_starts` with the pages' phases in their samples drawn anew; the
    errors compare the medians."""
    zero: list[np.ndarray] = []
    counters = _Counters(append) if not workload and \
        os.path.basename(kernel) == "dirty.elf" else None

    def at_start(m: Any) -> None:
        zero.append(zero_pages(m))
        if counters is not None:
            counters.read(m)
    if workload:
        trace = record_linux([workload], parse_size(ram), interval, duration, warmup=warmup,
                             on_start=at_start)[0]
    else:
        trace = record(kernel, append, parse_size(ram), interval, duration, warmup=warmup,
                       on_start=at_start, on_end=counters.read if counters else None)
    with tempfile.TemporaryDirectory(prefix="pyvm-lab-") as tmp:
        if calibration is not None:
            calib = calibration
        elif link == "measure":
            calib = calibrate(kernel, append, ram, os.path.join(workdir or tmp, "cal"), warmup,
                              max_bandwidth, downtime_limit_ms, workload, calibration_runs)
        else:
            calib = Calibration(LinkModel.parse(link).effective)
        measured_runs = [
            migrate(kernel, append, ram, policy, workdir=os.path.join(workdir or tmp, f"run{i}"),
                    max_bandwidth=max_bandwidth, downtime_limit_ms=downtime_limit_ms,
                    warmup=warmup, zero_scan=True, workload=workload, timeout=timeout,
                    progress=counters is not None, progress_every=math.inf,
                    src_args=["-d", "migration"])
            for i in range(max(1, runs))]
    recorded = counters.rate() if counters is not None else math.nan
    migrated = [progress_rate(m) for m in measured_runs] if counters is not None else []
    rates = (recorded, float(np.nanmedian(migrated)) if migrated and
             not all(math.isnan(x) for x in migrated) else math.nan)
    limits = Limits(downtime_limit=downtime_limit_ms / 1e3, max_bandwidth=float(max_bandwidth))
    predicted_runs: list[SimResult] = []
    speeds = []
    for i, measured in enumerate(measured_runs):
        guest_speed = 1.0
        ratio = migrated[i] / recorded if migrated else math.nan
        if speed and ratio > 0 and math.isfinite(ratio):
            guest_speed = ratio
        speeds.append(guest_speed)
        for j, start in enumerate(replay_starts(trace, replays)):
            predicted_runs.append(simulate_safely(
                trace, load_policy(policy), LinkModel(calib.line_rate), limits,
                device_bytes=device_bytes, trace_name=workload or os.path.basename(kernel),
                zero=measured.zero if measured.zero is not None else zero[0] if zero else None,
                round_cost=calib.round_cost, switchover_cost=calib.switchover_cost,
                guest_speed=guest_speed, spread=True, setup_cost=calib.setup_cost,
                max_time=timeout, start=start, seed=j, keep_history=not predicted_runs,
                final_rate=calib.final_rate,
                zero_age=measured.zero_age if measured.zero is not None else 0.0))
    return Validation(measured_runs[0], predicted_runs[0], trace, calib.text(), calib,
                      float(np.median(speeds)), rates, measured_runs, predicted_runs)


def _statuses(runs: Sequence[Any]) -> str:
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.status] = counts.get(r.status, 0) + 1
    return ", ".join(f"{s} x{n}" if n > 1 else s for s, n in counts.items())


def report(v: Validation) -> str:
    """The comparison as a text table: each side's median and (with several runs) its
    range."""
    measured = v.measured_runs or [v.measured]
    predicted = v.predicted_runs or [v.predicted]
    errors = sorted({r.error for r in measured if r.error} |
                    {r.error for r in predicted if r.error})
    lines = [f"policy {v.measured.policy or 'qemu'}: measured {_statuses(measured)}, "
             f"predicted {_statuses(predicted)}; {v.link}"
             + (f"; guest writes/s {v.write_rates[1]:.0f} migrated, "
                f"{v.write_rates[0]:.0f} recorded" if not math.isnan(v.write_rates[0]) else "")
             + (f"; trace time x{v.guest_speed:.2f}" if v.guest_speed != 1.0 else "")
             + (f"; vCPU busy {busy * 100:.1f}%" if (busy := v.trace.mean_busy()) is not None
                else "")
             + (f" ({'; '.join(errors)})" if errors else ""),
             f"{'metric':18} {'measured':>26} {'predicted':>26} {'error':>8}"]
    units = {"total_time": ("s", 1.0), "bytes_sent": ("MiB", 1 / 2**20),
             "downtime": ("ms", 1e3), "rounds": ("", 1.0),
             "downtime_bytes": ("MiB", 1 / 2**20)}
    for row in v.rows():
        unit, scale = units[row["metric"]]
        err = row["error"]
        cells = []
        for side in ("measured", "predicted"):
            lo, hi = row[side + "_range"]
            cell = f"{row[side] * scale:.3f}"
            if row[side + "_runs"] > 1:
                cell += f" ({lo * scale:.3f}..{hi * scale:.3f})"
            cells.append(cell)
        lines.append(f"{row['metric'] + (' ' + unit if unit else ''):18} "
                     f"{cells[0]:>26} {cells[1]:>26} "
                     f"{'-' if math.isnan(err) else f'{err * 100:+.1f}%':>8}")
    if len(measured) > 1 or len(predicted) > 1:
        lines.append(f"(medians of {len(measured)} real migrations and {len(predicted)} "
                     "simulations; ranges in brackets)")
    return "\n".join(lines)
