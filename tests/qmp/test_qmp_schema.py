"""Schema-driven argument validation (QEMU's visitor texts) and introspection."""

from __future__ import annotations

from typing import Any

import pytest

from pyvm.qmp.errors import ArgumentError, SchemaError
from pyvm.qmp.introspect import schema_info
from pyvm.qmp.core import build_tables
from pyvm.qmp.registry import CommandTable
from pyvm.qmp.schema import Alternate, Array, Enum, Struct, Union
from pyvm.qmp.visitor import conform, validate
from pyvm.qmp.schema_core import SCHEMA_INFO

# A migration-shaped schema (QEMU qapi/migration.json) to exercise nesting and unions.
CAPABILITY = Enum("MigrationCapability", ["xbzrle", "events", "multifd"])
CAP_STATUS = Struct("MigrationCapabilityStatus", {"capability": CAPABILITY, "state": "bool"})
SET_CAPS = Struct("q_obj_migrate-set-capabilities-arg", {"capabilities": [CAP_STATUS]})
SOCKET_TYPE = Enum("SocketAddressType", ["inet", "unix", "vsock", "fd"])
INET = Struct("InetSocketAddress", {"host": "str", "port": "str", "*numeric": "bool",
                                    "*to": "uint16"})
SOCKET = Union("SocketAddress", {"type": SOCKET_TYPE}, "type", {
    "inet": INET, "unix": Struct("UnixSocketAddress", {"path": "str"})})
ADDR_TYPE = Enum("MigrationAddressType", ["socket", "exec", "rdma", "file"])
ADDRESS = Union("MigrationAddress", {"transport": ADDR_TYPE}, "transport", {
    "socket": SOCKET,
    "exec": Struct("MigrationExecCommand", {"args": ["str"]}),
    "file": Struct("FileMigrationArgs", {"filename": "str", "offset": "uint64"})})
CHANNEL = Struct("MigrationChannel", {"channel-type": Enum("MigrationChannelType", ["main"]),
                                      "addr": ADDRESS})
MIGRATE = Struct("q_obj_migrate-arg", {"*uri": "str", "*channels": [CHANNEL],
                                       "*detach": "bool"})
STR_OR_NULL = Alternate("StrOrNull", ["str", "null"])
PARAMS = Struct("MigrateSetParameters", {
    "*max-bandwidth": "size", "*downtime-limit": "uint64", "*multifd-channels": "uint8",
    "*compress-level": "uint8", "*x-checkpoint-delay": "uint32", "*tls-creds": STR_OR_NULL,
    "*cpu-throttle-tailslow": "bool", "*announce-step": "int8", "*number": "number",
    "*anything": "any"})


def err(t: Any, value: Any) -> str:
    with pytest.raises(ArgumentError) as info:
        validate(t, value)
    return info.value.desc


def test_missing_unexpected_and_types() -> None:
    assert err(Struct("x", {"uri": "str"}), {}) == "Parameter 'uri' is missing"
    assert err(Struct("x", {"uri": "str"}), {"uri": 1}) == \
        "Invalid parameter type for 'uri', expected: string"
    assert err(Struct("x", {"*uri": "str"}), {"foo": 1}) == "Parameter 'foo' is unexpected"
    assert err(Struct("x", {"uri": "str"}), {"foo": 1}) == "Parameter 'uri' is missing"
    assert err(Struct("x", {"n": "int"}), {"n": 1.5}) == \
        "Invalid parameter type for 'n', expected: integer"
    assert err(Struct("x", {"n": "int"}), {"n": True}) == \
        "Invalid parameter type for 'n', expected: integer"
    assert err(Struct("x", {"b": "bool"}), {"b": 0}) == \
        "Invalid parameter type for 'b', expected: boolean"
    assert err(Struct("x", {"n": "number"}), {"n": "1"}) == \
        "Invalid parameter type for 'n', expected: number"
    assert err(Struct("x", {"o": Struct("y")}), {"o": []}) == \
        "Invalid parameter type for 'o', expected: object"
    assert err(Struct("x", {"l": ["str"]}), {"l": {}}) == \
        "Invalid parameter type for 'l', expected: array"
    assert err(Struct("x", {"n": "null"}), {"n": 0}) == \
        "Invalid parameter type for 'n', expected: null"


def test_nested_full_paths() -> None:
    # Observed on QEMU 7.2 (paths as qapi/qobject-input-visitor.c full_name_nth builds them).
    assert err(SET_CAPS, {"capabilities": [{"capability": "xbzrle", "state": "yes"}]}) == \
        "Invalid parameter type for 'capabilities[0].state', expected: boolean"
    assert err(SET_CAPS, {"capabilities": [{"capability": "events", "state": True},
                                           {"capability": "xbzrle"}]}) == \
        "Parameter 'capabilities[1].state' is missing"
    assert err(SET_CAPS, {"capabilities": [{"capability": "events", "state": True,
                                            "foo": 1}]}) == \
        "Parameter 'capabilities[0].foo' is unexpected"
    assert err(SET_CAPS, {"capabilities": [{"capability": "nope", "state": True}]}) == \
        "Parameter 'capability' does not accept value 'nope'"
    assert err(SET_CAPS, {"capabilities": [5]}) == \
        "Invalid parameter type for 'capabilities[0]', expected: object"


def test_flat_unions_with_nested_unions() -> None:
    chan: dict[str, Any] = {"channel-type": "main", "addr": {
        "transport": "socket", "type": "inet", "host": "10.12.34.9"}}
    assert err(MIGRATE, {"channels": [chan]}) == "Parameter 'channels[0].addr.port' is missing"
    chan["addr"]["port"] = 1050
    assert err(MIGRATE, {"channels": [chan]}) == \
        "Invalid parameter type for 'channels[0].addr.port', expected: string"
    chan["addr"]["port"] = "1050"
    ok = validate(MIGRATE, {"channels": [chan]})
    assert ok["channels"][0]["addr"]["port"] == "1050"
    chan["addr"]["path"] = "/x"
    assert err(MIGRATE, {"channels": [chan]}) == \
        "Parameter 'channels[0].addr.path' is unexpected"
    bad = {"channel-type": "main", "addr": {"transport": "carrier-pigeon"}}
    assert err(MIGRATE, {"channels": [bad]}) == \
        "Parameter 'transport' does not accept value 'carrier-pigeon'"
    missing = {"channel-type": "main", "addr": {"type": "inet"}}
    assert err(MIGRATE, {"channels": [missing]}) == \
        "Parameter 'channels[0].addr.transport' is missing"
    file_chan = {"channel-type": "main", "addr": {"transport": "file", "filename": "/f",
                                                 "offset": "0x1000"}}
    assert err(MIGRATE, {"channels": [file_chan]}) == \
        "Parameter 'channels[0].addr.offset' expects uint64"
    rdma = validate(MIGRATE, {"channels": [{"channel-type": "main",
                                            "addr": {"transport": "rdma"}}]})
    assert rdma["channels"][0]["addr"] == {"transport": "rdma"}


def test_unsigned_semantics() -> None:
    assert validate(PARAMS, {"max-bandwidth": -5}) == {"max-bandwidth": 18446744073709551611}
    assert validate(PARAMS, {"downtime-limit": 18446744073709551615}) == \
        {"downtime-limit": 18446744073709551615}
    assert err(PARAMS, {"downtime-limit": "10"}) == "Parameter 'downtime-limit' expects uint64"
    assert err(PARAMS, {"downtime-limit": 10.5}) == "Parameter 'downtime-limit' expects uint64"
    assert err(PARAMS, {"max-bandwidth": 1e30}) == "Parameter 'max-bandwidth' expects uint64"
    assert err(PARAMS, {"multifd-channels": 256}) == "Parameter 'multifd-channels' expects uint8_t"
    assert err(PARAMS, {"multifd-channels": -1}) == "Parameter 'multifd-channels' expects uint8_t"
    assert validate(PARAMS, {"multifd-channels": 255}) == {"multifd-channels": 255}
    assert err(PARAMS, {"x-checkpoint-delay": 1 << 32}) == \
        "Parameter 'x-checkpoint-delay' expects uint32_t"
    assert err(PARAMS, {"announce-step": 128}) == "Parameter 'announce-step' expects int8_t"
    assert err(PARAMS, {"announce-step": "1"}) == \
        "Invalid parameter type for 'announce-step', expected: integer"
    assert validate(PARAMS, {"number": 3}) == {"number": 3.0}
    assert validate(PARAMS, {"anything": [1, {"a": None}]}) == {"anything": [1, {"a": None}]}


def test_narrow_names_are_bare_and_list_items_null() -> None:
    nested = Struct("x", {"l": [Struct("y", {"v": "uint8"})], "e": [CAPABILITY],
                          "u": ["uint16"]})
    assert err(nested, {"l": [{"v": 300}], "e": [], "u": []}) == "Parameter 'v' expects uint8_t"
    assert err(nested, {"l": [], "e": ["foo"], "u": []}) == \
        "Parameter 'null' does not accept value 'foo'"
    assert err(nested, {"l": [], "e": [], "u": [70000]}) == "Parameter 'null' expects uint16_t"
    assert err(nested, {"l": [], "e": [], "u": ["a"]}) == "Parameter 'u[0]' expects uint64"


def test_alternate_str_or_null() -> None:
    assert validate(PARAMS, {"tls-creds": None}) == {"tls-creds": None}
    assert validate(PARAMS, {"tls-creds": "x"}) == {"tls-creds": "x"}
    assert err(PARAMS, {"tls-creds": 5}) == \
        "Invalid parameter type for 'tls-creds', expected: StrOrNull"


def test_schema_declaration_errors() -> None:
    with pytest.raises(SchemaError):
        Union("U", {"kind": "str"}, "kind", {})
    with pytest.raises(SchemaError):
        Union("U", {"kind": ADDR_TYPE}, "kind", {"nope": Struct("s")})
    with pytest.raises(SchemaError):
        Struct("S", {"a": "str", "*a": "int"})
    table = CommandTable()
    table.register("x", None, None, lambda c, a: None)
    with pytest.raises(SchemaError):
        table.register("x", None, None, lambda c, a: None)


def test_conform_orders_members_by_schema() -> None:
    out = conform(STRUCT := Struct("S", {"a": "int", "b": "int", "c": "int"}),
                  {"c": 3, "x": 0, "a": 1})
    assert list(out) == ["a", "c", "x"] and STRUCT.name == "S"


def test_introspection_masks_names_and_covers_types() -> None:
    table = build_tables().qmp
    table.register("migrate", MIGRATE, None, lambda c, a: None)
    table.register("migrate-set-parameters", PARAMS, None, lambda c, a: None)
    info = schema_info(table)
    validate(Array(SCHEMA_INFO), info)                    # the result matches SchemaInfo
    by_name = {e["name"]: e for e in info}
    assert len(by_name) == len(info)                      # names are unique
    mig = by_name["migrate"]
    args = by_name[mig["arg-type"]]
    assert args["meta-type"] == "object" and mig["arg-type"].isdigit()
    members = {m["name"]: m for m in args["members"]}
    assert members["uri"] == {"name": "uri", "type": "str", "default": None}
    chan = by_name[by_name[members["channels"]["type"]]["element-type"]]
    addr = by_name[{m["name"]: m for m in chan["members"]}["addr"]["type"]]
    assert addr["tag"] == "transport"
    assert {v["case"] for v in addr["variants"]} == {"socket", "exec", "file"}
    params = {m["name"]: m["type"] for m in by_name[by_name["migrate-set-parameters"]
                                                    ["arg-type"]]["members"]}
    assert params["max-bandwidth"] == params["multifd-channels"] == "int"
    assert by_name[params["tls-creds"]]["meta-type"] == "alternate"
    assert by_name["int"] == {"name": "int", "meta-type": "builtin", "json-type": "int"}
    status = by_name[by_name["query-status"]["ret-type"]]
    run_state = by_name[{m["name"]: m for m in status["members"]}["status"]["type"]]
    assert "prelaunch" in run_state["values"] and \
        {"name": "running"} in run_state["members"]
    assert by_name["STOP"]["meta-type"] == "event"
    shutdown = by_name[by_name["SHUTDOWN"]["arg-type"]]
    assert [m["name"] for m in shutdown["members"]] == ["guest", "reason"]
