"""The policy API: answers are checked, failures name the policy, loading by name/module/file,
and the example policies decide as their rules say on hand-made round states."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pyvm.lab.policies.auto_converge import AutoConverge
from pyvm.lab.policies.hot_cold import HotCold
from pyvm.lab.policies.hybrid_postcopy import HybridPostcopy
from pyvm.lab.policies.xen_skip import XenSkip
from pyvm.migration.policy import (BUILTIN_POLICIES, Decision, Limits, LinkEstimate,
                                   MigrationSetup, Policy, PolicyError, QemuPrecopy, RamRegion,
                                   RoundRecord, RoundState, call_decide, load_policy)

N = 100


def setup(downtime: float = 0.3, npages: int = N) -> MigrationSetup:
    return MigrationSetup(npages, (RamRegion("pc.ram", 0, 0, npages),),
                          LinkEstimate(4096 * 100.0), Limits(downtime_limit=downtime))


def state(rnd: int, unsent: list[int] | None = None, dirty: list[int] | None = None,
          bandwidth: float = 4096 * 100.0, elapsed: float = 0.0,
          history: tuple[RoundRecord, ...] = ()) -> RoundState:
    u = np.zeros(N, bool)
    d = np.zeros(N, bool)
    if unsent is None:
        u[:] = True
    else:
        u[unsent] = True
    if dirty is None:
        d[:] = rnd == 0
    else:
        d[dirty] = True
    return RoundState(rnd, elapsed, bandwidth, d, u, history, 0)


class Answer(Policy):
    name = "answer"

    def __init__(self, answer: object) -> None:
        self.answer = answer

    def decide(self, state: RoundState) -> Decision:
        return self.answer  # type: ignore[return-value]


@pytest.mark.parametrize("answer, words", [
    (None, "returned NoneType, not a Decision"),
    ({"send": []}, "returned dict"),
    (Decision(throttle_pct=150), "throttle 150"),
    (Decision(throttle_pct=True), "throttle True"),
    (Decision(send=np.array([5, N])), f"page {N}, outside 0..{N - 1}"),
    (Decision(send=np.array([-1])), "page -1"),
    (Decision(send=np.array([3, 3])), "twice"),
    (Decision(send=np.array([[1, 2]])), "2-D"),
    (Decision(send=np.array([1.5])), "float64"),
    (Decision(send=np.array([7])), "page 7, which is not unsent"),
    (Decision(stop_and_copy=True, postcopy=True), "stop-and-copy and postcopy"),
])
def test_nonsense_answers_fail_naming_the_policy(answer: object, words: str) -> None:
    with pytest.raises(PolicyError) as err:
        call_decide(Answer(answer), state(1, unsent=[1, 2, 3, 5, 99]))
    assert str(err.value).startswith("migration policy 'answer'")
    assert words in str(err.value)


def test_valid_answer_keeps_the_order() -> None:
    d = call_decide(Answer(Decision(send=np.array([5, 1, 3], dtype=np.int32))),
                    state(1, unsent=[1, 3, 5]))
    assert d.send is not None and d.send.dtype == np.int64
    assert d.send.tolist() == [5, 1, 3]


def test_a_raising_policy_fails_with_its_name_and_round() -> None:
    class Boom(Policy):
        name = "boom"

        def decide(self, state: RoundState) -> Decision:
            raise ZeroDivisionError("oops")

    with pytest.raises(PolicyError, match=r"^migration policy 'boom' failed in round 4: "
                                          r"ZeroDivisionError: oops$"):
        call_decide(Boom(), state(4))


def test_load_by_short_name_module_and_file(tmp_path: Path) -> None:
    for name in BUILTIN_POLICIES:
        assert load_policy(name).name == name
    assert isinstance(load_policy("pyvm.lab.policies.xen_skip:XenSkip"), XenSkip)
    f = tmp_path / "mine.py"
    f.write_text("from pyvm.migration.policy import Decision, Policy\n"
                 "class Mine(Policy):\n"
                 "    def decide(self, state):\n"
                 "        return Decision.stop()\n")
    p = load_policy(f"{f}:Mine")
    assert p.name == f"{f}:Mine"          # unnamed policies are called by their reference
    with pytest.raises(PolicyError, match="no file"):
        load_policy(f"{tmp_path}/nope.py:Mine")
    with pytest.raises(PolicyError, match="cannot be loaded: AttributeError"):
        load_policy(f"{f}:Other")
    with pytest.raises(PolicyError, match="expected a name"):
        load_policy("no-such-policy")
    with pytest.raises(PolicyError, match="ModuleNotFoundError"):
        load_policy("pyvm.no_such_module:X")


def test_qemu_rule_threshold_is_bandwidth_times_downtime_limit() -> None:
    p = QemuPrecopy()
    p.start(setup(downtime=0.1))            # threshold 409600 * 0.1 = 40960 bytes = 10 pages
    assert p.decide(state(0)) == Decision()                 # round 0 always sends
    assert p.decide(state(1, unsent=list(range(10)))).stop_and_copy
    assert not p.decide(state(1, unsent=list(range(11)))).stop_and_copy
    # avail-switchover-bandwidth replaces the measured rate
    p.start(MigrationSetup(N, (), LinkEstimate(1.0), Limits(0.1, switchover_bandwidth=4096 * 200)))
    assert p.decide(state(1, unsent=list(range(20)))).stop_and_copy


def test_xen_skips_pages_dirty_in_two_syncs_in_a_row() -> None:
    p = XenSkip()
    p.start(setup())
    rec = RoundRecord(0, 0, 1, 10, 10 * 4104, 10, 10, 0)
    assert p.decide(state(0)).send.tolist() == list(range(N))          # type: ignore[union-attr]
    d1 = p.decide(state(1, unsent=list(range(80)), dirty=list(range(80)), history=(rec,)))
    assert d1.send.tolist() == list(range(80))                         # type: ignore[union-attr]
    # pages 0..59 dirty again: skipped; 90 dirty for the first time: sent
    d2 = p.decide(state(2, unsent=list(range(60)) + [90], dirty=list(range(60)) + [90],
                        history=(rec,) * 2))
    assert d2.send.tolist() == [90]                                    # type: ignore[union-attr]
    # 0..59 stayed clean this time: sent now, with 95 (new)
    d3 = p.decide(state(3, unsent=list(range(60)) + [95], dirty=[95], history=(rec,) * 3))
    assert d3.send.tolist() == list(range(60)) + [95]                  # type: ignore[union-attr]
    few = p.decide(state(4, unsent=list(range(49)), dirty=[], history=(rec,) * 4))
    assert few.stop_and_copy                                           # < 50 pages left
    lots = RoundRecord(0, 0, 1, 3 * N + 1, 0, 0, 0, 0)
    p.start(setup())
    assert p.decide(state(1, unsent=list(range(90)), history=(lots,))).stop_and_copy  # 3x RAM


def test_auto_converge_throttles_20_then_30_after_two_high_periods_each() -> None:
    p = AutoConverge()
    p.start(setup(downtime=0.0001))
    hot = RoundRecord(0, 0, 1.0, 50, 50 * 4104, 40, 90, 0)   # dirtied 40 pages > 50% of 50 sent
    seen = []
    for k in range(1, 6):
        d = p.decide(state(k, unsent=list(range(90)), dirty=list(range(40)), elapsed=float(k),
                           history=(hot,) * k))
        seen.append(d.throttle_pct)
    assert seen == [0, 20, 20, 30, 30]
    cold = RoundRecord(0, 0, 1.0, 50, 50 * 4104, 5, 90, 0)
    assert p.decide(state(6, unsent=list(range(90)), elapsed=6.0,
                          history=(cold,) * 6)).throttle_pct == 30          # never lowered


def test_hybrid_switches_after_two_rounds_without_progress() -> None:
    p = HybridPostcopy()
    p.start(setup(downtime=0.0001))
    answers = [p.decide(state(k, unsent=list(range(n)))) for k, n in
               enumerate([100, 80, 40, 38, 37])]
    assert [a.postcopy for a in answers] == [False, False, False, False, True]


def test_hot_cold_sends_cold_first_and_holds_hot_pages_back() -> None:
    p = HotCold()
    p.start(setup(downtime=0.0001))
    p.decide(state(0))
    for k in (1, 2):
        d = p.decide(state(k, unsent=[1, 2, 3], dirty=[1, 2] if k == 1 else [1]))
        assert d.send is not None
    assert d.send.tolist() == [3, 2, 1]        # learning: everything, coldest first  # type: ignore[union-attr]
    d3 = p.decide(state(3, unsent=[1, 2, 3, 4], dirty=[1, 4]))   # writes: 1->3, 2->1, 4->1
    assert d3.send.tolist() == [3, 2, 4]       # page 1 (3 of 3 rounds) is held back  # type: ignore[union-attr]
    d4 = p.decide(state(4, unsent=[1], dirty=[1]))
    assert d4.stop_and_copy                    # only hot pages left
