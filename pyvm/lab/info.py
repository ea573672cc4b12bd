"""Summaries of a dirty-page trace: sizes, rates and the writable working set (WWS).

The WWS for a window of *w* seconds is the number of distinct pages written within the
window; Clark et al. (NSDI 2005, section 5) plot it over time for several window
lengths to show how much memory a precopy round of that length would find dirty again.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import numpy.typing as npt

from pyvm.lab.trace import Trace

DEFAULT_WINDOWS = (0.1, 0.5, 1.0, 2.0)


def wws_series(trace: Trace, window: float) -> tuple[npt.NDArray[np.float64],
                                                      npt.NDArray[np.int64]]:
    """(start times, distinct pages written) for consecutive windows of ``window``
    seconds (rounded to whole samples); empty if the trace is shorter than one window."""
    per = max(1, int(round(window / trace.interval)))
    count = trace.samples // per
    if count == 0:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    table = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1)
    rows = trace.bitmaps[:count * per].reshape(count, per, -1)
    unions = np.bitwise_or.reduce(rows, axis=1)
    pages: npt.NDArray[np.int64] = table[unions].sum(axis=1).astype(np.int64)
    starts: npt.NDArray[np.float64] = np.arange(count, dtype=np.float64) * (per * trace.interval)
    return starts, pages


def summary(trace: Trace, windows: Sequence[float] = DEFAULT_WINDOWS,
            file_bytes: int | None = None) -> str:
    """A few lines describing ``trace`` (what ``pyvm-lab info`` prints)."""
    mib = 1 << 20
    counts = trace.counts()
    ever = int(np.unpackbits(np.bitwise_or.reduce(trace.bitmaps, axis=0)).sum()) \
        if trace.samples else 0
    lines = [
        f"guest         {trace.guest}" + (f"  (-append \"{trace.append}\")" if trace.append else ""),
        f"ram           {trace.ram_bytes / mib:g} MiB, {trace.npages} pages of {trace.page_size}",
        f"samples       {trace.samples} x {trace.interval * 1e3:g} ms = {trace.duration:g} s",
        f"recorded by   pyvm {trace.pyvm_version}",
    ]
    if file_bytes is not None:
        raw = trace.bitmaps.nbytes
        lines.append(f"file          {file_bytes} bytes ({raw / max(file_bytes, 1):.1f}x smaller "
                     "than the raw bitmaps)")
    if trace.samples:
        rate = counts.mean() / trace.interval
        lines += [
            f"dirty/sample  mean {counts.mean():.1f}  max {int(counts.max())} pages",
            f"dirty rate    {rate:.0f} pages/s = {rate * trace.page_size / mib:.1f} MiB/s "
            "(distinct pages per sample)",
            f"ever written  {ever} pages = {ever * trace.page_size / mib:.1f} MiB",
        ]
        busy = trace.mean_busy()
        if busy is not None and trace.busy is not None:
            known = trace.busy[np.isfinite(trace.busy)]
            top = float(known.max()) * 100
            lines.append(f"vCPU busy     mean {busy * 100:.1f}%  max {top:.1f}% of the wall time "
                         "(a throttle leaving more costs the guest nothing)")
        lines += [
            "writable working set (distinct pages written per window):",
            "  window      mean       max    MiB(max)",
        ]
        for w in windows:
            _, pages = wws_series(trace, w)
            if pages.size:
                lines.append(f"  {w:6g} s {pages.mean():9.1f} {int(pages.max()):9d} "
                             f"{pages.max() * trace.page_size / mib:10.2f}")
    if trace.notes:
        lines.append("notes         " + ", ".join(f"{k}={v}" for k, v in sorted(trace.notes.items())
                                                  if not isinstance(v, (dict, list))))
    return "\n".join(lines)
