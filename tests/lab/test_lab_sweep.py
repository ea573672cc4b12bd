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
