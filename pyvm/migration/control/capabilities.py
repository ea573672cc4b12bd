"""Migration capabilities: ``migrate-set-capabilities`` and ``query-migrate-capabilities``.

The capability list is QEMU 8.2's ``MigrationCapability`` enum (qapi/migration.json), in
enum order, with 9.0's ``mapped-ram`` after ``dirty-limit``; every capability starts off.  :class:`MigrationCapabilities` holds one VM's switches and
applies a ``migrate-set-capabilities`` request the way QEMU does (migration/options.c
``qmp_migrate_set_capabilities`` and ``migrate_caps_check``): the request is merged into a
copy, the whole new set is checked, and only then committed -- all or nothing.

The build decides which capabilities it implements (``implemented``); switching on one
that pyvm does not implement fails with a text naming it.  QEMU's own compatibility
checks run first, so a combination QEMU refuses gets QEMU's words.

Errors are :class:`CapabilityError`, a :class:`~pyvm.migration.errors.MigrationError`
whose ``str()`` is the QMP ``GenericError`` description.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Iterable

from pyvm.migration.stream import constants as stream_constants
from pyvm.migration.errors import MigrationError


class CapabilityError(MigrationError):
    """A ``migrate-set-capabilities`` request was refused; nothing was changed."""


class MigrationCapability(str, Enum):
    """QEMU 8.2 ``MigrationCapability``, in enum order (the "since" version in comments)."""

    XBZRLE = "xbzrle"                                    # 1.2
    RDMA_PIN_ALL = "rdma-pin-all"                        # 2.0
    AUTO_CONVERGE = "auto-converge"                      # 1.6
    ZERO_BLOCKS = "zero-blocks"                          # 1.6
    COMPRESS = "compress"                                # 2.4, deprecated in 8.2
    EVENTS = "events"                                    # 2.4
    POSTCOPY_RAM = "postcopy-ram"                        # 2.6
    X_COLO = "x-colo"                                    # 2.8, unstable
    RELEASE_RAM = "release-ram"                          # 2.9
    BLOCK = "block"                                      # 2.10, deprecated in 8.2
    RETURN_PATH = "return-path"                          # 2.10
    PAUSE_BEFORE_SWITCHOVER = "pause-before-switchover"  # 2.11
    MULTIFD = "multifd"                                  # 4.0
    DIRTY_BITMAPS = "dirty-bitmaps"                      # 2.12
    POSTCOPY_BLOCKTIME = "postcopy-blocktime"            # 3.0
    LATE_BLOCK_ACTIVATE = "late-block-activate"          # 3.0
    X_IGNORE_SHARED = "x-ignore-shared"                  # 4.0, unstable
    VALIDATE_UUID = "validate-uuid"                      # 4.2
    BACKGROUND_SNAPSHOT = "background-snapshot"          # 6.0
    ZERO_COPY_SEND = "zero-copy-send"                    # 7.1
    POSTCOPY_PREEMPT = "postcopy-preempt"                # 7.1
    SWITCHOVER_ACK = "switchover-ack"                    # 8.1
    DIRTY_LIMIT = "dirty-limit"                          # 8.1
    MAPPED_RAM = "mapped-ram"                            # 9.0 (after dirty-limit, as in 9.x)
    X_CHECKSUM = "x-checksum"                            # pyvm only (migration/integrity.py)


Cap = MigrationCapability
CAPABILITY_NAMES: tuple[str, ...] = tuple(c.value for c in MigrationCapability)

# Capabilities both ends must agree on: the source lists the ones that are on in the
# configuration section's "configuration/capabilities" subsection (savevm.c, 8.2).
VALIDATED_CAPABILITIES: tuple[MigrationCapability, ...] = tuple(
    Cap(name) for name in stream_constants.VALIDATED_CAPABILITIES)

# options.c migrate_caps_check: warn_report() texts when a deprecated capability is set.
DEPRECATION_WARNINGS: dict[MigrationCapability, str] = {
    Cap.BLOCK: "block migration is deprecated; use blockdev-mirror with NBD instead",
    Cap.COMPRESS: "old compression method is deprecated; use multifd compression methods instead",
}

# options.c check_caps_background_snapshot, in QEMU's list order.
BACKGROUND_SNAPSHOT_INCOMPATIBLE: tuple[MigrationCapability, ...] = (
    Cap.POSTCOPY_RAM, Cap.DIRTY_BITMAPS, Cap.POSTCOPY_BLOCKTIME, Cap.LATE_BLOCK_ACTIVATE,
    Cap.RETURN_PATH, Cap.MULTIFD, Cap.PAUSE_BEFORE_SWITCHOVER, Cap.AUTO_CONVERGE,
    Cap.RELEASE_RAM, Cap.RDMA_PIN_ALL, Cap.COMPRESS, Cap.XBZRLE, Cap.X_COLO,
    Cap.VALIDATE_UUID, Cap.ZERO_COPY_SEND,
)


def not_supported_text(name: str) -> str:
    """The refusal for a capability this build does not implement."""
    return f"Capability '{name}' is not supported by pyvm"


@dataclass(frozen=True)
class CapabilityContext:
    """Facts outside the capability set that QEMU's checks consult.

    ``incoming_started``: an incoming migration has begun listening or loading (QEMU's
    ``migrate_incoming_started()``).  ``multifd_compression`` and ``tls`` come from the
    migration parameters (``tls`` means ``tls-creds`` is not empty).
    """

    incoming_started: bool = False
    multifd_compression: str = "none"
    tls: bool = False


def _lookup(name: str) -> MigrationCapability:
    try:
        return Cap(name)
    except ValueError:
        # the input visitor's text for a bad enum value (bare member name)
        raise CapabilityError(f"Parameter 'capability' does not accept value '{name}'") from None


def check_compatibility(new: dict[MigrationCapability, bool],
                        ctx: CapabilityContext = CapabilityContext()) -> list[str]:
    """QEMU 8.2's ``migrate_caps_check`` on a complete new set; returns its warnings.

    Raises :class:`CapabilityError` with the first failing check's text, in QEMU's order.
    QEMU refuses ``dirty-limit`` unless KVM runs with a dirty ring ("dirty-limit requires
    KVM with accelerator property 'dirty-ring-size' set"): its per-vCPU rates come from
    that ring.  pyvm measures dirty pages with its own dirty log on every guest
    (pyvm.dirty_meter, pyvm.dirty_limit), so it drops that refusal and keeps QEMU's
    conflict with ``auto-converge``.  The host probes for postcopy and
    background-snapshot are left to the implemented-set check.
    """
    warnings = [text for cap, text in DEPRECATION_WARNINGS.items() if new[cap]]
    if new[Cap.POSTCOPY_RAM]:
        if new[Cap.X_IGNORE_SHARED]:
            raise CapabilityError("Postcopy is not compatible with ignore-shared")
        if new[Cap.MULTIFD]:
            raise CapabilityError("Postcopy is not yet compatible with multifd")
    if new[Cap.BACKGROUND_SNAPSHOT]:
        for cap in BACKGROUND_SNAPSHOT_INCOMPATIBLE:
            if new[cap]:
                raise CapabilityError(f"Background-snapshot is not compatible with {cap.value}")
    if new[Cap.ZERO_COPY_SEND] and (not new[Cap.MULTIFD] or new[Cap.COMPRESS] or new[Cap.XBZRLE]
                                    or ctx.multifd_compression != "none" or ctx.tls):
        raise CapabilityError(
            "Zero copy only available for non-compressed non-TLS multifd migration")
    if new[Cap.POSTCOPY_PREEMPT]:
        if not new[Cap.POSTCOPY_RAM]:
            raise CapabilityError("Postcopy preempt requires postcopy-ram")
        if new[Cap.COMPRESS]:
            raise CapabilityError("Postcopy preempt not compatible with compress")
        if ctx.incoming_started:
            raise CapabilityError("Postcopy preempt must be set before incoming starts")
    if new[Cap.MULTIFD]:
        if new[Cap.COMPRESS]:
            raise CapabilityError("Multifd is not compatible with compress")
        if ctx.incoming_started:
            raise CapabilityError("Multifd must be set before incoming starts")
    if new[Cap.SWITCHOVER_ACK] and not new[Cap.RETURN_PATH]:
        raise CapabilityError("Capability 'switchover-ack' requires capability 'return-path'")
    if new[Cap.DIRTY_LIMIT] and new[Cap.AUTO_CONVERGE]:
        # sic: QEMU's wording
        raise CapabilityError(
            "dirty-limit conflicts with auto-converge either of then available currently")
    if new[Cap.MULTIFD] and new[Cap.XBZRLE]:
        raise CapabilityError("Multifd is not compatible with xbzrle")
    if new[Cap.COMPRESS] and new[Cap.XBZRLE]:
        raise CapabilityError("Compression is not compatible with xbzrle")
    if new[Cap.MAPPED_RAM]:
        # QEMU 9.0 options.c migrate_caps_check
        if new[Cap.XBZRLE]:
            raise CapabilityError("Mapped-ram migration is incompatible with xbzrle")
        if new[Cap.COMPRESS]:
            raise CapabilityError("Mapped-ram migration is incompatible with compression")
        if new[Cap.POSTCOPY_RAM]:
            raise CapabilityError("Mapped-ram migration is incompatible with postcopy")
    return warnings


class MigrationCapabilities:
    """One VM's migration capabilities, all off at start.

    ``implemented`` names the capabilities this build supports; any other can be set to
    false (a no-op) but not to true.
    """

    def __init__(self, implemented: Iterable[str] = ()) -> None:
        self.implemented: frozenset[MigrationCapability] = frozenset(
            _lookup(name) for name in implemented)
        self._state: dict[MigrationCapability, bool] = {cap: False for cap in Cap}

    def __getitem__(self, cap: str | MigrationCapability) -> bool:
        return self._state[_lookup(cap)]

    def enabled(self) -> list[MigrationCapability]:
        """The capabilities that are on, in enum order."""
        return [cap for cap in Cap if self._state[cap]]

    def validated(self) -> list[str]:
        """Names of the capabilities that are on and travel in the configuration section."""
        return [cap.value for cap in VALIDATED_CAPABILITIES if self._state[cap]]

    def set_many(self, changes: Iterable[tuple[str, bool]],
                 context: CapabilityContext = CapabilityContext()) -> list[str]:
        """Apply ``migrate-set-capabilities``: all of ``changes`` or none of them.

        A later entry for the same capability overrides an earlier one, as in QEMU.
        Returns QEMU's deprecation warnings for the new set (to print on stderr); raises
        :class:`CapabilityError` and changes nothing when the new set is refused.
        """
        requested = [(_lookup(name), bool(state)) for name, state in changes]
        new = dict(self._state)
        for cap, state in requested:
            new[cap] = state
        warnings = check_compatibility(new, context)
        for cap, _ in requested:
            if new[cap] and not self._state[cap] and cap not in self.implemented:
                raise CapabilityError(not_supported_text(cap.value))
        self._state = new
        return warnings

    def query(self) -> list[dict[str, Any]]:
        """``query-migrate-capabilities``: every capability in enum order."""
        return [{"capability": cap.value, "state": self._state[cap]} for cap in Cap]
