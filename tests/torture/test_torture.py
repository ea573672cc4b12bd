"""The adversarial suite at the small sizes of ``make test`` (``make torture`` runs it full).

Each part is the same code as the full run (tests/torture/suite.py); only the counts
differ (R2 runs twice: plain, and over a TLS monitor with intruders).  Marker
``torture``: ``pytest -m "not torture"`` leaves them out.  R3's faults and R5's files
and TLS refusals have their make-test counterparts in tests/e2e/test_hardening.py and
tests/e2e/test_migration_tls.py, so that this subset stays within two minutes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.torture import suite

pytestmark = [pytest.mark.torture, pytest.mark.slow]


@pytest.fixture(autouse=True, scope="module")
def launcher() -> Iterator[None]:
    """The suite's VMs fork from a pre-imported pyvm here too (tests/torture/launcher.py)."""
    with suite.launched():
        yield


def test_r1_mutated_streams(tmp_path: Path) -> None:
    figures = suite.r1_streams(tmp_path, suite.QUICK["r1_in_process"], suite.QUICK["r1_processes"] // 2)
    on = figures["in_process_checksum_on"]
    assert on["mutations"] > 0 and on["refused"] == on["mutations"]


def test_r1_hypothesis_edits_of_real_streams(tmp_path: Path) -> None:
    figures = suite.r1_hypothesis(tmp_path, suite.QUICK["r1_hypothesis"])
    on = figures["checksum_on"]
    assert on["examples"] > 0 and on["refused"] == on["examples"]
    assert figures["checksum_off"]["examples"] > 0


def test_r2_hostile_monitor_clients(tmp_path: Path) -> None:
    figures = suite.r2_monitor(tmp_path, suite.QUICK["r2_messages"])
    assert figures["messages"] >= suite.QUICK["r2_messages"] - 4


def test_r2_hostile_monitor_clients_over_tls(tmp_path: Path) -> None:
    figures = suite.r2_monitor(tmp_path, suite.QUICK["r2_tls_messages"], tls=True)
    assert figures["messages"] >= suite.QUICK["r2_tls_messages"] - 4
    assert figures["intruders_dropped"] >= 6


def test_r4_ping_pong(tmp_path: Path) -> None:
    figures = suite.r4_pingpong(tmp_path, suite.QUICK["r4_hops"], check_every=1)
    assert figures["memcheck"]["migrations"] == figures["ab"]["migrations"] == 2


def test_r3_link_down_in_a_namespace_and_a_full_tmpfs(tmp_path: Path) -> None:
    from tests.torture import host_faults
    reason = host_faults.unavailable()
    if reason is not None:
        pytest.skip(reason)
    host = {"link down inside a network namespace/tcp, then cancel", "disk full (4 MiB tmpfs)/file"}
    figures = suite.r3_faults(tmp_path, only=host)
    assert figures["passed"] == 2, figures
