"""The postcopy blocktime accounting (QEMU's migration/postcopy-ram.c rules), by hand."""

from __future__ import annotations

from pyvm.migration.control.postcopy_blocktime import BlocktimeContext, format_uint32_list
from pyvm.migration.control.status import DestinationSnapshot, MigrationStatus, build_migration_info

A, B = 0x1000, 0x2000


def test_one_vcpu_per_thread_total_counts_only_when_all_are_down() -> None:
    ctx = BlocktimeContext(2)
    ctx.begin(0, A, 10.0, already_received=False)
    ctx.end(A, 15.0)                     # cpu1 ran meanwhile: no total
    assert (ctx.vcpu_ms, ctx.total_ms) == ([5, 0], 0)
    ctx.begin(0, A, 20.0, False)
    ctx.begin(1, B, 22.0, False)         # both down from 22 (last_begin)
    ctx.end(B, 30.0)                     # cpu1: 8; total 30 - 22
    ctx.end(A, 31.0)                     # cpu0: 11; cpu1 runs: no total
    assert ctx.vcpu_ms == [5 + 11, 8]
    assert ctx.total_ms == 8


def test_one_page_wakes_every_vcpu_waiting_on_it() -> None:
    ctx = BlocktimeContext(2)
    ctx.begin(0, A, 1.0, False)
    ctx.begin(1, A, 3.0, False)
    ctx.end(A, 7.0)
    assert ctx.vcpu_ms == [6, 4] and ctx.total_ms == 4


def test_a_page_already_received_is_no_wait() -> None:
    ctx = BlocktimeContext(1)
    ctx.begin(0, A, 1.0, already_received=True)
    ctx.end(A, 9.0)
    assert ctx.vcpu_ms == [0] and ctx.total_ms == 0


def test_faults_of_no_vcpu_and_pages_nobody_waits_for_are_ignored() -> None:
    ctx = BlocktimeContext(1)
    ctx.begin(-1, A, 1.0, False)
    ctx.end(B, 2.0)
    ctx.end(A, 3.0)
    assert ctx.vcpu_ms == [0] and ctx.total_ms == 0


def test_shared_loop_thread_any_fault_stops_the_guest() -> None:
    """pyvm: all vCPUs on one thread (threads=1): one vCPU down is the whole guest down."""
    ctx = BlocktimeContext(2, threads=1)
    ctx.begin(1, A, 2.0, False)
    ctx.end(A, 6.5)
    assert ctx.vcpu_ms == [0, 4] and ctx.total_ms == 4


def test_hmp_list_format_is_the_string_output_visitor() -> None:
    assert format_uint32_list([120]) == "120"
    assert format_uint32_list([120, 80]) == "80,120"
    assert format_uint32_list([0, 0]) == "0"
    assert format_uint32_list([3, 1, 2, 7]) == "1-3,7"


def test_query_migrate_shows_blocktime_only_when_completed() -> None:
    snap = DestinationSnapshot(MigrationStatus.POSTCOPY_ACTIVE, postcopy_blocktime=5,
                               postcopy_vcpu_blocktime=[5])
    assert "postcopy-blocktime" not in build_migration_info(None, snap)
    snap.status = MigrationStatus.COMPLETED
    info = build_migration_info(None, snap)
    assert info["postcopy-blocktime"] == 5 and info["postcopy-vcpu-blocktime"] == [5]
    assert list(info) == ["status", "postcopy-blocktime", "postcopy-vcpu-blocktime"]
    assert "postcopy-blocktime" not in build_migration_info(
        None, DestinationSnapshot(MigrationStatus.COMPLETED))
