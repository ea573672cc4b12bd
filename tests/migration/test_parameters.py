"""Migration parameters: QEMU 8.2's members, defaults, types and migrate_params_check texts."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pyvm.migration.errors import MigrationError
from pyvm.migration.control.parameters import (PARAMETER_SPECS, MigMode, MigrationParameters,
                                       ParameterError)
from pyvm.migration.control.qmp_schema import (MIGRATE_SET_PARAMETERS, MIGRATION_PARAMETERS,
                                             MIG_MODE)
from pyvm.qmp.visitor import validate

# QEMU 7.2's default query-migrate-parameters result, verbatim (defaults: migration/options.c).
QEMU_72_DEFAULTS = json.loads(
    '{"cpu-throttle-tailslow": false, "xbzrle-cache-size": 67108864, "cpu-throttle-initial": 20,'
    ' "announce-max": 550, "decompress-threads": 2, "compress-threads": 8, "compress-level": 1,'
    ' "multifd-channels": 2, "multifd-zstd-level": 1, "announce-initial": 50,'
    ' "block-incremental": false, "compress-wait-thread": true, "downtime-limit": 300,'
    ' "tls-authz": "", "multifd-compression": "none", "announce-rounds": 5, "announce-step": 100,'
    ' "tls-creds": "", "multifd-zlib-level": 1, "max-cpu-throttle": 99,'
    ' "max-postcopy-bandwidth": 0, "tls-hostname": "", "throttle-trigger-threshold": 50,'
    ' "max-bandwidth": 134217728, "x-checkpoint-delay": 20000, "cpu-throttle-increment": 10}')
QEMU_82_ADDITIONS = {"avail-switchover-bandwidth": 0, "x-vcpu-dirty-limit-period": 1000,
                     "vcpu-dirty-limit": 1, "mode": "normal"}
QEMU_91_ADDITIONS = {"direct-io": False}


def refused(params: MigrationParameters, changes: dict[str, Any], **kw: Any) -> str:
    before = params.query()
    with pytest.raises(ParameterError) as info:
        params.apply(changes, **kw)
    assert params.query() == before, "a refused request must change nothing"
    assert isinstance(info.value, MigrationError)
    return str(info.value)


def test_defaults_equal_qemu() -> None:
    assert len(QEMU_72_DEFAULTS) == 26
    assert MigrationParameters().query() == {**QEMU_72_DEFAULTS, **QEMU_82_ADDITIONS,
                                             **QEMU_91_ADDITIONS}


def test_query_follows_schema_member_order() -> None:
    names = [m.name for m in MIGRATION_PARAMETERS.members
             if m.name not in ("block-bitmap-mapping", "x-policy")]   # shown once set
    assert list(MigrationParameters().query()) == names


def test_set_and_query() -> None:
    p = MigrationParameters()
    assert p.apply({"downtime-limit": 500, "max-bandwidth": 1 << 30, "mode": "cpr-reboot"}) == [
        "max-bandwidth", "downtime-limit", "mode"]
    q = p.query()
    assert (q["downtime-limit"], q["max-bandwidth"], q["mode"]) == (500, 1 << 30, "cpr-reboot")
    assert p.mode is MigMode.CPR_REBOOT and p.downtime_limit == 500 and p.max_bandwidth == 1 << 30
    assert p.apply({}) == []


def test_migmode_enum() -> None:
    assert [m.value for m in MigMode] == ["normal", "cpr-reboot"]
    assert list(MIG_MODE.values) == ["normal", "cpr-reboot"]
    assert refused(MigrationParameters(), {"mode": "cpr-transfer"}) == (
        "Parameter 'mode' does not accept value 'cpr-transfer'")


def test_negative_sizes_wrap() -> None:
    p = MigrationParameters()
    p.apply({"max-bandwidth": -5})
    assert p.query()["max-bandwidth"] == 18446744073709551611


def test_tls_null_resets_to_empty_string() -> None:
    p = MigrationParameters()
    p.apply({"tls-creds": "tls0", "tls-hostname": "peer", "tls-authz": "authz0"})
    assert (p["tls-creds"], p["tls-hostname"], p["tls-authz"]) == ("tls0", "peer", "authz0")
    p.apply({"tls-creds": None, "tls-hostname": None, "tls-authz": None})
    assert (p["tls-creds"], p["tls-hostname"], p["tls-authz"]) == ("", "", "")


@pytest.mark.parametrize("changes, text", [
    # observed on QEMU 7.2
    ({"downtime-limit": -1},
     "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms"),
    ({"downtime-limit": 2000001},
     "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms"),
    ({"xbzrle-cache-size": 4097},
     "Parameter 'xbzrle_cache_size' expects a power of two no less than the target page size"),
    ({"xbzrle-cache-size": 2048},
     "Parameter 'xbzrle_cache_size' expects a power of two no less than the target page size"),
    ({"multifd-channels": 0}, "Parameter 'multifd_channels' expects a value between 1 and 255"),
    ({"compress-level": 10}, "Parameter 'compress_level' expects a value between 0 and 9"),
    # from the 8.2 source
    ({"compress-threads": 0}, "Parameter 'compress_threads' expects a value between 1 and 255"),
    ({"decompress-threads": 0},
     "Parameter 'decompress_threads' expects a value between 1 and 255"),
    ({"throttle-trigger-threshold": 0},
     "Parameter 'throttle_trigger_threshold' expects an integer in the range of 1 to 100"),
    ({"throttle-trigger-threshold": 101},
     "Parameter 'throttle_trigger_threshold' expects an integer in the range of 1 to 100"),
    ({"cpu-throttle-initial": 0},
     "Parameter 'cpu_throttle_initial' expects an integer in the range of 1 to 99"),
    ({"cpu-throttle-initial": 100},
     "Parameter 'cpu_throttle_initial' expects an integer in the range of 1 to 99"),
    ({"cpu-throttle-increment": 100},
     "Parameter 'cpu_throttle_increment' expects an integer in the range of 1 to 99"),
    ({"multifd-zlib-level": 10}, "Parameter 'multifd_zlib_level' expects a value between 0 and 9"),
    ({"multifd-zstd-level": 21},
     "Parameter 'multifd_zstd_level' expects a value between 0 and 20"),
    ({"max-cpu-throttle": 100},
     "Parameter 'max_cpu_throttle' expects an integer in the range of cpu_throttle_initial to 99"),
    ({"max-cpu-throttle": 19},
     "Parameter 'max_cpu_throttle' expects an integer in the range of cpu_throttle_initial to 99"),
    ({"announce-initial": 100001},
     "Parameter 'announce_initial' expects a value between 0 and 100000"),
    ({"announce-max": 100001}, "Parameter 'announce_max' expects a value between 0 and 100000"),
    ({"announce-rounds": 1001}, "Parameter 'announce_rounds' expects a value between 0 and 1000"),
    ({"announce-step": 0}, "Parameter 'announce_step' expects a value between 0 and 10000"),
    ({"announce-step": 10001}, "Parameter 'announce_step' expects a value between 0 and 10000"),
    ({"x-vcpu-dirty-limit-period": 0},
     "Parameter 'x-vcpu-dirty-limit-period' expects a value between 1 and 1000"),
    ({"x-vcpu-dirty-limit-period": 1001},
     "Parameter 'x-vcpu-dirty-limit-period' expects a value between 1 and 1000"),
    ({"vcpu-dirty-limit": 0},
     "Parameter 'vcpu_dirty_limit' expects is invalid, it must greater then 1 MB/s"),
])
def test_range_check_texts(changes: dict[str, Any], text: str) -> None:
    assert refused(MigrationParameters(), changes) == text


@pytest.mark.parametrize("changes", [
    {"downtime-limit": 0}, {"downtime-limit": 2000000}, {"xbzrle-cache-size": 4096},
    {"xbzrle-cache-size": 1 << 40}, {"multifd-channels": 255}, {"compress-level": 0},
    {"compress-level": 9}, {"throttle-trigger-threshold": 1},
    {"throttle-trigger-threshold": 100}, {"cpu-throttle-increment": 1},
    {"cpu-throttle-initial": 99, "max-cpu-throttle": 99}, {"max-cpu-throttle": 20},
    {"announce-initial": 100000}, {"announce-rounds": 0}, {"announce-step": 1},
    {"announce-step": 10000}, {"x-vcpu-dirty-limit-period": 1},
    {"x-vcpu-dirty-limit-period": 1000}, {"vcpu-dirty-limit": 1}, {"multifd-zstd-level": 20},
    {"max-bandwidth": 0}, {"avail-switchover-bandwidth": (1 << 64) - 1},
    {"x-checkpoint-delay": (1 << 32) - 1}, {"block-incremental": True},
    {"multifd-compression": "zstd"}, {"cpu-throttle-tailslow": True},
])
def test_boundaries_accepted(changes: dict[str, Any]) -> None:
    p = MigrationParameters()
    p.apply(changes)
    for name, value in changes.items():
        assert p[name] == value


def test_checks_use_the_merged_values() -> None:
    p = MigrationParameters()
    p.apply({"max-cpu-throttle": 30})
    # raising the initial throttle above the current maximum fails on the maximum's check
    assert refused(p, {"cpu-throttle-initial": 40}) == ("Parameter 'max_cpu_throttle' expects "
                                                       "an integer in the range of "
                                                       "cpu_throttle_initial to 99")
    p.apply({"cpu-throttle-initial": 40, "max-cpu-throttle": 50})
    assert (p["cpu-throttle-initial"], p["max-cpu-throttle"]) == (40, 50)


def test_first_failing_check_in_qemu_order_wins() -> None:
    assert refused(MigrationParameters(), {"vcpu-dirty-limit": 0, "compress-level": 10}) == (
        "Parameter 'compress_level' expects a value between 0 and 9")


def test_all_or_nothing() -> None:
    p = MigrationParameters()
    refused(p, {"downtime-limit": 100, "multifd-channels": 0})
    assert p["downtime-limit"] == 300


@pytest.mark.parametrize("changes, text", [
    ({"downtime-limit": "10"}, "Parameter 'downtime-limit' expects uint64"),
    ({"max-bandwidth": 1.5}, "Parameter 'max-bandwidth' expects uint64"),
    ({"max-bandwidth": True}, "Parameter 'max-bandwidth' expects uint64"),
    ({"compress-level": 300}, "Parameter 'compress-level' expects uint8_t"),
    ({"compress-level": -1}, "Parameter 'compress-level' expects uint8_t"),
    ({"x-checkpoint-delay": 1 << 32}, "Parameter 'x-checkpoint-delay' expects uint32_t"),
    ({"block-incremental": 1},
     "Invalid parameter type for 'block-incremental', expected: boolean"),
    ({"tls-creds": 5}, "Invalid parameter type for 'tls-creds', expected: StrOrNull"),
    ({"multifd-compression": "lz4"},
     "Parameter 'multifd-compression' does not accept value 'lz4'"),
    ({"mode": 1}, "Invalid parameter type for 'mode', expected: string"),
    ({"no-such-param": 1}, "Parameter 'no-such-param' is unexpected"),
])
def test_type_texts(changes: dict[str, Any], text: str) -> None:
    assert refused(MigrationParameters(), changes) == text


def test_type_errors_come_before_range_checks() -> None:
    assert refused(MigrationParameters(), {"compress-level": 10, "downtime-limit": "x"}) == (
        "Parameter 'downtime-limit' expects uint64")


def test_zero_copy_send_check() -> None:
    text = "Zero copy only available for non-compressed non-TLS multifd migration"
    assert refused(MigrationParameters(), {"tls-creds": "tls0"}, zero_copy_send=True) == text
    assert refused(MigrationParameters(), {"multifd-compression": "zlib"},
                   zero_copy_send=True) == text
    MigrationParameters().apply({"tls-creds": "tls0"})          # fine without the capability


# -- block-bitmap-mapping -----------------------------------------------------------------------

def mapping(*nodes: tuple[str, str, list[tuple[str, str]]]) -> list[dict[str, Any]]:
    return [{"node-name": n, "alias": a, "bitmaps": [{"name": b, "alias": ba} for b, ba in bm]}
            for n, a, bm in nodes]


def test_bitmap_mapping_only_shown_once_set() -> None:
    p = MigrationParameters()
    assert "block-bitmap-mapping" not in p.query()
    value = mapping(("drive0", "node0", [("bitmap0", "bmap0")]))
    value[0]["bitmaps"][0]["transform"] = {"persistent": True}
    p.apply({"block-bitmap-mapping": value})
    assert p.query()["block-bitmap-mapping"] == value
    value[0]["alias"] = "changed"                              # the store keeps its own copy
    assert p.query()["block-bitmap-mapping"][0]["alias"] == "node0"
    p.apply({"block-bitmap-mapping": []})
    assert p.query()["block-bitmap-mapping"] == []


PREFIX = "Invalid mapping given for block-bitmap-mapping: "


@pytest.mark.parametrize("value, text", [
    (mapping(("drive0", "0node", [])), "The node alias '0node' is not well-formed"),
    (mapping(("drive0", "no de", [])), "The node alias 'no de' is not well-formed"),
    (mapping(("drive0", "a" * 256, [])), f"The node alias '{'a' * 256}' is longer than 255 bytes"),
    (mapping(("d" * 32, "node0", [])), f"The node name '{'d' * 32}' is longer than 31 bytes"),
    (mapping(("drive0", "node0", []), ("drive0", "node1", [])),
     "The node name 'drive0' is mapped twice"),
    (mapping(("drive0", "node0", []), ("drive1", "node0", [])),
     "The node alias 'node0' is used twice"),
    (mapping(("drive0", "node0", [("b", "x" * 256)])),
     f"The bitmap alias '{'x' * 256}' is longer than 255 bytes"),
    (mapping(("drive0", "node0", [("b" * 1024, "x")])),
     f"The bitmap name '{'b' * 1024}' is longer than 1023 bytes"),
    (mapping(("drive0", "node0", [("b", "x"), ("b", "y")])),
     "The bitmap 'drive0'/'b' is mapped twice"),
    (mapping(("drive0", "node0", [("b", "x"), ("c", "x")])),
     "The bitmap alias 'node0'/'x' is used twice"),
])
def test_bitmap_mapping_texts(value: list[dict[str, Any]], text: str) -> None:
    assert refused(MigrationParameters(), {"block-bitmap-mapping": value}) == PREFIX + text


@pytest.mark.parametrize("value, text", [
    ({}, "Invalid parameter type for 'block-bitmap-mapping', expected: array"),
    ([{"node-name": "a", "alias": "b"}], "Parameter 'block-bitmap-mapping[0].bitmaps' is missing"),
    ([{"node-name": "a", "alias": "b", "bitmaps": [], "x": 1}],
     "Parameter 'block-bitmap-mapping[0].x' is unexpected"),
    ([{"node-name": "a", "alias": "b", "bitmaps": [{"name": "c", "alias": 1}]}],
     "Invalid parameter type for 'block-bitmap-mapping[0].bitmaps[0].alias', expected: string"),
])
def test_bitmap_mapping_type_texts(value: Any, text: str) -> None:
    assert refused(MigrationParameters(), {"block-bitmap-mapping": value}) == text


# -- the QMP schema agrees with the store --------------------------------------------------------

def test_schema_members_match_the_specs() -> None:
    names = [spec.name for spec in PARAMETER_SPECS]
    assert [m.name for m in MIGRATE_SET_PARAMETERS.members] == names
    assert [m.name for m in MIGRATION_PARAMETERS.members] == names
    assert all(m.optional for m in MIGRATE_SET_PARAMETERS.members)


def test_schema_validated_arguments_apply() -> None:
    args = validate(MIGRATE_SET_PARAMETERS, {"max-bandwidth": -5, "tls-creds": None,
                                              "mode": "cpr-reboot", "downtime-limit": 10})
    p = MigrationParameters()
    p.apply(args)
    assert p["max-bandwidth"] == (1 << 64) - 5
    assert p["tls-creds"] == "" and p["mode"] == "cpr-reboot"
