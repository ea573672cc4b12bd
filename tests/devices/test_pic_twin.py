"""The 8259A pair's C hot paths (pyvm/_pic.pyx) against the Python methods, their twin:
generated sequences of port writes and reads, IRQ line changes, INTA cycles and INT
checks run on two PicPairs, one native and one Python; after every step the results,
every register of the state table, the INT output, the kicks the run loop got, the
``info irq`` counters and the unimplemented-feature log must be equal."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvm.devices import pic8259
from pyvm.devices.pic8259 import PIC_VMSD, PicPair

pytestmark = pytest.mark.skipif(pic8259._native is None,
                                reason="pyvm._pic not built (or PYVM_PURE_PYTHON)")

PORTS = (0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1, 0x22)
# The usual PC programming (ICW1-4 to both chips, then masks), so that the generated
# sequences also start from a working pair, not only from reset.
PC_INIT = [("out", 0x20, 1, 0x11), ("out", 0x21, 1, 0x20), ("out", 0x21, 1, 0x04),
           ("out", 0x21, 1, 0x01), ("out", 0xA0, 1, 0x11), ("out", 0xA1, 1, 0x28),
           ("out", 0xA1, 1, 0x02), ("out", 0xA1, 1, 0x01), ("out", 0x21, 1, 0x00),
           ("out", 0xA1, 1, 0x00)]


class Ctx:
    def __init__(self) -> None:
        self.kicks = 0
        self.logged: list[tuple[str, str]] = []

    def kick(self) -> None:
        self.kicks += 1

    def log(self, topic: str, message: str) -> None:
        self.logged.append((topic, message))


def _byte() -> st.SearchStrategy[int]:
    """Any byte, or one shaped as a command: OCW2 (command << 5 | level), OCW3
    (0x08 | ESMM/SMM, poll, RR/RIS), ICW1 (0x10 | LTIM, SNGL, IC4, ADI) or ICW4."""
    return st.one_of(
        st.integers(0, 255),
        st.builds(lambda c, lvl: c << 5 | lvl, st.integers(0, 7), st.integers(0, 7)),
        st.builds(lambda bits: 0x08 | bits, st.sampled_from(
            [0x00, 0x01, 0x02, 0x03, 0x04, 0x06, 0x07, 0x20, 0x40, 0x60, 0x62, 0x64])),
        st.builds(lambda bits: 0x10 | bits, st.integers(0, 15)),
        st.sampled_from([0x01, 0x03, 0x11, 0x13, 0x00, 0x02]),
    )


OPS = st.one_of(
    st.tuples(st.just("out"), st.sampled_from(PORTS), st.sampled_from([1, 2]), _byte()),
    st.tuples(st.just("in"), st.sampled_from(PORTS), st.sampled_from([1, 2])),
    st.tuples(st.just("irq"), st.integers(0, 15), st.booleans()),
    st.tuples(st.just("pulse"), st.integers(0, 15)),
    st.tuples(st.just("ack")),
    st.tuples(st.just("pending")),
)


def _state(p: PicPair, ctx: Ctx) -> dict[str, Any]:
    state: dict[str, Any] = {f.name: list(getattr(p, f.name)) for f in PIC_VMSD.fields}
    state.update(int_out=p._int_out, kicks=ctx.kicks, logged=list(ctx.logged),
                 irq_count=list(p.irq_count), levels=list(p._irq_level))
    return state


def _step(p: PicPair, op: tuple[Any, ...]) -> Any:
    kind = op[0]
    if kind == "out":
        p.io_write(op[1], op[2], op[3] | (op[3] << 8) if op[2] == 2 else op[3])
        return None
    if kind == "in":
        return p.io_read(op[1], op[2])
    if kind == "irq":
        p.set_irq(op[1], op[2])
        return None
    if kind == "pulse":                      # what the PIT does for every period
        p.set_irq(op[1], True)
        p.set_irq(op[1], False)
        return None
    if kind == "ack":
        return p.acknowledge()
    return p.has_pending()


@settings(max_examples=200, deadline=None)
@given(st.booleans(), st.lists(OPS, min_size=1, max_size=60))
def test_native_pic_matches_the_python_pic(pc_init: bool, ops: list[tuple[Any, ...]]) -> None:
    pair = []
    for native in (True, False):
        p = PicPair(native=native)
        assert p.native is native
        ctx = Ctx()
        p.attach(ctx)   # type: ignore[arg-type] - the two calls the PIC makes
        pair.append((p, ctx))
    for op in (PC_INIT if pc_init else []) + ops:
        results = [_step(p, op) for p, _ in pair]
        assert results[0] == results[1], op
        assert type(results[0]) is type(results[1]), op
        assert _state(*pair[0]) == _state(*pair[1]), op


def test_native_pic_refuses_a_bad_line_like_the_python_one() -> None:
    for native in (True, False):
        with pytest.raises(ValueError, match="ISA IRQ line 16 out of range 0-15"):
            PicPair(native=native).set_irq(16, True)


@settings(max_examples=100, deadline=None)
@given(st.lists(OPS, min_size=1, max_size=40))
def test_set_irq_on_loop_is_set_irq_without_the_kick(ops: list[tuple[Any, ...]]) -> None:
    """pyvm/_idle.pyx raises IRQ 0 with ``set_irq_on_loop`` (on the loop's own thread,
    where the kick would be ignored): every register as after ``set_irq``, no kick."""
    loop, ref = PicPair(native=True), PicPair(native=True)
    lctx, rctx = Ctx(), Ctx()
    loop.attach(lctx)   # type: ignore[arg-type]
    ref.attach(rctx)    # type: ignore[arg-type]
    for op in PC_INIT + ops + [("pulse", 0)]:
        if op[0] in ("irq", "pulse"):
            levels = [op[2]] if op[0] == "irq" else [True, False]
            for level in levels:
                pic8259._native.set_irq_on_loop(loop, op[1], level)
                ref.set_irq(op[1], level)
            kicks = lctx.kicks
            assert _state(loop, lctx) == dict(_state(ref, rctx), kicks=kicks), op
        else:
            assert _step(loop, op) == _step(ref, op), op
            lctx.kicks = rctx.kicks = 0
    assert lctx.kicks == 0
