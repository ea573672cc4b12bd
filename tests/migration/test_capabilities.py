"""Migration capabilities: QEMU 8.2's list, defaults, compatibility checks and texts."""

from __future__ import annotations

import pytest

from pyvm.migration.stream import constants as stream_constants
from pyvm.migration.control.capabilities import (BACKGROUND_SNAPSHOT_INCOMPATIBLE, CAPABILITY_NAMES,
                                         MigrationCapabilities, CapabilityContext, CapabilityError,
                                         MigrationCapability, VALIDATED_CAPABILITIES)
from pyvm.migration.errors import MigrationError

# QEMU 8.2 qapi/migration.json MigrationCapability, enum order.
QEMU_82_CAPABILITIES = [
    "xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "compress", "events",
    "postcopy-ram", "x-colo", "release-ram", "block", "return-path",
    "pause-before-switchover", "multifd", "dirty-bitmaps", "postcopy-blocktime",
    "late-block-activate", "x-ignore-shared", "validate-uuid", "background-snapshot",
    "zero-copy-send", "postcopy-preempt", "switchover-ack", "dirty-limit",
]
# QEMU 9.0 appends mapped-ram.
QEMU_90_ADDITIONS = ["mapped-ram"]
# pyvm's own capabilities follow QEMU's, all x- prefixed (unstable, off by default).
PYVM_CAPABILITIES = ["x-checksum"]
ALL_CAPABILITIES = QEMU_82_CAPABILITIES + QEMU_90_ADDITIONS + PYVM_CAPABILITIES


def every() -> MigrationCapabilities:
    """A store that implements everything, to reach QEMU's own checks."""
    return MigrationCapabilities(CAPABILITY_NAMES)


def refused(caps: MigrationCapabilities, *names: str, ctx: CapabilityContext = CapabilityContext()) -> str:
    before = caps.query()
    with pytest.raises(CapabilityError) as info:
        caps.set_many([(name, True) for name in names], ctx)
    assert caps.query() == before, "a refused request must change nothing"
    assert isinstance(info.value, MigrationError)
    return str(info.value)


def test_enum_order_matches_qemu_82() -> None:
    assert [c.value for c in MigrationCapability] == ALL_CAPABILITIES
    assert list(CAPABILITY_NAMES) == ALL_CAPABILITIES
    assert list(stream_constants.MIGRATION_CAPABILITIES) == ALL_CAPABILITIES


def test_query_lists_every_capability_off_in_enum_order() -> None:
    result = MigrationCapabilities({"events"}).query()
    assert result == [{"capability": name, "state": False} for name in ALL_CAPABILITIES]


def test_set_and_query() -> None:
    caps = MigrationCapabilities({"events", "x-ignore-shared"})
    assert caps.set_many([("events", True)]) == []
    assert caps["events"] and caps[MigrationCapability.EVENTS]
    assert [e["capability"] for e in caps.query() if e["state"]] == ["events"]
    caps.set_many([("events", False), ("x-ignore-shared", True)])
    assert caps.enabled() == [MigrationCapability.X_IGNORE_SHARED]
    caps.set_many([])                                     # an empty list is accepted
    assert caps.enabled() == [MigrationCapability.X_IGNORE_SHARED]


def test_later_entry_wins() -> None:
    caps = MigrationCapabilities({"events"})
    caps.set_many([("events", True), ("events", False)])
    assert not caps["events"]
    # the final state counts: an unimplemented capability switched on then off is fine
    caps.set_many([("postcopy-ram", True), ("postcopy-ram", False)])
    assert caps.enabled() == []


def test_validated_capabilities() -> None:
    # QEMU 8.2 validates x-ignore-shared; pyvm's x-checksum changes the stream, so both
    # ends must agree on it too
    assert [c.value for c in VALIDATED_CAPABILITIES] == ["x-ignore-shared", "mapped-ram", "x-checksum"]
    caps = MigrationCapabilities({"events", "x-ignore-shared"})
    caps.set_many([("events", True)])
    assert caps.validated() == []
    caps.set_many([("x-ignore-shared", True)])
    assert caps.validated() == ["x-ignore-shared"]


def test_unimplemented_capability_is_named() -> None:
    caps = MigrationCapabilities({"events"})
    assert refused(caps, "postcopy-ram") == "Capability 'postcopy-ram' is not supported by pyvm"
    # all or nothing: the implemented one in the same request is not applied either
    assert refused(caps, "events", "auto-converge") == \
        "Capability 'auto-converge' is not supported by pyvm"
    assert not caps["events"]
    caps.set_many([("auto-converge", False)])             # switching off is always fine


def test_unknown_capability_name() -> None:
    caps = every()
    with pytest.raises(CapabilityError, match=r"^Parameter 'capability' does not accept "
                                              r"value 'foo'$"):
        caps.set_many([("foo", True)])
    with pytest.raises(CapabilityError):
        MigrationCapabilities({"no-such-thing"})


@pytest.mark.parametrize("names, text", [
    (("postcopy-ram", "x-ignore-shared"), "Postcopy is not compatible with ignore-shared"),
    (("postcopy-ram", "multifd"), "Postcopy is not yet compatible with multifd"),
    (("zero-copy-send",), "Zero copy only available for non-compressed non-TLS multifd migration"),
    (("zero-copy-send", "multifd", "xbzrle"),
     "Zero copy only available for non-compressed non-TLS multifd migration"),
    (("postcopy-preempt",), "Postcopy preempt requires postcopy-ram"),
    (("postcopy-preempt", "postcopy-ram", "compress"),
     "Postcopy preempt not compatible with compress"),
    (("multifd", "compress"), "Multifd is not compatible with compress"),
    (("switchover-ack",), "Capability 'switchover-ack' requires capability 'return-path'"),
    (("dirty-limit", "auto-converge"),
     "dirty-limit conflicts with auto-converge either of then available currently"),
    (("multifd", "xbzrle"), "Multifd is not compatible with xbzrle"),
    (("compress", "xbzrle"), "Compression is not compatible with xbzrle"),
])
def test_compatibility_texts(names: tuple[str, ...], text: str) -> None:
    assert refused(every(), *names) == text


@pytest.mark.parametrize("other", [c.value for c in BACKGROUND_SNAPSHOT_INCOMPATIBLE])
def test_background_snapshot_incompatibilities(other: str) -> None:
    assert refused(every(), "background-snapshot", other) == (
        f"Background-snapshot is not compatible with {other}")


def test_background_snapshot_names_first_in_qemu_list_order() -> None:
    # QEMU walks its own list, not the enum: dirty-bitmaps (14th) before return-path (11th)
    assert refused(every(), "background-snapshot", "return-path", "dirty-bitmaps") == (
        "Background-snapshot is not compatible with dirty-bitmaps")


def test_context_dependent_checks() -> None:
    started = CapabilityContext(incoming_started=True)
    assert refused(every(), "multifd", ctx=started) == "Multifd must be set before incoming starts"
    assert refused(every(), "postcopy-ram", "postcopy-preempt", ctx=started) == (
        "Postcopy preempt must be set before incoming starts")
    zc = "Zero copy only available for non-compressed non-TLS multifd migration"
    assert refused(every(), "zero-copy-send", "multifd", ctx=CapabilityContext(tls=True)) == zc
    assert refused(every(), "zero-copy-send", "multifd",
                   ctx=CapabilityContext(multifd_compression="zlib")) == zc
    caps = every()
    caps.set_many([("zero-copy-send", True), ("multifd", True)])
    assert caps["zero-copy-send"]


def test_whole_set_is_rechecked() -> None:
    # QEMU checks the complete new set: once incoming started, any change fails while
    # multifd is on
    caps = every()
    caps.set_many([("multifd", True)])
    assert refused(caps, "events", ctx=CapabilityContext(incoming_started=True)) == (
        "Multifd must be set before incoming starts")


def test_dirty_limit_needs_no_kvm_dirty_ring_in_pyvm() -> None:
    # pyvm measures dirty pages itself (pyvm.dirty_meter): QEMU's KVM-only refusal is gone
    caps = MigrationCapabilities({"dirty-limit", "auto-converge"})
    caps.set_many([("dirty-limit", True)])
    assert caps["dirty-limit"]
    assert refused(caps, "auto-converge") == (
        "dirty-limit conflicts with auto-converge either of then available currently")


def test_accepted_combinations() -> None:
    caps = every()
    caps.set_many([("return-path", True), ("switchover-ack", True)])
    caps.set_many([("postcopy-ram", True), ("postcopy-preempt", True)])
    assert caps["switchover-ack"] and caps["postcopy-preempt"]


def test_qemu_checks_come_before_the_unimplemented_check() -> None:
    assert refused(MigrationCapabilities(), "dirty-limit", "auto-converge") == (
        "dirty-limit conflicts with auto-converge either of then available currently")
    assert refused(MigrationCapabilities({"x-ignore-shared"}), "x-ignore-shared", "postcopy-ram") == (
        "Postcopy is not compatible with ignore-shared")


def test_deprecation_warnings() -> None:
    caps = every()
    assert caps.set_many([("block", True)]) == [
        "block migration is deprecated; use blockdev-mirror with NBD instead"]
    assert caps.set_many([("compress", True)]) == [
        "block migration is deprecated; use blockdev-mirror with NBD instead",
        "old compression method is deprecated; use multifd compression methods instead"]
    assert caps.set_many([("block", False), ("compress", False)]) == []


@pytest.mark.parametrize("caps,text", [
    (("mapped-ram", "xbzrle"), "Mapped-ram migration is incompatible with xbzrle"),
    (("mapped-ram", "compress"), "Mapped-ram migration is incompatible with compression"),
    (("mapped-ram", "postcopy-ram"), "Mapped-ram migration is incompatible with postcopy"),
])
def test_mapped_ram_refusals_are_qemu_90s(caps, text) -> None:
    assert refused(every(), *caps) == text


def test_mapped_ram_goes_with_multifd() -> None:
    caps = every()
    caps.set_many([("mapped-ram", True), ("multifd", True)])
    assert caps["mapped-ram"] and caps["multifd"]
