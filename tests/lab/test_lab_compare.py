"""pyvm-lab compare: a tiny scenario file on real VMs gives the figures and a sane table."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from pyvm.errors import PyvmError
from pyvm.lab.compare import load_plan

TOML = """
policies = ["qemu", "xen-skip"]

[defaults]
ram = "32M"
max_bandwidth = "20MB"
warmup = "0.3s"
trace = "1s"

[[scenario]]
name = "hot-cold"
append = "start=2 size=8 pattern=1 rate=100"
"""

PNGS = ("remaining", "throughput", "times", "progress", "heatmap")


@pytest.mark.slow
def test_compare_writes_figures_and_table(tmp_path: Path) -> None:
    spec = tmp_path / "scenarios.toml"
    spec.write_text(TOML)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "pyvm.lab.cli", "compare", str(spec),
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in PNGS:
        png = out / "hot-cold" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert png.stat().st_size > 5000, name
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [row["policy"] for row in rows] == ["qemu", "xen-skip"]
    for row in rows:
        assert row["status"] == "completed", row
        assert 0 < float(row["total_time"]) < 30
        assert 0 <= float(row["downtime"]) < float(row["total_time"])
        # 32 MiB of mostly zero RAM plus an 8 MiB range the guest writes, at 20 MB/s
        assert 1 << 20 < int(row["bytes_sent"]) < 200 << 20
        assert float(row["guest_writes_per_s"]) > 0
    assert "pyvm-lab compare" in r.stdout and "xen-skip" in r.stdout


@pytest.mark.parametrize("text, error", [
    ("[[scenario]]\nappend = 'x'\n", "every scenario needs a name"),
    ("[[scenario]]\nname = 'a'\nbogus = 1\n", "unknown key(s) bogus"),
    ("policies = ['nope nope']\n[[scenario]]\nname = 'a'\n", "migration policy 'nope nope'"),
    ("x = [\n", "is not valid TOML"),
    ("policies = ['qemu']\n", "has no [[scenario]]"),
])
def test_bad_plans(tmp_path: Path, text: str, error: str) -> None:
    spec = tmp_path / "bad.toml"
    spec.write_text(text)
    _assert_refused(spec, error)


def test_binary_plan_is_refused(tmp_path: Path) -> None:
    spec = tmp_path / "bad.toml"
    spec.write_bytes(b"\xeb\x44\xea\x22 = 1\n")
    _assert_refused(spec, "is not valid TOML: not UTF-8 text (byte 0xeb at offset 0)")


def _assert_refused(spec: Path, error: str) -> None:
    with pytest.raises(Exception) as err:
        load_plan(str(spec))
    assert error in str(err.value)
    assert isinstance(err.value, PyvmError) or "policy" in error
