"""Replay a dirty-page trace under a migration policy and a link model.

The model, kept simple enough to compute by hand (``docs/lab.md`` derives an example):

* Time runs on two clocks: wall time ``t`` (the migration's) and guest time ``g`` (the
  trace's).  Guest time advances at ``1 - throttle/100`` of wall time.  Sample *i* of the
  trace is dirtied at guest time ``(i + 1) * interval`` (when the recorder took it), and
  the trace repeats from its start when the migration outlasts it.
* Every page costs :data:`~pyvm.migration.policy.PAGE_WIRE_BYTES` (QEMU's page header
  plus the page).  A trace holds no page contents, so zero pages are only told apart
  when the caller passes ``zero`` (the pages that were zero when the migration started,
  as ``pyvm-lab validate`` measures them): such a page costs :data:`ZERO_WIRE_BYTES` (a
  ``ZERO`` record) until the guest first writes it.  Precopy rounds go out at
  ``min(link.effective, max-bandwidth)``; the final copy at ``link.effective``, since
  the rate limit does not apply in the downtime (``migration/migration.c``,
  migration_completion lifts it).
* A round sending ``n`` pages lasts ``n * PAGE_WIRE_BYTES / rate`` (at least
  ``min_round`` seconds); then the dirty bitmap is synced: every page the guest dirtied
  meanwhile becomes unsent again.
* Stop-and-copy sends the unsent pages and ``device_bytes`` of device state; downtime is
  that transfer plus half a round trip (the last byte reaching the destination), and the
  migration's total time ends with it.
* Postcopy sends the device state (downtime: that plus half a round trip), then pushes
  the unsent pages from the running destination's side; total time includes them.

The policy objects are the ones the engine runs (:mod:`pyvm.migration.policy`).  Per round
the work is a few numpy operations over the page bitmaps, so one core runs thousands of
simulated migrations a minute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from pyvm.lab.link import LinkModel
from pyvm.lab.trace import Trace
from pyvm.migration.policy import (PAGE_WIRE_BYTES, Limits, LinkEstimate, MigrationSetup,
                                   Policy, PolicyError, RamRegion, RoundRecord, RoundState,
                                   call_decide, call_start, policy_name)

#: A ``ZERO`` record on the wire: the be64 address|flags word and the fill byte
#: (``migration/ram.c``, save_zero_page).
ZERO_WIRE_BYTES = 9
#: Device state sent in the downtime when nothing else is said (bytes): pyvm's PC machine
#: sends a few KiB of device sections plus the vmdesc JSON.
DEVICE_BYTES = 64 * 1024
MAX_TIME = 600.0
MIN_ROUND = 0.001
MAX_ROUNDS = 5000
_EPS = 1e-9


@dataclass
class SimResult:
    """What a simulated migration did.  ``status``: ``completed`` (stop-and-copy),
    ``postcopy`` (switched and finished), ``timeout`` (still iterating at ``max_time`` or
    after ``max_rounds``)
    or ``failed`` (the policy failed; ``error`` says why).  ``throttle_pct``: the highest
    vCPU throttle applied."""

    policy: str
    trace: str
    link: str
    status: str
    rounds: int = 0
    pages_sent: int = 0
    bytes_sent: int = 0
    total_time: float = math.nan
    downtime: float = math.nan
    precopy_time: float = 0.0
    postcopy_bytes: int = 0
    final_pages: int = 0
    throttle_pct: int = 0
    error: str = ""
    history: list[RoundRecord] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        """A flat dict for tables (no history)."""
        return {k: getattr(self, k) for k in (
            "policy", "trace", "link", "status", "rounds", "pages_sent", "bytes_sent",
            "total_time", "downtime", "precopy_time", "postcopy_bytes", "final_pages",
            "throttle_pct", "error")}


class TraceCursor:
    """Unions of trace samples between two guest times, on the packed bitmaps."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        self.rows = trace.bitmaps
        self.all = np.bitwise_or.reduce(self.rows, axis=0) if trace.samples else \
            np.zeros(self.rows.shape[1], np.uint8)

    def dirtied(self, g0: float, g1: float) -> npt.NDArray[np.uint8]:
        """Packed union of the samples dirtied at guest times in ``(g0, g1]``."""
        n = self.trace.samples
        lo = math.floor(g0 / self.trace.interval + _EPS)
        hi = math.floor(g1 / self.trace.interval + _EPS)
        if n == 0 or hi <= lo:
            return np.zeros_like(self.all)
        if hi - lo >= n:
            return self.all
        a, b = lo % n, hi % n
        union: npt.NDArray[np.uint8]
        if a < b:
            union = np.bitwise_or.reduce(self.rows[a:b], axis=0)
        else:
            union = np.bitwise_or.reduce(self.rows[a:], axis=0)
            if b:
                union = union | np.bitwise_or.reduce(self.rows[:b], axis=0)
        return union


def _readonly(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
    v = a.view()
    v.flags.writeable = False
    return v


def simulate(trace: Trace, policy: Policy, link: LinkModel, limits: Limits = Limits(), *,
             device_bytes: int = DEVICE_BYTES, max_time: float = MAX_TIME,
             min_round: float = MIN_ROUND, max_rounds: int = MAX_ROUNDS, start: float = 0.0, trace_name: str = "",
             keep_history: bool = True, zero: npt.NDArray[np.bool_] | None = None) -> SimResult:
    """Simulate one migration of the guest in ``trace`` starting at guest time ``start``.

    Raises :class:`~pyvm.migration.policy.PolicyError` when the policy fails.
    """
    npages = trace.npages
    rate = final_rate = link.effective
    if limits.max_bandwidth:
        rate = min(rate, limits.max_bandwidth)
    zeros = None if zero is None else np.array(zero, dtype=np.bool_, copy=True)
    if zeros is not None and zeros.shape != (npages,):
        raise ValueError(f"zero mask of {zeros.shape} for {npages} pages")

    def wire(pages: npt.NDArray[np.bool_] | None, count: int) -> int:
        """Bytes of ``count`` pages (``pages``: their mask; ``None``: every unsent page)."""
        if zeros is None:
            return count * PAGE_WIRE_BYTES
        nz = int(np.count_nonzero(zeros & (unsent if pages is None else pages)))
        return (count - nz) * PAGE_WIRE_BYTES + nz * ZERO_WIRE_BYTES
    wire_total = 0
    cursor = TraceCursor(trace)
    name = policy_name(policy)
    res = SimResult(name, trace_name or trace.guest, link.label, "timeout")
    setup = MigrationSetup(npages, (RamRegion("pc.ram", 0, 0, npages),),
                           LinkEstimate(rate, link.rtt), limits, trace.page_size)
    call_start(policy, setup)
    unsent = np.ones(npages, dtype=np.bool_)
    dirty = np.ones(npages, dtype=np.bool_)
    history: list[RoundRecord] = []
    t, g, bandwidth, throttle, top_throttle = 0.0, start, rate, 0, 0
    k = 0
    while t < max_time and k < max_rounds:
        state = RoundState(k, t, bandwidth, _readonly(dirty), _readonly(unsent), tuple(history),
                           throttle, trace.page_size)
        decision = call_decide(policy, state)
        if decision.stop_and_copy or decision.postcopy:
            left = int(np.count_nonzero(unsent))
            left_bytes = wire(None, left)
            res.precopy_time = t
            res.downtime = device_bytes / final_rate + link.rtt / 2
            if decision.stop_and_copy:
                res.status = "completed"
                res.final_pages = left
                res.downtime += left_bytes / final_rate
                res.pages_sent += left
                res.total_time = t + res.downtime
            else:
                res.status = "postcopy"
                res.postcopy_bytes = left_bytes
                res.total_time = t + res.downtime + res.postcopy_bytes / rate
                res.pages_sent += left
            res.bytes_sent = wire_total + left_bytes + device_bytes
            break
        throttle = decision.throttle_pct
        top_throttle = max(top_throttle, throttle)
        send = decision.send
        n = int(np.count_nonzero(unsent)) if send is None else int(send.size)
        if send is None:
            nbytes = wire(None, n)
            unsent[:] = False
        else:
            if zeros is not None:
                chosen = np.zeros(npages, dtype=np.bool_)
                chosen[send] = True
                nbytes = wire(chosen, n)
            else:
                nbytes = wire(None, n)
            unsent[send] = False
        wire_total += nbytes
        duration = max(nbytes / rate, min_round)
        if nbytes:
            bandwidth = nbytes / duration
        g_next = g + duration * (1 - throttle / 100)
        dirty = np.unpackbits(cursor.dirtied(g, g_next), count=npages).view(np.bool_)
        unsent |= dirty
        if zeros is not None:
            zeros &= ~dirty
        record = RoundRecord(k, t, duration, n, nbytes, int(np.count_nonzero(dirty)),
                             int(np.count_nonzero(unsent)), throttle)
        history.append(record)
        res.pages_sent += n
        t += duration
        g = g_next
        k += 1
    else:
        res.precopy_time = t
        res.total_time = t
        res.bytes_sent = wire_total
    res.rounds = k
    res.throttle_pct = top_throttle
    if keep_history:
        res.history = history
    return res


def simulate_safely(trace: Trace, policy: Policy, link: LinkModel, limits: Limits = Limits(),
                    **kw: Any) -> SimResult:
    """:func:`simulate`, with a policy failure recorded as ``status='failed'``."""
    try:
        return simulate(trace, policy, link, limits, **kw)
    except PolicyError as err:
        return SimResult(policy_name(policy), kw.get("trace_name") or trace.guest, link.label,
                         "failed", error=str(err))
