"""The precopy engine runs a policy (x-policy): QEMU's default keeps the RAM stream
byte-identical, other orders restore correctly, policies that fail end the migration
with their name in error-desc while the guest keeps running; limits changed mid-migration
reach the policy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pyvm.analyze import AnalyzerTarget, find_vmdesc
from pyvm.migration.control.policy_runner import PolicyRunner
from pyvm.migration.policy import Decision, Limits, LinkEstimate, Policy, PolicyError, QemuPrecopy
from pyvm.migration.stream.decoder import SectionLoaded, StreamDecoder
from tests.conftest import guest
from tests.vmproc import QmpFailed, VmProcess

RAM = 32 << 20
MEMCHECK = ["-m", "32M", "-kernel", guest("memcheck.elf"), "-append", "start=1 size=4",
            "-display", "none"]

POLICIES = '''
import numpy as np
from pyvm.migration.policy import Decision, Policy, qemu_converged


class Explicit(Policy):
    """QEMU's rule, but naming every unsent page in address order itself."""
    name = "explicit"

    def decide(self, state):
        if state.round > 0 and qemu_converged(self.setup, state):
            return Decision.stop()
        return Decision(send=np.flatnonzero(state.unsent))


class Backwards(Policy):
    """Highest page first, in two halves over two rounds, then stop-and-copy."""
    name = "backwards"

    def decide(self, state):
        pages = np.flatnonzero(state.unsent)[::-1]
        if state.round >= 2:
            return Decision.stop()
        return Decision(send=pages[: pages.size // 2 + 1], throttle_pct=30)


class Raises(Policy):
    name = "raises"

    def decide(self, state):
        if state.round == 1:
            raise ValueError("boom")
        return Decision()


class Nonsense(Policy):
    name = "nonsense"

    def decide(self, state):
        return "send everything"


class WantsPostcopy(Policy):
    name = "wants-postcopy"

    def decide(self, state):
        return Decision.switch_to_postcopy() if state.round == 1 else Decision()
'''


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policies.py"
    path.write_text(POLICIES)
    return path


def _ram_end(data: bytes) -> int:
    """The stream offset just after its last ``ram`` section."""
    target = AnalyzerTarget(find_vmdesc(data), False, False)
    try:
        events = StreamDecoder(target).feed(data)
    finally:
        target.close()
    ends = [e.end_offset for e in events if isinstance(e, SectionLoaded) and e.idstr == "ram"]
    assert ends, "no ram section in the stream"
    return max(ends)


def _save_paused(vms, tmp_path: Path, name: str, policy: str | None) -> bytes:
    vm = vms(name, *MEMCHECK, "-S")
    if policy is not None:
        vm.cmd("migrate-set-parameters", **{"x-policy": policy})
    state = tmp_path / f"{name}.state"
    vm.cmd("migrate", uri=f"file:{state}")
    done = vm.wait_migration()
    assert done["status"] == "completed", done
    vm.close()
    return state.read_bytes()


def test_default_policy_stream_is_byte_identical(vms, tmp_path: Path, policy_file: Path) -> None:
    """The RAM part of the stream (everything the policy governs) is the same bytes with
    x-policy unset, 'qemu', and a file policy naming the same pages itself.  (Device
    sections after it carry host-time-dependent timer state, different on every run.)"""
    default = _save_paused(vms, tmp_path, "default", None)
    named = _save_paused(vms, tmp_path, "named", "qemu")
    explicit = _save_paused(vms, tmp_path, "explicit", f"{policy_file}:Explicit")
    end = _ram_end(default)
    assert end > RAM // 4096 * 8 // 64       # at least a header per populated page run
    assert _ram_end(named) == _ram_end(explicit) == end
    assert named[:end] == default[:end]
    assert explicit[:end] == default[:end]
    assert len(named) == len(explicit) == len(default)


def test_pages_out_of_order_restore(vms, tmp_path: Path, policy_file: Path) -> None:
    """A policy sending pages highest first, half per round, throttling: the running
    guest's state arrives whole and the destination carries on."""
    src = vms("src", *MEMCHECK)
    src.wait_serial("memcheck gen 2 ok")
    src.cmd("migrate-set-parameters", **{"x-policy": f"{policy_file}:Backwards"})
    assert src.cmd("query-migrate-parameters")["x-policy"] == f"{policy_file}:Backwards"
    state = tmp_path / "vm.state"
    src.cmd("migrate", uri=f"file:{state}")
    done = src.wait_migration()
    assert done["status"] == "completed", done
    assert done["ram"]["dirty-sync-count"] == 4     # setup sync, 2 rounds, final sync
    dst = vms("dst", *MEMCHECK, "-S", "-incoming", f"file:{state}")
    assert dst.wait_migration(("completed", "failed"))["status"] == "completed"
    assert src.pmem(RAM) == dst.pmem(RAM)
    dst.cmd("cont")
    out = dst.wait_serial(" ok\r\n", count=2)
    assert "FAIL" not in out


@pytest.mark.parametrize("cls, text", [
    ("Raises", "migration policy 'raises' failed in round 1: ValueError: boom"),
    ("Nonsense", "migration policy 'nonsense' returned str, not a Decision"),
    ("WantsPostcopy", "migration policy 'wants-postcopy' asked to switch to postcopy in "
                      "round 1, but the postcopy-ram capability is off"),
])
def test_failing_policy_fails_the_migration(vms, tmp_path: Path, policy_file: Path,
                                            cls: str, text: str) -> None:
    src = vms("src", *MEMCHECK)
    src.wait_serial("memcheck gen 1 ok")
    src.hmp(f"migrate_set_parameter x-policy {policy_file}:{cls}")
    assert f"x-policy: {policy_file}:{cls}" in src.hmp("info migrate_parameters")
    src.cmd("migrate", uri=f"file:{tmp_path / 'vm.state'}")
    done = src.wait_migration()
    assert done["status"] == "failed"
    assert done["error-desc"] == text
    assert src.status() == "running"
    gens = src.serial().count(" ok\r\n")
    src.wait_serial(" ok\r\n", count=gens + 1)        # the guest still makes progress


def test_unloadable_policy(vms, tmp_path: Path) -> None:
    src = vms("src", *MEMCHECK)
    with pytest.raises(QmpFailed) as err:
        src.cmd("migrate-set-parameters", **{"x-policy": "no colon"})
    assert "x-policy" in str(err.value)
    with pytest.raises(QmpFailed):
        src.cmd("migrate-set-parameters", **{"x-policy": 3})
    src.cmd("migrate-set-parameters", **{"x-policy": "no_such_module_xyz:Policy"})
    src.cmd("migrate", uri=f"file:{tmp_path / 'vm.state'}")
    done = src.wait_migration()
    assert done["status"] == "failed"
    assert done["error-desc"].startswith("migration policy 'no_such_module_xyz:Policy' "
                                         "cannot be loaded: ModuleNotFoundError")
    assert src.status() == "running"


# -- in process ----------------------------------------------------------------------------------

class _Block:
    def __init__(self, name: str, gpa: int, npages: int) -> None:
        self.name, self.gpa, self.npages = name, gpa, npages


class _Fixed(Policy):
    name = "fixed"

    def __init__(self, send: list[int]) -> None:
        self.send = send

    def decide(self, state):  # type: ignore[no-untyped-def]
        return Decision(send=np.array(self.send))


def test_runner_splits_decisions_per_block_in_order() -> None:
    a, b = _Block("a", 0, 8), _Block("b", 1 << 20, 4)
    runner = PolicyRunner(_Fixed([9, 2, 3, 11, 0]), [a, b], Limits(), LinkEstimate(1e6))
    runner.policy.start(runner.setup)
    pending = [(a, np.arange(8)), (b, np.array([1, 3]))]
    words = [np.array([0xFF], np.uint64), np.array([0b1010], np.uint64)]
    decision = runner.decide(pending, words, 1e6)
    runs, rest = runner.plan(decision, pending)
    assert [(blk.name, idx.tolist()) for blk, idx in runs] == [
        ("b", [1]), ("a", [2, 3]), ("b", [3]), ("a", [0])]
    assert [(blk.name, idx.tolist()) for blk, idx in rest] == [("a", [1, 4, 5, 6, 7])]
    runner.end_round(runner.started, 0.5, 5, 5 * 4104, words, 5)
    assert runner.history[0].dirtied == 10 and runner.round == 1


def test_runner_refuses_pages_not_unsent() -> None:
    a = _Block("a", 0, 8)
    runner = PolicyRunner(_Fixed([5]), [a], Limits(), LinkEstimate(1e6))
    runner.policy.start(runner.setup)
    with pytest.raises(PolicyError, match="'fixed' asked to send page 5, which is not unsent"):
        runner.decide([(a, np.array([1, 2]))], [np.zeros(1, np.uint64)], 1e6)


def test_default_runner_sends_everything() -> None:
    a = _Block("a", 0, 8)
    runner = PolicyRunner(QemuPrecopy(), [a], Limits(), LinkEstimate(1e6))
    runner.policy.start(runner.setup)
    pending = [(a, np.array([1, 2]))]
    runs, rest = runner.plan(runner.decide(pending, [np.zeros(1, np.uint64)], 1e6), pending)
    assert runs == pending and rest == []


class _Params:
    """The attributes and keys of MigrationParameters the runner reads."""

    def __init__(self, downtime_ms: int) -> None:
        self.downtime_limit, self.max_bandwidth = downtime_ms, 0
        self.values = {"avail-switchover-bandwidth": 0}

    def __getitem__(self, key: str) -> int:
        return self.values[key]


def test_limits_changed_mid_migration_reach_the_policy() -> None:
    """QEMU applies migrate-set-parameters at once: a downtime-limit of 0 keeps QEMU's rule
    iterating, raising it lets the next decision stop."""
    a = _Block("a", 0, 8)
    params = _Params(0)
    runner = PolicyRunner.from_parameters("qemu", [a], params)
    pending = [(a, np.array([1, 2]))]
    words = [np.zeros(1, np.uint64)]
    runner.end_round(runner.started, 0.1, 8, 8 * 4104, words, 2)
    assert not runner.decide(pending, words, 1e6).stop_and_copy
    params.downtime_limit = 10_000
    assert runner.decide(pending, words, 1e6).stop_and_copy
    assert runner.policy.setup.limits.downtime_limit == 10.0
