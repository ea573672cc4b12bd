"""The simulator against hand-computed cases (the model is in pyvm/lab/simulate.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pyvm.lab.link import LinkModel
from pyvm.lab.simulate import TraceCursor, simulate, simulate_safely, throttled_speed
from pyvm.lab.trace import Trace
from pyvm.migration.policy import (PAGE_WIRE_BYTES as W, Decision, Limits, Policy, QemuPrecopy,
                                   RoundState)

PAGES_PER_S = 100.0
LINK = LinkModel(PAGES_PER_S * W)          # 100 pages a second


def trace_of(sets: list[list[int]], npages: int = 100, interval: float = 0.1) -> Trace:
    masks = np.zeros((len(sets), npages), bool)
    for i, pages in enumerate(sets):
        masks[i, pages] = True
    return Trace.from_masks(masks, interval, guest="hand")


class Script(Policy):
    """Answers from a list, round by round."""

    name = "script"

    def __init__(self, *answers: Decision) -> None:
        self.answers = list(answers)
        self.seen: list[RoundState] = []

    def decide(self, state: RoundState) -> Decision:
        self.seen.append(state)
        return self.answers[state.round]


def test_idle_guest_one_round_then_stop() -> None:
    tr = trace_of([[]] * 10)
    res = simulate(tr, QemuPrecopy(), LinkModel(PAGES_PER_S * W, rtt=0.02), device_bytes=10 * W)
    # round 0: 100 pages = 1 s; nothing dirtied; stop: 10 pages of device state (0.1 s) + rtt/2
    assert res.status == "completed" and res.rounds == 1
    assert res.pages_sent == 100 and res.final_pages == 0
    assert res.bytes_sent == 110 * W and res.downtime_bytes == 10 * W
    assert res.downtime == pytest.approx(0.1 + 0.01)
    assert res.total_time == pytest.approx(1.11)


def test_dirty_pages_come_back_and_the_qemu_rule_stops() -> None:
    tr = trace_of([list(range(10))] * 20)       # pages 0..9 written in every 0.1 s sample
    res = simulate(tr, QemuPrecopy(), LINK, Limits(downtime_limit=0.15), device_bytes=0)
    # round 0: 1 s, samples 0..9 dirty pages 0..9; 10 pages = 40960 B <= 100*W*0.15 = 61560 B
    assert [(r.pages_sent, r.dirtied, r.unsent_after) for r in res.history] == [(100, 10, 10)]
    assert res.status == "completed" and res.final_pages == 10
    assert res.downtime_bytes == 10 * W
    assert res.downtime == pytest.approx(0.1)
    assert res.total_time == pytest.approx(1.1)
    assert res.bytes_sent == 110 * W


def test_never_converging_guest_times_out() -> None:
    tr = trace_of([list(range(10))] * 20)
    res = simulate(tr, QemuPrecopy(), LINK, Limits(downtime_limit=0.05), device_bytes=0,
                   max_time=3.0)
    # round 0 (1 s), then rounds of 10 pages (0.1 s) each finding the same 10 pages dirty
    assert res.status == "timeout" and math.isnan(res.downtime)
    assert res.rounds == 1 + 20
    assert all(r.pages_sent == 10 and r.dirtied == 10 for r in res.history[1:])


def test_throttle_slows_guest_time() -> None:
    tr = trace_of([[i] for i in range(100)])      # sample i writes page i
    pol = Script(Decision(throttle_pct=50), Decision.stop())
    res = simulate(tr, pol, LINK, device_bytes=0)
    # 1 s of wall time at 50%: 0.5 s of guest time, samples 0..4 -> pages 0..4
    assert res.history[0].dirtied == 5 and res.history[0].throttle_pct == 50
    assert np.flatnonzero(pol.seen[1].dirty).tolist() == [0, 1, 2, 3, 4]
    assert res.final_pages == 5 and res.throttle_pct == 50


def test_start_offset_and_wraparound() -> None:
    tr = trace_of([[i] for i in range(10)], npages=250)   # 1 s of trace, page i in sample i
    pol = Script(Decision(), Decision.stop())
    res = simulate(tr, pol, LINK, start=0.65, device_bytes=0)
    # round 0 lasts 2.5 s > the 1 s trace: every sample
    assert res.history[0].dirtied == 10
    short = Script(Decision(send=np.arange(50)), Decision.stop())
    simulate(tr, short, LINK, start=0.65, device_bytes=0)
    # 0.5 s from guest time 0.65: samples ending at 0.7, 0.8, 0.9, 1.0, (1.1 -> sample 0)
    assert np.flatnonzero(short.seen[1].dirty).tolist() == [0, 6, 7, 8, 9]
    # pages 50.. were not sent in round 0 and stay unsent
    assert np.count_nonzero(short.seen[1].unsent) == 200 + 5


def test_postcopy_downtime_is_the_switchover_only() -> None:
    tr = trace_of([list(range(30))] * 10)
    pol = Script(Decision(), Decision.switch_to_postcopy())
    res = simulate(tr, pol, LinkModel(PAGES_PER_S * W, rtt=0.04), device_bytes=5 * W)
    assert res.status == "postcopy"
    assert res.downtime == pytest.approx(0.05 + 0.02)
    assert res.postcopy_bytes == 30 * W
    assert res.total_time == pytest.approx(1.0 + 0.07 + 0.3)
    assert res.pages_sent == 130


def test_link_penalties_and_max_bandwidth() -> None:
    assert LinkModel(1000.0, loss=0.2).effective == pytest.approx(800.0)
    assert LinkModel(1000.0, rtt=0.01, jitter=0.01).effective == pytest.approx(500.0)
    parsed = LinkModel.parse("8Mbit,rtt=20ms,loss=0.5")
    assert parsed.bandwidth == 1e6 and parsed.rtt == pytest.approx(0.02)
    assert parsed.effective == 5e5
    tr = trace_of([[]] * 5)
    res = simulate(tr, QemuPrecopy(), LinkModel(1e9), Limits(max_bandwidth=50 * W),
                   device_bytes=0)
    # 100 pages at 50 pages/s: the 100 pages are one batch, out at the link's rate; the
    # window (which starts when that batch is out) then waits 0.1 s x 100 / 5 = 2 s
    assert res.total_time == pytest.approx(100 * W / 1e9 + 2.0)
    # a long round averages max-bandwidth: 2000 pages at 50 pages/s, in 8 batches
    tr = trace_of([[]] * 5, npages=2000)
    res = simulate(tr, QemuPrecopy(), LinkModel(1e9), Limits(max_bandwidth=50 * W),
                   device_bytes=0)
    assert res.total_time == pytest.approx(40.0, rel=1e-3)
    # a round that fits in a window's budget goes out at the link's rate
    res = simulate(trace_of([[]] * 5, npages=4), QemuPrecopy(), LinkModel(1e9),
                   Limits(max_bandwidth=50 * W), device_bytes=0, min_round=0.0)
    assert res.total_time == pytest.approx(4 * W / 1e9)


def test_empty_rounds_take_min_round_and_the_state_is_read_only() -> None:
    tr = trace_of([[]] * 5)

    class Lazy(Policy):
        name = "lazy"

        def decide(self, state: RoundState) -> Decision:
            if state.round == 3:
                return Decision.stop()
            with pytest.raises(ValueError):
                state.unsent[0] = False
            return Decision(send=np.zeros(0, dtype=np.int64))

    res = simulate(tr, Lazy(), LINK, device_bytes=0, min_round=0.25)
    assert [r.duration for r in res.history] == [0.25] * 3
    assert res.final_pages == 100 and res.downtime == pytest.approx(1.0)


def test_a_failing_policy_is_a_failed_result_naming_it() -> None:
    class Bad(Policy):
        name = "bad-one"

        def decide(self, state: RoundState) -> Decision:
            return Decision(send=np.array([1000]))

    res = simulate_safely(trace_of([[]]), Bad(), LINK)
    assert res.status == "failed"
    assert res.error.startswith("migration policy 'bad-one' asked to send page 1000")


def test_cursor_unions_match_a_brute_force_or() -> None:
    rng = np.random.default_rng(5)
    masks = rng.random((37, 300)) < 0.05
    tr = Trace.from_masks(masks, 0.01)
    cur = TraceCursor(tr)
    for _ in range(200):
        g0 = float(rng.uniform(0, 1.0))
        g1 = g0 + float(rng.uniform(0, 0.5))
        want = np.zeros(300, bool)
        for i in range(1000):
            end = (i + 1) * 0.01
            if g0 < end - 1e-12 and end <= g1 + 1e-12:
                want |= masks[i % 37]
        got = np.unpackbits(cur.dirtied(g0, g1), count=300).astype(bool)
        assert (got == want).all(), (g0, g1)


def test_spread_cursor_writes_each_page_at_its_phase_of_the_sample() -> None:
    rng = np.random.default_rng(6)
    masks = rng.random((23, 200)) < 0.1
    tr = Trace.from_masks(masks, 0.01)
    cur = TraceCursor(tr, spread=True)
    assert cur.phase is not None and ((cur.phase > 0) & (cur.phase <= 1)).all()
    for _ in range(200):
        g0 = float(rng.uniform(0, 0.5))
        g1 = g0 + float(rng.choice([rng.uniform(0, 0.02), rng.uniform(0, 0.4)]))
        want = np.zeros(200, bool)
        for i in range(int(g1 / 0.01) + 2):
            at = (i + cur.phase) * 0.01
            want |= masks[i % 23] & (at > g0) & (at <= g1)
        got = np.unpackbits(cur.dirtied(g0, g1), count=200).astype(bool)
        assert (got == want).all(), (g0, g1, np.flatnonzero(got != want))
    # a round of a tenth of an interval sees about a tenth of a sample's pages
    one = Trace.from_masks(np.ones((4, 10000), bool), 0.05)
    part = np.unpackbits(TraceCursor(one, spread=True).dirtied(0.1, 0.105), count=10000)
    assert 800 < part.sum() < 1200
    assert np.unpackbits(TraceCursor(one).dirtied(0.1, 0.105), count=10000).sum() == 0


def test_throttled_speed_follows_the_guest_cpu_demand() -> None:
    # no busy fraction: the guest is taken to need all its CPU
    assert throttled_speed(0) == 1.0 and throttled_speed(40) == pytest.approx(0.6)
    assert throttled_speed(40, math.nan) == pytest.approx(0.6)
    # busy 25%: a throttle leaving >= 25% of the CPU costs nothing
    assert throttled_speed(50, 0.25) == 1.0 and throttled_speed(75, 0.25) == 1.0
    # ... below that the guest runs at (1 - pct) / busy of its pace
    assert throttled_speed(80, 0.25) == pytest.approx(0.8)
    assert throttled_speed(99, 0.25) == pytest.approx(0.04)
    assert throttled_speed(50, 1.0) == pytest.approx(0.5)
    assert throttled_speed(90, 0.0) == 1.0           # a guest that never runs loses nothing


def test_throttle_spares_a_guest_that_needs_little_cpu() -> None:
    masks = np.zeros((100, 100), bool)
    for i in range(100):
        masks[i, i] = True                           # sample i writes page i
    busy = np.full(100, 0.25, np.float32)
    tr = Trace(np.packbits(masks, axis=1), 100, 0.1, guest="hand", busy=busy)
    for pct, dirtied in ((50, 10), (75, 10), (87, 5)):
        pol = Script(Decision(throttle_pct=pct), Decision.stop())
        res = simulate(tr, pol, LINK, device_bytes=0)
        # round 0 lasts 1 s: at 50% or 75% the guest (busy 25%) keeps its pace, 1 s of
        # guest time, samples 0..9; at 87% it gets 13% of 25%: 0.52 s, samples 0..4
        assert res.history[0].dirtied == dirtied, pct
        assert np.flatnonzero(pol.seen[1].dirty).tolist() == list(range(dirtied))
    # busy given by the caller wins over the trace's
    pol = Script(Decision(throttle_pct=50), Decision.stop())
    assert simulate(tr, pol, LINK, device_bytes=0, busy=1.0).history[0].dirtied == 5
    # mean over the samples that have a reading
    busy[:50] = np.nan
    busy[50:] = 0.5
    tr = Trace(np.packbits(masks, axis=1), 100, 0.1, busy=busy)
    pol = Script(Decision(throttle_pct=75), Decision.stop())
    # 25% of the CPU for a guest needing 50%: half its pace, 0.5 s, samples 0..4
    assert simulate(tr, pol, LINK, device_bytes=0).history[0].dirtied == 5


def test_seed_draws_the_pages_phases_anew() -> None:
    one = Trace.from_masks(np.ones((1, 10000), bool), 0.1)
    a = np.unpackbits(TraceCursor(one, spread=True).dirtied(0.0, 0.05), count=10000)
    b = np.unpackbits(TraceCursor(one, spread=True, seed=1).dirtied(0.0, 0.05), count=10000)
    c = np.unpackbits(TraceCursor(one, spread=True).dirtied(0.0, 0.05), count=10000)
    assert (a == c).all()                      # the same seed, the same phases
    assert 4700 < a.sum() < 5300 and 4700 < b.sum() < 5300   # half the interval, either way
    assert (a != b).sum() > 3000               # but other pages


def test_final_copy_at_its_own_rate() -> None:
    tr = trace_of([list(range(10))] * 20)       # pages 0..9 written in every sample
    res = simulate(tr, QemuPrecopy(), LINK, Limits(downtime_limit=0.15), device_bytes=10 * W,
                   final_rate=4 * PAGES_PER_S * W, switchover_cost=0.01)
    # round 0 at the link's rate (1 s) as before; the 10 pages and 10 pages of device
    # state at 400 pages a second: 0.05 s, plus the fixed 0.01 s
    assert res.history[0].duration == pytest.approx(1.0)
    assert res.downtime == pytest.approx(0.06) and res.total_time == pytest.approx(1.06)
