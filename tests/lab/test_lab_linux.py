"""Linux workloads for the lab: Debian's kernel at its busybox shell, a workload typed on
the serial console, its dirty pages recorded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pyvm.lab.compare import load_plan
from pyvm.lab.errors import WorkloadError
from pyvm.lab.linux_workloads import is_linux_workload, parse_workload
from pyvm.lab.record import record_linux
from tests.linux import linux_files


def test_workload_specs_parse_and_refuse() -> None:
    wl = parse_workload("dd-tmpfs:mb=4")
    assert (wl.name, wl.param) == ("dd-tmpfs", 4)
    assert parse_workload("churn").param == 64
    # the marker is printed by the job, never echoed with the typed line
    for name in ("memloop", "dd-tmpfs", "churn", "idle"):
        w = parse_workload(name)
        assert w.marker not in w.command and "$W" in w.command
    assert is_linux_workload("memloop:mb=2") and not is_linux_workload("zipf:rate=10")
    with pytest.raises(WorkloadError, match="known: memloop, dd-tmpfs, churn, idle"):
        parse_workload("compile")
    with pytest.raises(WorkloadError, match="takes files=N"):
        parse_workload("churn:mb=4")
    with pytest.raises(WorkloadError, match="from 1 to 4096"):
        parse_workload("memloop:mb=0")


def test_compare_plan_takes_a_linux_scenario(tmp_path: Path) -> None:
    plan = tmp_path / "plan.toml"
    plan.write_text('policies = ["qemu"]\n[[scenario]]\nname = "dd"\nworkload = "dd-tmpfs:mb=4"\n'
                    '[[scenario]]\nname = "hc"\nappend = "pattern=1"\n')
    linux, dirty = load_plan(str(plan)).scenarios
    assert (linux.workload, linux.ram, linux.kernel) == ("dd-tmpfs:mb=4", "256M", "linux")
    assert (dirty.workload, dirty.ram) == ("", "64M") and dirty.kernel.endswith("dirty.elf")
    plan.write_text('[[scenario]]\nname = "x"\nworkload = "make"\n')
    with pytest.raises(WorkloadError, match="unknown Linux workload 'make'"):
        load_plan(str(plan))


@pytest.mark.slow
@pytest.mark.linux
def test_linux_workloads_record_plausible_distinct_traces() -> None:
    """One boot, two workloads recorded in turn: each trace writes pages, within RAM, at
    a rate and over a set of pages of its own."""
    linux_files()                       # skips when apt cannot fetch the guest
    memloop, churn = record_linux(["memloop:mb=4", "churn:files=16"], 128 << 20, 0.05, 1.0,
                                  warmup=0.3)
    sets = []
    for tr, name in ((memloop, "memloop:mb=4"), (churn, "churn:files=16")):
        assert tr.guest == "linux" and tr.append == name and tr.notes["workload"] == name
        assert tr.samples == 20 and tr.npages == 32768 and "guest_exited" not in tr.notes
        masks = np.stack([tr.mask(i) for i in range(tr.samples)])
        per_sample = masks.sum(axis=1)
        assert np.count_nonzero(per_sample) >= tr.samples // 2, per_sample
        ever = masks.any(axis=0)
        assert 0 < ever.sum() < tr.npages // 2, ever.sum()
        sets.append(ever)
    # memloop rewrites its 4 MiB buffer (1024 pages) several times a second
    assert sets[0].sum() >= 1024 * 0.9, sets[0].sum()
    # the two workloads write different pages (Jaccard well below 1), churn fewer of them
    # (a few 64 KiB files a second where memloop rewrites 4 MiB)
    jaccard = (sets[0] & sets[1]).sum() / (sets[0] | sets[1]).sum()
    assert jaccard < 0.7, jaccard
    assert sets[0].sum() > 1.5 * sets[1].sum(), (sets[0].sum(), sets[1].sum())
