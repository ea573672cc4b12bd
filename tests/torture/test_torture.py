"""The adversarial suite at the small sizes of ``make test`` (``make torture`` runs it full).

Each part is the same code as the full run (tests/torture/suite.py); only the counts
differ.  Marker ``torture``: ``pytest -m "not torture"`` leaves them out.
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


def test_r3_faults_on_every_transport(tmp_path: Path) -> None:
    figures = suite.r3_faults(tmp_path, quick=True)
    assert figures["passed"] == figures["scenarios"] == 4


def test_r4_ping_pong(tmp_path: Path) -> None:
    figures = suite.r4_pingpong(tmp_path, suite.QUICK["r4_hops"], check_every=1)
    assert figures["memcheck"]["migrations"] == figures["ab"]["migrations"] == 2


def test_r5_private_files_and_tls_refusal(tmp_path: Path) -> None:
    figures = suite.r5_private_and_tls(tmp_path)
    assert figures["tls_clients_refused"] == 2
