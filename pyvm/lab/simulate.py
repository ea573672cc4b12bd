"""Replay a dirty-page trace under a migration policy and a link model.

The model, kept simple enough to compute by hand (``docs/lab.md`` derives an example):

* Time runs on two clocks: wall time ``t`` (the migration's) and guest time ``g`` (the
  trace's).  Guest time advances at :func:`throttled_speed` of wall time: ``1 -
  throttle/100`` for a guest that would use all its CPU; a guest whose vCPUs were busy
  only a fraction ``busy`` of the time (the trace's mean busy fraction, or ``busy``)
  loses nothing while ``1 - throttle/100 >= busy`` and runs at ``(1 - throttle/100) /
  busy`` below that.  Sample *i* of the
  trace is dirtied at guest time ``(i + 1) * interval`` (when the recorder took it), and
  the trace repeats from its start when the migration outlasts it.
* Every page costs :data:`~pyvm.migration.policy.PAGE_WIRE_BYTES` (QEMU's page header
  plus the page).  A trace holds no page contents, so zero pages are only told apart
  when the caller passes ``zero`` (the pages that were zero when the migration started,
  as ``pyvm-lab validate`` measures them): such a page costs :data:`ZERO_WIRE_BYTES` (a
  ``ZERO`` record) until the guest first writes it; of the zero pages a round sends
  and the guest writes while the round lasts, half go out whole (written before their
  turn).  The final copy goes at ``link.effective``, since the rate limit does not
  apply in the downtime (``migration/migration.c``, migration_completion lifts it).
* ``max-bandwidth`` is enforced as QEMU does, in windows of 100 ms
  (``BUFFER_DELAY``, ``migration/migration.h``; pyvm's ``RATE_WINDOW``): pages go out in
  batches of 256 at the link's rate; once a window's bytes reach its budget
  (``max-bandwidth`` x 0.1 s) the sender sleeps until those bytes' share of time is over,
  and a window older than 100 ms starts afresh (:class:`RateWindow`).  So a round
  smaller than what is left of the budget goes out at the link's rate (a burst), and a
  long round averages ``max-bandwidth``.
* A round sending ``n`` pages lasts as long as that takes (at least ``min_round``
  seconds), plus ``round_cost`` (the dirty-bitmap sync and the policy's own time, which
  ``pyvm-lab validate`` calibrates); then the dirty bitmap is synced: every page the guest
  dirtied meanwhile becomes unsent again.  The bandwidth a policy is told is the round's
  bytes over its sending time, as the engine measures it.
* Stop-and-copy sends the unsent pages and ``device_bytes`` of device state at the link's
  rate (or ``final_rate``); downtime is ``switchover_cost`` (stopping the vCPUs, the last
  sync, saving the devices: calibrated, 0 by default) plus that transfer plus half a
  round trip (the last byte reaching the destination), and the migration's total time
  ends with it.
* ``zero_age``: seconds between the reading of ``zero`` and the migration's start; the
  pages the guest writes then (and during the set-up) are no longer zero.
* ``setup_cost``: seconds before the first round (the engine's set-up: the stream's
  header, the RAM block list, loading the policy, the first sync); 0 by default.
* ``spread``: a sample's pages are written across its interval, each page at its own
  fixed point (:class:`TraceCursor`), instead of all at its end.
* ``guest_speed``: the guest runs at this fraction of the speed it was recorded at (guest
  time advances at ``guest_speed * throttled_speed(throttle, busy)`` of wall time).
* Postcopy sends the device state (downtime: that plus half a round trip), then pushes
  the unsent pages from the running destination's side; total time includes them.

The policy objects are the ones the engine runs (:mod:`pyvm.migration.policy`).  Per round
the work is a few numpy operations over the page bitmaps, so one core runs thousands of
simulated migrations a minute.
"""

from __future__ import annotations

import copy
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
#: QEMU's rate-limit window (``BUFFER_DELAY``, ``migration/migration.h``), seconds.
RATE_WINDOW = 0.1
#: The bytes of one batch of pages the engine sends between two rate-limit checks
#: (``BATCH_PAGES`` = 256 page records, ``pyvm/migration/control/channel.py``).
BATCH_BYTES = 256 * PAGE_WIRE_BYTES
_EPS = 1e-9


class RateWindow:
    """QEMU's ``max-bandwidth`` limiter as pyvm's engine runs it
    (``pyvm/migration/control/precopy.py``, ``_rate_limit``; QEMU's
    ``migration_rate_limit``): pages go out in batches of :data:`BATCH_BYTES` at the
    link's rate; after each batch, a window older than :data:`RATE_WINDOW` starts afresh,
    and once a window's bytes reach its budget the sender sleeps until the window's time
    for those bytes (``start + RATE_WINDOW * bytes / budget``) and a new window starts.
    ``send(t, nbytes)`` is when the last of ``nbytes`` handed over at ``t`` is out."""

    def __init__(self, line: float, limit: float) -> None:
        self.line, self.limit = line, limit
        self.budget = limit * RATE_WINDOW
        self.start, self.used = -math.inf, 0.0

    def send(self, t: float, nbytes: float) -> float:
        if not self.limit:
            return t + nbytes / self.line
        left = nbytes
        while left > 0:
            b = min(BATCH_BYTES, left)
            left -= b
            t += b / self.line
            if t - self.start >= RATE_WINDOW:
                self.start, self.used = t, 0.0
            self.used += b
            if self.used >= self.budget:
                t = max(t, self.start + RATE_WINDOW * self.used / self.budget)
                self.start, self.used = t, 0.0
        return t


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
    #: bytes sent while the guest is stopped (the final pages, or none with postcopy,
    #: and the device state), as ``query-migrate``'s ``downtime-bytes``
    downtime_bytes: int = 0
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
    """Unions of trace samples between two guest times, on the packed bitmaps.

    Sample *i* covers guest times ``(i * interval, (i + 1) * interval]``.  By default all
    its pages count as written at the end; with ``spread`` each page is written at its
    own fixed point of the interval (``(i + phase[p]) * interval``, ``phase`` uniform in
    (0, 1], drawn from ``seed``), as a guest writing all the time does, so that a round
    shorter than the interval sees its share of the sample's pages rather than all or
    none.
    """

    def __init__(self, trace: Trace, spread: bool = False, seed: int = 0) -> None:
        self.trace = trace
        self.rows = trace.bitmaps
        self.all = np.bitwise_or.reduce(self.rows, axis=0) if trace.samples else \
            np.zeros(self.rows.shape[1], np.uint8)
        self.phase = 1.0 - np.random.default_rng(seed).random(trace.npages) if spread else None

    def _part(self, i: int, lo: float, hi: float) -> npt.NDArray[np.uint8]:
        """Packed pages of sample ``i`` (mod n) with phase in ``(lo, hi]``."""
        assert self.phase is not None
        row = np.unpackbits(self.rows[i % self.trace.samples], count=self.trace.npages)
        keep = row.view(np.bool_) & (self.phase > lo) & (self.phase <= hi)
        return np.packbits(keep)

    def dirtied(self, g0: float, g1: float) -> npt.NDArray[np.uint8]:
        """Packed union of the pages dirtied at guest times in ``(g0, g1]``."""
        if self.phase is None:
            return self._whole(g0, g1)
        n, iv = self.trace.samples, self.trace.interval
        if n == 0 or g1 <= g0:
            return np.zeros_like(self.all)
        a, b = g0 / iv, g1 / iv
        ia, ib = math.floor(a), math.floor(b)
        if ib - ia > n:
            return self.all
        if ia == ib:
            return self._part(ia, a - ia, b - ib)
        # sample ia from a on, the whole samples between, sample ib up to b
        union = self._part(ia, a - ia, 1.0) | self._part(ib, 0.0, b - ib)
        if ib - ia > 1:
            union |= self._whole((ia + 1) * iv, ib * iv)
        return union

    def _whole(self, g0: float, g1: float) -> npt.NDArray[np.uint8]:
        """Packed union of the samples that end at guest times in ``(g0, g1]``."""
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


def throttled_speed(throttle_pct: int, busy: float | None = None) -> float:
    """The share of its unthrottled pace a guest keeps under a vCPU throttle of
    ``throttle_pct`` percent.

    A throttled vCPU sleeps ``pct / (1 - pct)`` of each time slice it ran
    (``system/cpu-throttle.c``; :mod:`pyvm.cpu_throttle`), so it may run ``1 - pct`` of
    the wall time.  A guest that needs only ``busy`` of it (it halts the rest, waiting
    for its timer, and catches up missed ticks) keeps its pace while ``1 - pct >= busy``
    and slows to ``(1 - pct) / busy`` below that.  ``busy`` None (a trace without busy
    fractions): the guest is taken to need all its CPU, ``1 - pct``."""
    allowed = 1.0 - throttle_pct / 100
    if busy is None or math.isnan(busy):
        return allowed
    if busy <= 0:
        return 1.0
    return min(1.0, allowed / min(busy, 1.0))


def _readonly(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
    v = a.view()
    v.flags.writeable = False
    return v


def simulate(trace: Trace, policy: Policy, link: LinkModel, limits: Limits = Limits(), *,
             device_bytes: int = DEVICE_BYTES, max_time: float = MAX_TIME,
             min_round: float = MIN_ROUND, max_rounds: int = MAX_ROUNDS, start: float = 0.0,
             trace_name: str = "", keep_history: bool = True,
             zero: npt.NDArray[np.bool_] | None = None, round_cost: float = 0.0,
             switchover_cost: float = 0.0, guest_speed: float = 1.0,
             spread: bool = False, setup_cost: float = 0.0,
             zero_age: float = 0.0, busy: float | None = None, seed: int = 0,
             final_rate: float = 0.0) -> SimResult:
    """Simulate one migration of the guest in ``trace`` starting at guest time ``start``.
    ``busy``: the vCPUs' busy fraction the throttle model uses (:func:`throttled_speed`);
    None: the trace's mean busy fraction, if it has any.  ``seed``: the pages' phases
    within their samples with ``spread`` (:class:`TraceCursor`).  ``final_rate``: bytes/s
    of the stop-and-copy's transfer (0: the link's effective rate; ``pyvm-lab validate``
    calibrates it: the source writes the last pages into a drained socket faster than
    the channel moves a long round).

    Raises :class:`~pyvm.migration.policy.PolicyError` when the policy fails.
    """
    npages = trace.npages
    if busy is None:
        busy = trace.mean_busy()
    rate = link.effective
    final_rate = final_rate or link.effective
    if limits.max_bandwidth:
        rate = min(rate, limits.max_bandwidth)
    window = RateWindow(link.effective, limits.max_bandwidth)
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
    cursor = TraceCursor(trace, spread, seed)
    name = policy_name(policy)
    res = SimResult(name, trace_name or trace.guest, link.label, "timeout")
    setup = MigrationSetup(npages, (RamRegion("pc.ram", 0, 0, npages),),
                           LinkEstimate(rate, link.rtt), limits, trace.page_size)
    call_start(policy, setup)
    if zeros is not None and zero_age + setup_cost > 0:
        # the guest writes between the zero reading and the first round (the set-up
        # included): those pages go out whole
        back = (zero_age + setup_cost) * guest_speed
        zeros &= ~np.unpackbits(cursor.dirtied(start - back, start), count=npages).view(np.bool_)
    unsent = np.ones(npages, dtype=np.bool_)
    dirty = np.ones(npages, dtype=np.bool_)
    history: list[RoundRecord] = []
    t, g, bandwidth, throttle, top_throttle = setup_cost, start, rate, 0, 0
    k = 0
    while t < max_time and k < max_rounds:
        state = RoundState(k, t, bandwidth, _readonly(dirty), _readonly(unsent), tuple(history),
                           throttle, trace.page_size)
        decision = call_decide(policy, state)
        if decision.stop_and_copy or decision.postcopy:
            left = int(np.count_nonzero(unsent))
            left_bytes = wire(None, left)
            res.precopy_time = t
            res.downtime = switchover_cost + device_bytes / final_rate + link.rtt / 2
            if decision.stop_and_copy:
                res.status = "completed"
                res.final_pages = left
                res.downtime_bytes = left_bytes + device_bytes
                res.downtime += left_bytes / final_rate
                res.pages_sent += left
                res.total_time = t + res.downtime
            else:
                res.status = "postcopy"
                res.postcopy_bytes = left_bytes
                res.downtime_bytes = device_bytes
                res.total_time = t + res.downtime + res.postcopy_bytes / rate
                res.pages_sent += left
            res.bytes_sent = wire_total + left_bytes + device_bytes
            break
        throttle = decision.throttle_pct
        pace = guest_speed * throttled_speed(throttle, busy)
        top_throttle = max(top_throttle, throttle)
        send = decision.send
        n = int(np.count_nonzero(unsent)) if send is None else int(send.size)
        sent_mask = None
        if send is None:
            nbytes = wire(None, n)
            if zeros is not None:
                sent_mask = unsent.copy()
            unsent[:] = False
        else:
            if zeros is not None:
                sent_mask = np.zeros(npages, dtype=np.bool_)
                sent_mask[send] = True
                nbytes = wire(sent_mask, n)
            else:
                nbytes = wire(None, n)
            unsent[send] = False
        if sent_mask is not None and zeros is not None:
            # A zero page the guest writes during the round, before its turn, goes out
            # whole: on average half of those written while the round lasts.
            est = max(copy.copy(window).send(t, nbytes) - t, min_round) + round_cost
            during = np.unpackbits(cursor.dirtied(g, g + est * pace),
                                   count=npages).view(np.bool_)
            late = int(np.count_nonzero(zeros & sent_mask & during))
            nbytes += late // 2 * (PAGE_WIRE_BYTES - ZERO_WIRE_BYTES)
        wire_total += nbytes
        sending = window.send(t, nbytes) - t
        duration = max(sending, min_round) + round_cost
        if nbytes:
            bandwidth = nbytes / max(sending, min_round)
        g_next = g + duration * pace
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
