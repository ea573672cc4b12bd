"""A sweep on a real Dask LocalCluster gives the rows the simulator gives in-process."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from pyvm.lab.sweep import Cell, grid, read_table, run_cells, run_sweep, write_table
from pyvm.migration.policy import Limits

WORKLOADS = ["uniform:ram=8M,seconds=2,rate=3000", "sweep:ram=8M,seconds=2,rate=1500"]
LINKS = ["100Mbit", "40Mbit,rtt=10ms"]


def _same_nan(row: dict[str, object]) -> dict[str, object]:
    return {k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}


@pytest.mark.slow
def test_small_grid_on_a_local_cluster(tmp_path: Path) -> None:
    cells = grid(["qemu", "xen-skip", "hybrid-postcopy"], WORKLOADS, LINKS, starts=2)
    assert len(cells) == 3 * 2 * 2 * 2
    assert {c.start for c in cells} == {0.0, 1.0}
    rows = run_sweep(cells, Limits(downtime_limit=0.05), workers=2, batch=5)
    local = run_cells(cells, Limits(downtime_limit=0.05))
    assert [(r["policy"], r["trace"], r["link"], r["start"]) for r in rows] == \
        [(c.policy, c.trace, c.link, c.start) for c in cells]
    assert [_same_nan(r) for r in rows] == [_same_nan(r) for r in local]
    assert {r["status"] for r in rows} <= {"completed", "postcopy", "timeout"}
    path = str(tmp_path / "out.csv")
    write_table(rows, path)
    back = read_table(path)
    assert [r["bytes_sent"] for r in back] == [r["bytes_sent"] for r in rows]
    assert [r["total_time"] for r in back] == pytest.approx([r["total_time"] for r in rows],
                                                            nan_ok=True)


def test_unknown_policy_is_a_failed_row_not_a_crash() -> None:
    rows = run_cells([Cell("nope", WORKLOADS[0], "1Gbit", 0.0),
                      Cell("qemu", WORKLOADS[0], "1Gbit", 0.0)], Limits())
    assert rows[0]["status"] == "failed" and "migration policy 'nope'" in rows[0]["error"]
    assert rows[1]["status"] == "completed"


@pytest.mark.slow
def test_cli_sweep_on_an_existing_scheduler(tmp_path: Path) -> None:
    import subprocess
    import sys

    from distributed import LocalCluster

    root = Path(__file__).resolve().parents[2]
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp",
                      host="127.0.0.1", dashboard_address=None) as cluster:
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        out = tmp_path / "r.csv"
        r = subprocess.run(
            [sys.executable, "-m", "pyvm.lab.cli", "sweep", "--scheduler",
             cluster.scheduler_address, "--policy", "qemu", "--policy", "auto-converge",
             "--workload", WORKLOADS[0], "--link", LINKS[0], "--starts", "3",
             "--out", str(out), "--plot", str(tmp_path)],
            capture_output=True, text=True, timeout=120, cwd=root)
        assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("6 simulated migrations in ")
    rows = read_table(str(out))
    cells = grid(["qemu", "auto-converge"], WORKLOADS[:1], LINKS[:1], starts=3)
    local = run_cells(cells, Limits())
    assert [(r["policy"], r["bytes_sent"], r["rounds"]) for r in rows] == \
        [(r["policy"], r["bytes_sent"], r["rounds"]) for r in local]
    assert (tmp_path / "times.png").stat().st_size > 5000


def test_unreachable_scheduler_is_a_one_line_error(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    with socket.socket() as s:      # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-m", "pyvm.lab.cli", "sweep", "--scheduler",
                        f"tcp://127.0.0.1:{port}", "--workload", "idle:ram=1M",
                        "--out", str(tmp_path / "x.csv")],
                       capture_output=True, text=True, timeout=120, cwd=root)
    assert r.returncode == 1
    assert r.stderr.startswith("pyvm-lab: sweep: cannot reach the Dask scheduler")
    assert "Traceback" not in r.stderr
