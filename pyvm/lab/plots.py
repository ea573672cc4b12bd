"""Figures (PNG, matplotlib's Agg backend) from simulations, sweeps and traces."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Iterable, Sequence

import numpy as np

from pyvm.lab.info import wws_series
from pyvm.lab.simulate import SimResult
from pyvm.lab.trace import Trace

MiB = float(1 << 20)


def _pyplot() -> Any:
    # deferred: matplotlib takes a second to import, and only drawing needs it
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _label(r: SimResult) -> str:
    return f"{r.policy} ({r.status})"


def _finished_span(results: Sequence[SimResult]) -> float:
    done = [r.total_time for r in results if r.status in ("completed", "postcopy")]
    return max(done) if done else max((r.total_time for r in results), default=1.0)


def remaining_per_round(results: Sequence[SimResult], path: str, title: str = "",
                        max_rounds: int = 60) -> str:
    """Unsent ("remaining dirty") MiB after each round's sync, one line per result; runs
    longer than ``max_rounds`` rounds are cut there."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    cut = False
    for r in results:
        ys = [rec.unsent_after * 4096 / MiB for rec in r.history[:max_rounds]]
        cut |= len(r.history) > max_rounds
        ax.plot(range(1, len(ys) + 1), ys, marker="o", ms=3, label=_label(r))
    ax.set_yscale("log")
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _pos: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("round" + (f" (first {max_rounds} shown)" if cut else ""))
    ax.set_ylabel("remaining dirty MiB after the sync")
    ax.set_title(title or "Remaining dirty memory per round")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def throughput(results: Sequence[SimResult], path: str, title: str = "") -> str:
    """Migration throughput (MiB/s) over wall time, each run to its end (final copy or
    postcopy push included); the downtime shaded.  The time axis stops a little after
    the slowest run that finished."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        xs: list[float] = []
        ys: list[float] = []
        for rec in r.history:
            rate = rec.bytes_sent / rec.duration / MiB if rec.duration else 0.0
            xs += [rec.start, rec.start + rec.duration]
            ys += [rate, rate]
        if r.status in ("completed", "postcopy") and r.total_time > r.precopy_time:
            rate = (r.bytes_sent - sum(h.bytes_sent for h in r.history)) / \
                (r.total_time - r.precopy_time) / MiB
            xs += [r.precopy_time, r.total_time, r.total_time]
            ys += [rate, rate, 0.0]
        line = ax.plot(xs, ys, label=_label(r), drawstyle="default")[0]
        if not math.isnan(r.downtime):
            ax.axvspan(r.precopy_time, r.precopy_time + r.downtime, color=line.get_color(),
                       alpha=0.2)
    ax.set_xlim(0, _finished_span(results) * 1.15)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("time since migration start (s)")
    ax.set_ylabel("MiB/s sent")
    ax.set_title(title or "Throughput over time (shaded: downtime)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def times_per_policy(rows: Iterable[dict[str, Any]], path: str, title: str = "") -> str:
    """Downtime and total time per policy: box plots over every row of a sweep."""
    plt = _pyplot()
    total: dict[str, list[float]] = defaultdict(list)
    down: dict[str, list[float]] = defaultdict(list)
    unfinished: dict[str, int] = defaultdict(int)
    for row in rows:
        p = str(row["policy"])
        if row["status"] in ("completed", "postcopy"):
            total[p].append(float(row["total_time"]))
            down[p].append(float(row["downtime"]) * 1e3)
        else:
            unfinished[p] += 1
    names = sorted(set(total) | set(unfinished))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    single = all(len(total[n]) <= 1 for n in names)
    from matplotlib.ticker import ScalarFormatter

    for ax, data, label in ((axes[0], total, "total time (s)"), (axes[1], down, "downtime (ms)")):
        if single:           # one run per policy: bars with their values
            values = [data[n][0] if data[n] else 0.0 for n in names]
            bars = ax.bar(range(1, len(names) + 1), values, color="tab:blue")
            ax.bar_label(bars, labels=[f"{v:.3g}" if data[n] else "" for v, n in
                                       zip(values, names)], fontsize=8)
        else:                # a sweep: the spread over traces, links and start times
            ax.boxplot([data[n] or [math.nan] for n in names], showfliers=False)
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.set_xticks(range(1, len(names) + 1))
        ax.set_xticklabels([n + (f"\n{unfinished[n]} unfinished" if unfinished[n] else "")
                            for n in names], fontsize=8)
        ax.set_ylabel(label)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title or "Total time and downtime per policy")
    return _save(fig, path)


def heatmap(trace: Trace, path: str, bins: int = 256, title: str = "") -> str:
    """Share of each band of pages dirtied in each sample, over time."""
    plt = _pyplot()
    bins = max(1, min(bins, trace.npages))
    edges = np.linspace(0, trace.npages, bins + 1).astype(np.int64)
    grid = np.zeros((bins, trace.samples))
    for i in range(trace.samples):
        csum = np.concatenate(([0], np.cumsum(trace.mask(i))))
        grid[:, i] = (csum[edges[1:]] - csum[edges[:-1]]) / np.maximum(np.diff(edges), 1)
    fig, ax = plt.subplots(figsize=(8, 4))
    ram_mib = trace.ram_bytes / MiB
    im = ax.imshow(grid, aspect="auto", origin="lower", cmap="magma", vmin=0,
                   vmax=max(float(grid.max()), 1e-6),
                   extent=(0, trace.duration, 0, ram_mib), interpolation="nearest")
    fig.colorbar(im, ax=ax, label="share of pages dirtied")
    ax.set_xlabel("guest time (s)")
    ax.set_ylabel("guest RAM (MiB)")
    ax.set_title(title or f"Dirty pages over time: {trace.guest}")
    return _save(fig, path)


def working_set(trace: Trace, path: str, windows: Sequence[float], title: str = "") -> str:
    """Pages written per window (the writable working set) over time, one line per window
    length, as Clark et al. plot it."""

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for w in windows:
        xs, ys = wws_series(trace, w)
        if len(xs):
            ax.step(xs, ys * trace.page_size / MiB, where="post", label=f"{w:g} s windows")
    ax.set_xlabel("guest time (s)")
    ax.set_ylabel("MiB written in the window")
    ax.set_title(title or f"Writable working set: {trace.guest}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def guest_progress(runs: Sequence[tuple[str, Sequence[tuple[float, int]], float]], path: str,
                   title: str = "") -> str:
    """The guest's own progress during each migration: writes per second between two
    readings of its counter (``runs``: label, (time, writes so far) pairs, total time)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points, total in runs:
        if len(points) < 2:
            continue
        t = np.array([p[0] for p in points])
        w = np.array([p[1] for p in points], dtype=np.float64)
        rate = np.diff(w) / np.maximum(np.diff(t), 1e-6)
        ax.step(t[1:], rate / 1e3, where="pre", label=label)
        if total and not math.isnan(total):
            ax.axvline(total, color=ax.lines[-1].get_color(), ls=":", alpha=0.6)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("time since migration start (s); dotted: the migration's end")
    ax.set_ylabel("guest writes (thousands/s)")
    ax.set_title(title or "Guest progress during migration")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
