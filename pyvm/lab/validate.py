"""``pyvm-lab validate``: a real migration against the simulation of the same guest.

1. **record** the guest (in this process, :func:`pyvm.lab.record.record`) for
   ``duration`` seconds after ``warmup``, noting which pages were zero when the
   recording started;
2. **migrate** the same guest with the same parameters between two pyvm processes under
   the policy (:func:`pyvm.lab.realvm.migrate`), with ``max-bandwidth`` as the link;
3. **simulate** the trace under the same policy, ``max-bandwidth`` and
   ``downtime-limit`` (:func:`pyvm.lab.simulate.simulate`), starting from the pages that
   were zero when the real migration started (read with ``pmemsave``); the final copy
   goes at ``link``, the rate of the real channel, since the rate limit does not apply
   in the downtime.  By default that rate is measured first, like a link before an
   experiment: one calibration migration of the same guest without ``max-bandwidth``,
   the bytes of its final copy over its downtime;
4. compare total time, bytes, downtime and rounds: error = predicted / measured - 1.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from pyvm.lab.errors import LabError
from pyvm.lab.link import LinkModel
from pyvm.lab.realvm import RealResult, migrate
from pyvm.lab.record import record, record_linux
from pyvm.lab.simulate import SimResult, simulate_safely
from pyvm.lab.trace import Trace
from pyvm.lab.workloads import parse_size
from pyvm.migration.policy import Limits, load_policy

#: pyvm's device state for a one-vCPU PC, with the vmdesc trailer and globalstate
#: (measured: a paused 32 MiB guest's stream minus its ram sections is ~7.4 KB).
PYVM_DEVICE_BYTES = 7600
#: ``link="measure"``: the channel's own rate comes from a calibration migration.
DEFAULT_LINK = "measure"
METRICS = ("total_time", "bytes_sent", "downtime", "rounds")


@dataclass
class Validation:
    measured: RealResult
    predicted: SimResult
    trace: Trace
    link: str = ""

    def errors(self) -> dict[str, float]:
        """Relative error of each metric (predicted / measured - 1; NaN when unknown)."""
        out = {}
        for m in METRICS:
            real, sim = float(getattr(self.measured, m)), float(getattr(self.predicted, m))
            out[m] = sim / real - 1 if real and not math.isnan(real) and not math.isnan(sim) \
                else math.nan
        return out

    def rows(self) -> list[dict[str, Any]]:
        errs = self.errors()
        return [{"metric": m, "measured": getattr(self.measured, m),
                 "predicted": getattr(self.predicted, m), "error": errs[m]} for m in METRICS]


def zero_pages(machine: Any) -> np.ndarray:
    """One bool per page of the machine's RAM: True where the page reads all zero."""
    from pyvm.fastpath import find_zero_pages_at

    masks = []
    for block in machine.ram:
        out = np.zeros(block.npages, dtype=np.uint8)
        find_zero_pages_at(block.mem, np.arange(block.npages, dtype=np.int64), out)
        masks.append(out.view(np.bool_))
    return np.concatenate(masks)


def validate(kernel: str, append: str, ram: str, policy: str, max_bandwidth: int, *,
             downtime_limit_ms: int = 300, interval: float = 0.05, duration: float = 10.0,
             warmup: float = 0.5, link: str = DEFAULT_LINK, workdir: str | None = None,
             device_bytes: int = PYVM_DEVICE_BYTES, workload: str = "") -> Validation:
    """Record, migrate and simulate the guest; see the module docstring.  ``workload``:
    the Linux guest running that workload (:mod:`pyvm.lab.linux_workloads`) instead of
    ``kernel`` and ``append``."""
    zero: list[np.ndarray] = []
    if workload:
        trace = record_linux([workload], parse_size(ram), interval, duration, warmup=warmup,
                             on_start=lambda m: zero.append(zero_pages(m)))[0]
    else:
        trace = record(kernel, append, parse_size(ram), interval, duration, warmup=warmup,
                       on_start=lambda m: zero.append(zero_pages(m)))
    with tempfile.TemporaryDirectory(prefix="pyvm-lab-") as tmp:
        if link == "measure":
            cal = migrate(kernel, append, ram, "qemu", workdir=os.path.join(workdir or tmp, "cal"),
                          warmup=warmup, progress=False, workload=workload)
            if cal.status != "completed" or not cal.downtime > 0:
                raise LabError(f"validate: the calibration migration {cal.status}: {cal.error}")
            link = f"{cal.downtime_bytes / cal.downtime:.0f}B"
        measured = migrate(kernel, append, ram, policy, workdir=workdir or tmp,
                           max_bandwidth=max_bandwidth, downtime_limit_ms=downtime_limit_ms,
                           warmup=warmup, zero_scan=True, workload=workload)
    limits = Limits(downtime_limit=downtime_limit_ms / 1e3, max_bandwidth=float(max_bandwidth))
    predicted = simulate_safely(trace, load_policy(policy), LinkModel.parse(link), limits,
                                device_bytes=device_bytes, trace_name=workload or os.path.basename(kernel),
                                zero=measured.zero if measured.zero is not None else
                                zero[0] if zero else None)
    return Validation(measured, predicted, trace, link)


def report(v: Validation) -> str:
    """The comparison as a text table."""
    lines = [f"policy {v.measured.policy or 'qemu'}: measured {v.measured.status}, "
             f"predicted {v.predicted.status}; channel rate {v.link}"
             + (f" ({v.measured.error or v.predicted.error})"
                if v.measured.error or v.predicted.error else ""),
             f"{'metric':12} {'measured':>14} {'predicted':>14} {'error':>8}"]
    units = {"total_time": ("s", 1.0), "bytes_sent": ("MiB", 1 / 2**20),
             "downtime": ("ms", 1e3), "rounds": ("", 1.0)}
    for row in v.rows():
        unit, scale = units[row["metric"]]
        err = row["error"]
        lines.append(f"{row['metric'] + (' ' + unit if unit else ''):12} "
                     f"{row['measured'] * scale:14.3f} {row['predicted'] * scale:14.3f} "
                     f"{'-' if math.isnan(err) else f'{err * 100:+.1f}%':>8}")
    return "\n".join(lines)
