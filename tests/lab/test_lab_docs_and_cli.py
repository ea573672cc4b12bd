"""docs/lab.md's example policy runs exactly as printed; the pyvm-lab command end to end
(real processes, real files)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pyvm.lab.link import LinkModel
from pyvm.lab.simulate import simulate
from pyvm.lab.workloads import synthesize
from pyvm.migration.policy import load_policy

ROOT = Path(__file__).resolve().parents[2]
LAB_MD = ROOT / "docs" / "lab.md"


def example_policy() -> str:
    text = LAB_MD.read_text()
    m = re.search(r"<!-- example-policy -->\n```python\n(.*?)```", text, re.S)
    assert m, "docs/lab.md lost its example policy block"
    return m.group(1)


def lab(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyvm.lab.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_docs_example_policy_runs_as_printed(tmp_path: Path) -> None:
    code = example_policy()
    assert len(code.splitlines()) < 50
    path = tmp_path / "deadline.py"
    path.write_text(code)
    policy = load_policy(f"{path}:Deadline")
    assert policy.name == "deadline"
    trace = synthesize("uniform:ram=16M,seconds=4,rate=6000")
    res = simulate(trace, policy, LinkModel.parse("50Mbit"))
    assert res.status == "completed"
    last = res.history[-1]
    assert last.start + last.duration >= 10.0 > last.start   # stopped at the deadline
    assert res.throttle_pct > 0
    qemu = simulate(trace, load_policy("qemu"), LinkModel.parse("50Mbit"), max_time=30)
    assert qemu.status == "timeout"                          # the deadline made the difference


@pytest.mark.slow            # matplotlib: several seconds on a loaded machine
def test_simulate_json_and_plots(tmp_path: Path) -> None:
    r = lab("simulate", "--workload", "zipf:ram=8M,seconds=2,rate=4000", "--link",
            "100Mbit,rtt=5ms", "--policy", "qemu", "--policy", "hot-cold", "--json",
            "--plot", str(tmp_path))
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout[:r.stdout.rindex("]") + 1])
    assert [row["policy"] for row in rows] == ["qemu", "hot-cold"]
    for name in ("remaining", "throughput", "times", "heatmap"):
        png = (tmp_path / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


@pytest.mark.slow
def test_info_and_plots(tmp_path: Path) -> None:
    from pyvm.lab.trace import save

    path = tmp_path / "s.trace"
    save(synthesize("sweep:ram=4M,seconds=1,rate=2000"), str(path))
    r = lab("info", str(path), "--plot", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "ram           4 MiB, 1024 pages of 4096" in r.stdout
    assert "dirty/sample  mean 100.0  max 100 pages" in r.stdout
    assert (tmp_path / "heatmap.png").exists() and (tmp_path / "working-set.png").exists()


@pytest.mark.parametrize("args, message", [
    (["simulate", "--workload", "idle", "--policy", "nope"], "pyvm-lab: migration policy 'nope'"),
    (["simulate", "--workload", "idle", "--link", "fast"], "pyvm-lab: link rate 'fast'"),
    (["simulate", "--workload", "wobbly"], "pyvm-lab: unknown workload 'wobbly'"),
    (["info", "/nonexistent.trace"], "pyvm-lab: cannot read trace '/nonexistent.trace'"),
])
def test_user_errors_are_one_line(args: list[str], message: str) -> None:
    r = lab(*args)
    assert r.returncode == 1
    assert r.stderr.startswith(message) and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1


@pytest.mark.parametrize("option", ["--runs", "--replays"])
def test_validate_refuses_fewer_than_one_run(option: str) -> None:
    r = lab("validate", option, "0")                    # refused before any VM starts
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.endswith(f"pyvm-lab validate: error: argument {option}: "
                             "must be at least 1, not 0\n"), r.stderr


def test_a_failing_policy_file_fails_the_run_with_its_name(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from pyvm.migration.policy import Decision, Policy\n"
                   "class Bad(Policy):\n"
                   "    name = 'bad'\n"
                   "    def decide(self, state):\n"
                   "        return 42\n")
    r = lab("simulate", "--workload", "idle:ram=4M", "--policy", f"{bad}:Bad")
    assert r.returncode == 1
    assert "migration policy 'bad' returned int, not a Decision" in r.stdout
