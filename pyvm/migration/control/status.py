"""``query-migrate``: migration status, statistics and the ``MigrationInfo`` object.

:class:`MigrationStatus` is QEMU 8.2's enum, :class:`MigrationStats` its statistics
struct.  :func:`build_migration_info` assembles the ``query-migrate`` reply from a
snapshot of each side, presenting exactly the members QEMU presents
(migration/migration.c ``fill_destination_migration_info`` then
``fill_source_migration_info``):

================================  ==========================================================
source status                     members
================================  ==========================================================
``none``                          nothing of the source (the destination's view stays)
``setup``                         ``status``
``active``, ``cancelling``,       ``status``, ``setup-time``, ``total-time``,
``pre-switchover``, ``device``,   ``expected-downtime`` (``downtime`` in postcopy), ``ram``
postcopy states
``completed``                     ``status``, ``setup-time``, ``total-time``, ``downtime``,
                                  ``ram`` (``remaining`` and ``dirty-pages-rate`` are 0)
``failed``, ``cancelled``,        ``status``
``colo``, ``wait-unplug``
================================  ==========================================================

Whenever ``ram`` is shown, ``xbzrle-cache`` and ``compression`` come along while those
capabilities are on, and ``cpu-throttle-percentage`` while auto-converge throttles.
``error-desc`` is shown in any source state but ``none`` once an error was recorded;
``blocked-reasons`` whenever a blocker exists.  The destination adds ``socket-address``
while it listens on a socket, ``status`` in any state but ``none``, and the load error
(QEMU 9.1 with ``exit-on-error: false``); a source status other than ``none`` wins.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from enum import Enum
from typing import Any, Sequence

from pyvm.migration.stream.constants import TARGET_PAGE_SIZE


class MigrationStatus(str, Enum):
    """QEMU 8.2 ``MigrationStatus``, in enum order."""

    NONE = "none"
    SETUP = "setup"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    ACTIVE = "active"
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER = "postcopy-recover"
    COMPLETED = "completed"
    FAILED = "failed"
    COLO = "colo"
    PRE_SWITCHOVER = "pre-switchover"
    DEVICE = "device"
    WAIT_UNPLUG = "wait-unplug"


St = MigrationStatus

# migration.c fill_source_migration_info: states that show times and RAM statistics.
_STATES_WITH_STATS = frozenset({St.ACTIVE, St.CANCELLING, St.POSTCOPY_ACTIVE, St.PRE_SWITCHOVER,
                             St.DEVICE, St.POSTCOPY_PAUSED, St.POSTCOPY_RECOVER})
# migration.c migration_in_postcopy: these show "downtime" instead of "expected-downtime".
POSTCOPY_STATES = frozenset({St.POSTCOPY_ACTIVE, St.POSTCOPY_PAUSED, St.POSTCOPY_RECOVER})
# migration.c migration_is_running: a new migrate or capability change is refused.
RUNNING_STATES = frozenset({St.ACTIVE, St.POSTCOPY_ACTIVE, St.POSTCOPY_PAUSED,
                            St.POSTCOPY_RECOVER, St.SETUP, St.PRE_SWITCHOVER, St.DEVICE,
                            St.WAIT_UNPLUG, St.CANCELLING})


def _qapi(obj: Any) -> dict[str, Any]:
    """A stats dataclass as its QAPI object: members in declaration order, hyphenated."""
    return {f.name.replace("_", "-"): getattr(obj, f.name) for f in fields(obj)}


@dataclass
class MigrationStats:
    """QAPI ``MigrationStats`` (8.2): every member is present in ``ram``.

    Byte counts and page counts are integers; ``mbps`` is a number.  ``normal_bytes`` is
    ``normal * page_size`` and ``skipped`` is always 0 in QEMU; the producer keeps them so.
    """

    transferred: int = 0
    remaining: int = 0
    total: int = 0                 # excludes RAM blocks skipped by x-ignore-shared
    duplicate: int = 0             # zero pages
    skipped: int = 0               # deprecated, always 0
    normal: int = 0                # pages sent in full
    normal_bytes: int = 0
    dirty_pages_rate: int = 0      # pages/s
    mbps: float = 0.0
    dirty_sync_count: int = 0
    postcopy_requests: int = 0
    page_size: int = TARGET_PAGE_SIZE
    multifd_bytes: int = 0
    pages_per_second: int = 0
    precopy_bytes: int = 0
    downtime_bytes: int = 0
    postcopy_bytes: int = 0
    dirty_sync_missed_zero_copy: int = 0

    def to_qapi(self) -> dict[str, Any]:
        return _qapi(self)


@dataclass
class XbzrleCacheStats:
    """QAPI ``XBZRLECacheStats``: shown while the ``xbzrle`` capability is on."""

    cache_size: int = 0
    bytes: int = 0
    pages: int = 0
    cache_miss: int = 0
    cache_miss_rate: float = 0.0
    encoding_rate: float = 0.0
    overflow: int = 0

    def to_qapi(self) -> dict[str, Any]:
        return _qapi(self)


@dataclass
class CompressionStats:
    """QAPI ``CompressionStats`` (deprecated): shown while ``compress`` is on."""

    pages: int = 0
    busy: int = 0
    busy_rate: float = 0.0
    compressed_size: int = 0
    compression_rate: float = 0.0

    def to_qapi(self) -> dict[str, Any]:
        return _qapi(self)


@dataclass
class SourceSnapshot:
    """The outgoing side at the moment of the query.

    Times are milliseconds: ``total_time`` is the time so far while running and the final
    figure once completed; ``downtime`` is the measured downtime (completed or postcopy),
    ``expected_downtime`` the estimate while precopy runs.  The optional statistics are
    ``None`` when QEMU would not show them (capability off, not throttling).
    """

    status: MigrationStatus = St.NONE
    ram: MigrationStats = field(default_factory=MigrationStats)
    setup_time: int = 0
    total_time: int = 0
    expected_downtime: int = 0
    downtime: int = 0
    error_desc: str | None = None
    cpu_throttle_percentage: int | None = None
    xbzrle_cache: XbzrleCacheStats | None = None
    compression: CompressionStats | None = None


@dataclass
class DestinationSnapshot:
    """The incoming side: its status, the listener's ``socket-address`` entries and the
    load error (shown as ``error-desc`` when a failed load left the VM up: QEMU 9.1's
    ``exit-on-error: false``, which pyvm offers at the 8.2 level)."""

    status: MigrationStatus = St.NONE
    socket_addresses: list[dict[str, Any]] = field(default_factory=list)
    error_desc: str | None = None
    #: ``postcopy-blocktime`` and ``postcopy-vcpu-blocktime`` (ms) when the capability
    #: was on for a postcopy load; shown once it completed (migration.c
    #: fill_destination_migration_info -> fill_destination_postcopy_migration_info)
    postcopy_blocktime: int | None = None
    postcopy_vcpu_blocktime: list[int] | None = None


def build_migration_info(source: SourceSnapshot | None = None,
                         destination: DestinationSnapshot | None = None,
                         blocked_reasons: Sequence[str] = ()) -> dict[str, Any]:
    """The ``query-migrate`` reply (``MigrationInfo``), members in schema order.

    ``blocked_reasons`` are the texts of the blockers that apply to the current mode, in
    the order they should be listed.
    """
    members: dict[str, Any] = {}
    if destination is not None:
        if destination.socket_addresses:
            members["socket-address"] = [dict(a) for a in destination.socket_addresses]
        if St(destination.status) is not St.NONE:
            members["status"] = St(destination.status).value
            if destination.error_desc is not None:
                members["error-desc"] = destination.error_desc
            if St(destination.status) is St.COMPLETED and destination.postcopy_blocktime is not None:
                members["postcopy-blocktime"] = destination.postcopy_blocktime
                members["postcopy-vcpu-blocktime"] = list(destination.postcopy_vcpu_blocktime or [])
    if blocked_reasons:
        members["blocked-reasons"] = list(blocked_reasons)
    if source is not None and St(source.status) is not St.NONE:
        members.update(_source_members(source))
    return {name: members[name] for name in _INFO_ORDER if name in members}


def _source_members(src: SourceSnapshot) -> dict[str, Any]:
    state = St(src.status)
    out: dict[str, Any] = {"status": state.value}
    if state in _STATES_WITH_STATS or state is St.COMPLETED:
        out["setup-time"] = src.setup_time
        out["total-time"] = src.total_time
        if state is St.COMPLETED or state in POSTCOPY_STATES:
            out["downtime"] = src.downtime
        else:
            out["expected-downtime"] = src.expected_downtime
        ram = src.ram
        if state is St.COMPLETED:
            ram = replace(ram, remaining=0, dirty_pages_rate=0)
        out["ram"] = ram.to_qapi()
        if src.xbzrle_cache is not None:
            out["xbzrle-cache"] = src.xbzrle_cache.to_qapi()
        if src.compression is not None:
            out["compression"] = src.compression.to_qapi()
        if src.cpu_throttle_percentage is not None:
            out["cpu-throttle-percentage"] = src.cpu_throttle_percentage
    if src.error_desc is not None:
        out["error-desc"] = src.error_desc
    return out


# qapi/migration.json MigrationInfo at 8.2, declaration order (disk, vfio and
# dirty-limit members never apply to pyvm).
_INFO_ORDER = (
    "status", "ram", "disk", "vfio", "xbzrle-cache", "total-time", "expected-downtime",
    "downtime", "setup-time", "cpu-throttle-percentage", "error-desc", "blocked-reasons",
    "postcopy-blocktime", "postcopy-vcpu-blocktime", "compression", "socket-address",
    "dirty-limit-throttle-time-per-round", "dirty-limit-ring-full-time",
)
