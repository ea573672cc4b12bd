"""The adversarial suite at the small sizes of ``make test`` (``make torture`` runs it full).

Each part is the same code as the full run (tests/torture/suite.py); only the counts
differ.  Marker ``torture``: ``pytest -m "not torture"`` leaves them out.  R3's faults and
R5's files and TLS refusals have their make-test counterparts in tests/e2e/test_hardening.py
and tests/e2e/test_migration_tls.py, so that this subset stays within two minutes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.torture import suite

pytestmark = [pytest.mark.torture, pytest.mark.slow]


def test_r1_mutated_streams(tmp_path: Path) -> None:
    figures = suite.r1_streams(tmp_path, suite.QUICK["r1_in_process"], suite.QUICK["r1_processes"] // 2)
    on = figures["in_process_checksum_on"]
    assert on["mutations"] > 0 and on["refused"] == on["mutations"]


def test_r2_hostile_monitor_clients(tmp_path: Path) -> None:
    figures = suite.r2_monitor(tmp_path, suite.QUICK["r2_messages"])
    assert figures["messages"] >= suite.QUICK["r2_messages"] - 4


def test_r4_ping_pong(tmp_path: Path) -> None:
    figures = suite.r4_pingpong(tmp_path, suite.QUICK["r4_hops"], check_every=1)
    assert figures["memcheck"]["migrations"] == figures["ab"]["migrations"] == 2
