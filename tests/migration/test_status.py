"""query-migrate: status enum, statistics and the members QEMU presents per status."""

from __future__ import annotations

from dataclasses import fields

import pytest

from pyvm.migration.control.qmp_schema import MIGRATION_INFO, MIGRATION_STATS, MIGRATION_STATUS
from pyvm.migration.control.status import (RUNNING_STATES, CompressionStats, DestinationSnapshot,
                                   MigrationStats, MigrationStatus, SourceSnapshot,
                                   XbzrleCacheStats, build_migration_info)
from pyvm.qmp.visitor import conform

St = MigrationStatus

# QEMU 8.2 qapi/migration.json MigrationStatus, enum order.
QEMU_82_STATUSES = ["none", "setup", "cancelling", "cancelled", "active", "postcopy-active",
                    "postcopy-paused", "postcopy-recover", "completed", "failed", "colo",
                    "pre-switchover", "device", "wait-unplug"]
# The ram keys observed on QEMU 7.2 (all of QEMU 8.2 qapi/migration.json MigrationStats).
OBSERVED_RAM_KEYS = {
    "total", "postcopy-requests", "dirty-sync-count", "multifd-bytes", "pages-per-second",
    "downtime-bytes", "page-size", "remaining", "postcopy-bytes", "mbps", "transferred",
    "dirty-sync-missed-zero-copy", "precopy-bytes", "duplicate", "dirty-pages-rate", "skipped",
    "normal-bytes", "normal"}
LISTENING = {"port": "47811", "ipv4": True, "host": "127.0.0.1", "type": "inet"}


def busy_ram() -> MigrationStats:
    return MigrationStats(transferred=10 << 20, remaining=3 << 20, total=64 << 20,
                          duplicate=12000, normal=2500, normal_bytes=2500 * 4096,
                          dirty_pages_rate=77, mbps=8.54064, dirty_sync_count=3,
                          pages_per_second=1000, precopy_bytes=10 << 20)


def source(status: St, **kw) -> SourceSnapshot:
    return SourceSnapshot(status=status, ram=busy_ram(), setup_time=5, total_time=1200,
                          expected_downtime=300, downtime=42, **kw)


def test_status_enum_order() -> None:
    assert [s.value for s in MigrationStatus] == QEMU_82_STATUSES
    assert list(MIGRATION_STATUS.values) == QEMU_82_STATUSES
    assert St.SETUP in RUNNING_STATES and St.CANCELLING in RUNNING_STATES
    assert St.COMPLETED not in RUNNING_STATES and St.FAILED not in RUNNING_STATES


def test_stats_members() -> None:
    qapi = MigrationStats().to_qapi()
    assert set(qapi) == OBSERVED_RAM_KEYS
    assert list(qapi) == [m.name for m in MIGRATION_STATS.members]
    assert len(fields(MigrationStats)) == 18
    assert qapi["page-size"] == 4096 and qapi["skipped"] == 0 and isinstance(qapi["mbps"], float)
    assert set(XbzrleCacheStats().to_qapi()) == {
        "cache-size", "bytes", "pages", "cache-miss", "cache-miss-rate", "encoding-rate",
        "overflow"}
    assert set(CompressionStats().to_qapi()) == {
        "pages", "busy", "busy-rate", "compressed-size", "compression-rate"}


def test_before_any_migration() -> None:
    assert build_migration_info() == {}
    assert build_migration_info(SourceSnapshot(), DestinationSnapshot()) == {}
    assert build_migration_info(SourceSnapshot(), blocked_reasons=["no migration here"]) == {
        "blocked-reasons": ["no migration here"]}
    # an error of an earlier state is not shown while the status is none
    assert build_migration_info(SourceSnapshot(error_desc="old")) == {}


@pytest.mark.parametrize("status, keys", [
    (St.SETUP, {"status"}),
    (St.ACTIVE, {"expected-downtime", "status", "setup-time", "total-time", "ram"}),
    (St.CANCELLING, {"expected-downtime", "status", "setup-time", "total-time", "ram"}),
    (St.PRE_SWITCHOVER, {"expected-downtime", "status", "setup-time", "total-time", "ram"}),
    (St.DEVICE, {"expected-downtime", "status", "setup-time", "total-time", "ram"}),
    (St.POSTCOPY_ACTIVE, {"downtime", "status", "setup-time", "total-time", "ram"}),
    (St.POSTCOPY_PAUSED, {"downtime", "status", "setup-time", "total-time", "ram"}),
    (St.POSTCOPY_RECOVER, {"downtime", "status", "setup-time", "total-time", "ram"}),
    (St.COMPLETED, {"status", "setup-time", "downtime", "total-time", "ram"}),
    (St.FAILED, {"status"}),
    (St.CANCELLED, {"status"}),
    (St.COLO, {"status"}),
    (St.WAIT_UNPLUG, {"status"}),
])
def test_source_members_per_status(status: St, keys: set[str]) -> None:
    info = build_migration_info(source(status))
    assert set(info) == keys
    assert info["status"] == status.value
    if "ram" in info:
        assert set(info["ram"]) == OBSERVED_RAM_KEYS


def test_active_values() -> None:
    info = build_migration_info(source(St.ACTIVE))
    assert (info["setup-time"], info["total-time"], info["expected-downtime"]) == (5, 1200, 300)
    assert info["ram"] == busy_ram().to_qapi()


def test_completed_zeroes_remaining_and_dirty_rate() -> None:
    info = build_migration_info(source(St.COMPLETED))
    assert info["downtime"] == 42
    assert info["ram"]["remaining"] == 0 and info["ram"]["dirty-pages-rate"] == 0
    assert info["ram"]["transferred"] == 10 << 20


def test_error_desc() -> None:
    failed = build_migration_info(source(
        St.FAILED, error_desc="Failed to connect to '127.0.0.1:1': Connection refused"))
    assert failed == {"status": "failed",
                      "error-desc": "Failed to connect to '127.0.0.1:1': Connection refused"}
    assert build_migration_info(source(St.CANCELLED)) == {"status": "cancelled"}
    # 8.2 shows a recorded error whatever the status
    assert build_migration_info(source(St.ACTIVE, error_desc="e"))["error-desc"] == "e"


def test_optional_statistics_follow_ram() -> None:
    extra = dict(xbzrle_cache=XbzrleCacheStats(cache_size=64 << 20),
                 compression=CompressionStats(pages=3), cpu_throttle_percentage=20)
    for status in (St.ACTIVE, St.COMPLETED):
        info = build_migration_info(source(status, **extra))
        assert info["xbzrle-cache"]["cache-size"] == 64 << 20
        assert info["compression"]["pages"] == 3
        assert info["cpu-throttle-percentage"] == 20
    for status in (St.SETUP, St.FAILED, St.CANCELLED):
        assert set(build_migration_info(source(status, **extra))) == {"status"}


def test_blocked_reasons_with_a_status() -> None:
    info = build_migration_info(source(St.FAILED), blocked_reasons=["a", "b"])
    assert info == {"status": "failed", "blocked-reasons": ["a", "b"]}


def test_destination() -> None:
    listening = DestinationSnapshot(St.NONE, [LISTENING])
    assert build_migration_info(SourceSnapshot(), listening) == {"socket-address": [LISTENING]}
    active = DestinationSnapshot(St.ACTIVE, [LISTENING])
    assert build_migration_info(SourceSnapshot(), active) == {
        "status": "active", "socket-address": [LISTENING]}
    done = DestinationSnapshot(St.COMPLETED)
    assert build_migration_info(SourceSnapshot(), done) == {"status": "completed"}
    failed = DestinationSnapshot(St.FAILED)
    assert build_migration_info(None, failed) == {"status": "failed"}
    kept_up = DestinationSnapshot(St.FAILED, error_desc="Unknown savevm section type 9")
    assert build_migration_info(None, kept_up) == {
        "status": "failed", "error-desc": "Unknown savevm section type 9"}


def test_outgoing_status_overrides_incoming() -> None:
    # a VM that was a destination and now migrates on: the source view wins
    info = build_migration_info(source(St.SETUP), DestinationSnapshot(St.COMPLETED))
    assert info == {"status": "setup"}


def test_reply_conforms_to_the_schema() -> None:
    extra = dict(xbzrle_cache=XbzrleCacheStats(), compression=CompressionStats(),
                 cpu_throttle_percentage=10, error_desc="x")
    info = build_migration_info(source(St.ACTIVE, **extra), DestinationSnapshot(
        St.NONE, [LISTENING]), blocked_reasons=["r"])
    schema_order = [m.name for m in MIGRATION_INFO.members]
    assert list(info) == [name for name in schema_order if name in info]
    assert conform(MIGRATION_INFO, info) == info
    assert set(info) <= set(schema_order)
