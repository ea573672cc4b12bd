"""The 8254's per-tick path in C (pyvm/_pit.pyx) against the Python method, its twin:
generated sequences of control words, counts, reads, gate changes and clock steps run on
two Pit8254s, one with the native ``run_timers`` and one with the Python one; every step
also fires the timers.  After every step the results, every field of the state table and
the IRQ 0 edges raised so far must be equal.  The clock includes times far from zero
(days of uptime) and steps of days, where the tick arithmetic leaves 64 bits."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvm.devices import pit8254
from pyvm.devices.pit8254 import PIT_VMSD, Pit8254

pytestmark = pytest.mark.skipif(pit8254._native is None,
                                reason="pyvm._pit not built (or PYVM_PURE_PYTHON)")


class Clock:
    def __init__(self, start: int) -> None:
        self.now = start

    def now_ns(self) -> int:
        return self.now


class Ctx:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.edges: list[tuple[int, int, bool]] = []

    def set_irq(self, line: int, level: bool) -> None:
        self.edges.append((self.clock.now, line, bool(level)))

    def kick(self) -> None:
        pass

    def log(self, topic: str, message: str) -> None:
        pass


def _control() -> st.SearchStrategy[int]:
    """Control words for channel 0 mostly (the one with a deadline), any mode and access."""
    return st.one_of(
        st.builds(lambda rw, mode, bcd: rw << 4 | mode << 1 | bcd,
                  st.integers(1, 3), st.integers(0, 7), st.integers(0, 1)),
        st.integers(0, 255),
    )


OPS = st.one_of(
    st.tuples(st.just("out"), st.just(0x43), _control()),
    st.tuples(st.just("out"), st.sampled_from([0x40, 0x42]),
              st.one_of(st.integers(0, 255), st.sampled_from([0, 1, 2, 0x9c, 0x2e]))),
    st.tuples(st.just("out"), st.just(0x61), st.integers(0, 255)),
    st.tuples(st.just("in"), st.sampled_from([0x40, 0x42, 0x61])),
    st.tuples(st.just("step"), st.one_of(st.integers(0, 20_000_000),
                                         st.sampled_from([838, 839, 1000, 10_000_000,
                                                          3 * 86_400 * 10**9]))),
    st.tuples(st.just("fire")),
)


def _pair(start: int) -> tuple[tuple[Pit8254, Ctx], tuple[Pit8254, Ctx]]:
    out = []
    for native in (True, False):
        clock = Clock(start)
        ctx = Ctx(clock)
        pit = Pit8254(native=native)
        pit.attach(ctx)  # type: ignore[arg-type]
        out.append((pit, ctx))
    return out[0], out[1]


def _state(pit: Pit8254, ctx: Ctx) -> dict[str, Any]:
    state: dict[str, Any] = {f.name: (list(v) if isinstance(v := getattr(pit, f.name), list) else v)
                             for f in PIT_VMSD.fields}
    state["edges"] = list(ctx.edges)
    return state


def _step(pit: Pit8254, ctx: Ctx, op: tuple[Any, ...]) -> Any:
    kind = op[0]
    if kind == "out":
        pit.io_write(op[1], 1, op[2])
    elif kind == "in":
        return pit.io_read(op[1], 1)
    elif kind == "step":
        ctx.clock.now += op[1]
    pit.run_timers(ctx.clock.now)
    return None


def test_native_is_used() -> None:
    assert Pit8254(native=True).native
    assert not Pit8254(native=False).native


@settings(max_examples=300, deadline=None)
@given(start=st.sampled_from([0, 1, 10**9, 3 * 86_400 * 10**9, (1 << 62)]),
       ops=st.lists(OPS, max_size=60))
def test_run_timers_matches_the_python_method(start: int, ops: list[tuple[Any, ...]]) -> None:
    (a, actx), (b, bctx) = _pair(start)
    # a working periodic channel 0 first (the run loop's common case), then anything
    for op in [("out", 0x43, 0x34), ("out", 0x40, 0x9c), ("out", 0x40, 0x2e)] + ops:
        assert _step(a, actx, op) == _step(b, bctx, op), op
        assert _state(a, actx) == _state(b, bctx), op


def test_a_late_loop_gets_one_edge_and_the_next_boundary() -> None:
    """Five periods late: one edge, the deadline the next period boundary after now."""
    (a, actx), (b, bctx) = _pair(0)
    for pit, ctx in ((a, actx), (b, bctx)):
        for port, value in ((0x43, 0x34), (0x40, 0x9c), (0x40, 0x2e)):   # 100 Hz
            pit.io_write(port, 1, value)
        first = pit.irq_next_time
        ctx.clock.now = first + 5 * 10_000_000 + 1
        pit.run_timers(ctx.clock.now)
        assert [e[1:] for e in ctx.edges] == [(0, True), (0, False)]
        assert ctx.clock.now < pit.irq_next_time <= ctx.clock.now + 10_000_000
    assert a.irq_next_time == b.irq_next_time
