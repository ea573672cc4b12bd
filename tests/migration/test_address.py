"""Migration addresses: URI and channel parsing with QEMU 8.2's texts, display, query shape."""

from __future__ import annotations

from typing import Any

import pytest

from pyvm.migration.control.address import (AddressError, ExecMigrationAddress,
                                            FdSocketAddress, FileMigrationAddress,
                                            InetSocketAddress, MigrationAddress,
                                            RdmaMigrationAddress, SocketMigrationAddress,
                                            UnixSocketAddress, VsockSocketAddress,
                                            address_from_qapi, parse_offset, parse_uri,
                                            resolve_address)
from pyvm.migration.errors import MigrationError
from pyvm.migration.control.qmp_schema import (MIGRATE_ARGS, MIGRATE_INCOMING_ARGS,
                                             MIGRATION_ADDRESS, MIGRATION_COMMANDS,
                                             MIGRATION_EVENTS)
from pyvm.qmp.errors import ArgumentError
from pyvm.qmp.introspect import cached_schema_info
from pyvm.qmp.registry import CommandTable
from pyvm.qmp.visitor import validate


def inet(host: str, port: str, **kw: Any) -> SocketMigrationAddress:
    return SocketMigrationAddress(InetSocketAddress(host, port, **kw))


@pytest.mark.parametrize("uri, expected", [
    ("tcp:127.0.0.1:4446", inet("127.0.0.1", "4446")),
    ("tcp:0:4446", inet("0", "4446")),
    ("tcp:[::1]:4446", inet("::1", "4446")),
    ("tcp::4446", inet("", "4446")),
    ("tcp:localhost:0", inet("localhost", "0")),
    ("tcp:h:1,to=9,ipv4,ipv6=off,keep-alive=on,mptcp",
     inet("h", "1", to=9, ipv4=True, ipv6=False, keep_alive=True, mptcp=True)),
    ("unix:/tmp/mig.sock", SocketMigrationAddress(UnixSocketAddress("/tmp/mig.sock"))),
    ("vsock:3:1234", SocketMigrationAddress(VsockSocketAddress("3", "1234"))),
    ("fd:7", SocketMigrationAddress(FdSocketAddress("7"))),
    ("fd:migfd", SocketMigrationAddress(FdSocketAddress("migfd"))),
    ("exec:cat > /tmp/state", ExecMigrationAddress(("/bin/sh", "-c", "cat > /tmp/state"))),
    ("exec:", ExecMigrationAddress(("/bin/sh", "-c", ""))),
    ("rdma:192.168.1.2:4446", RdmaMigrationAddress(InetSocketAddress("192.168.1.2", "4446"))),
    ("file:/tmp/vm.state", FileMigrationAddress("/tmp/vm.state", 0)),
    ("file:/tmp/vm.state,offset=4096", FileMigrationAddress("/tmp/vm.state", 4096)),
    ("file:/tmp/vm.state,offset=0x1000", FileMigrationAddress("/tmp/vm.state", 0x1000)),
    ("file:/tmp/vm.state,offset=4K", FileMigrationAddress("/tmp/vm.state", 4096)),
    ("file:/tmp/vm.state,offset=1M", FileMigrationAddress("/tmp/vm.state", 1 << 20)),
    ("file:/tmp/a,b,offset=2", FileMigrationAddress("/tmp/a,b", 2)),
])
def test_parse_uri(uri: str, expected: MigrationAddress) -> None:
    assert parse_uri(uri) == expected


@pytest.mark.parametrize("uri, text", [
    ("foo:bar", "unknown migration protocol: foo:bar"),
    ("", "unknown migration protocol: "),
    ("TCP:1.2.3.4:5", "unknown migration protocol: TCP:1.2.3.4:5"),
    ("tcp:127.0.0.1", "error parsing address '127.0.0.1'"),             # observed on 7.2
    ("tcp:", "error parsing address ''"),
    ("tcp:h:", "error parsing address 'h:'"),
    ("tcp:" + "h" * 65 + ":1", f"error parsing address '{'h' * 65}:1'"),
    ("tcp:[::1]", "error parsing IPv6 address '[::1]'"),
    ("tcp:[]:1", "error parsing IPv6 address '[]:1'"),
    ("tcp::", "error parsing port in address ':'"),
    ("tcp:h:1,to=x", "error parsing to= argument"),
    ("tcp:h:1,to=5x", "error parsing to= argument"),
    ("tcp:h:1,ipv4=yes", "error parsing 'ipv4' flag '=yes'"),
    ("tcp:h:1,ipv6=on,,x", "error parsing 'ipv6' flag '=on,,x'"),
    ("unix:", "invalid Unix socket address"),
    ("fd:", "invalid file descriptor address"),
    ("vsock:3", "error parsing address '3'"),
    ("vsock:3:4,x", "trailing characters in address '3:4,x'"),
    ("rdma:host", "error parsing address 'host'"),
    ("file:/tmp/x,offset=0x20M", "file URI has bad offset 0x20M: Invalid argument"),
    ("file:/tmp/x,offset=abc", "file URI has bad offset abc: Invalid argument"),
    ("file:/tmp/x,offset=", "file URI has bad offset : Invalid argument"),
    ("file:/tmp/x,offset=-1", "file URI has bad offset -1: Numerical result out of range"),
    ("file:/tmp/x,offset=16E", "file URI has bad offset 16E: Numerical result out of range"),
    ("file:/tmp/x,offset=1.5", "file URI has bad offset 1.5: Invalid argument"),
])
def test_parse_uri_errors(uri: str, text: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_uri(uri)
    assert str(info.value) == text
    assert isinstance(info.value, MigrationError)


@pytest.mark.parametrize("text, value", [
    ("0", 0), ("4096", 4096), ("+7", 7), (" 5", 5), ("0x1000", 4096), ("0X10", 16),
    ("1B", 1), ("1k", 1024), ("4K", 4096), ("2M", 2 << 20), ("1G", 1 << 30), ("1T", 1 << 40),
    ("1P", 1 << 50), ("1E", 1 << 60), ("1.5K", 1536), (".5K", 512), ("1.", 1), ("1.k", 1024),
    ("0.0001K", 0), ("0.0005K", 1), ("15.5E", 31 << 59), ("18446744073709551615", (1 << 64) - 1),
])
def test_parse_offset(text: str, value: int) -> None:
    assert parse_offset(text) == value


@pytest.mark.parametrize("text, strerror", [
    ("", "Invalid argument"), ("x", "Invalid argument"), ("0x", "Invalid argument"),
    ("0x1K", "Invalid argument"), ("0x1.5", "Invalid argument"), ("1.5", "Invalid argument"),
    ("1.5B", "Invalid argument"), ("4KB", "Invalid argument"), ("1e3", "Invalid argument"),
    ("-5K", "Invalid argument"), ("-5", "Numerical result out of range"),
    ("-.5", "Numerical result out of range"), ("16E", "Numerical result out of range"),
    ("18446744073709551616", "Numerical result out of range"),
    ("0x10000000000000000", "Numerical result out of range"),
])
def test_parse_offset_errors(text: str, strerror: str) -> None:
    with pytest.raises(OSError) as info:
        parse_offset(text)
    assert info.value.strerror == strerror


# -- uri / channels selection -------------------------------------------------------------------

SOCKET_CHANNEL = {"channel-type": "main", "addr": {
    "transport": "socket", "type": "inet", "host": "10.12.34.9", "port": "1050"}}


@pytest.mark.parametrize("command", ["migrate", "migrate-incoming"])
def test_uri_and_channels_exclusive(command: str) -> None:
    text = ("'uri' and 'channels' arguments are mutually exclusive; exactly one of the two "
            f"should be present in '{command}' qmp command ")
    given: list[list[dict[str, Any]]] = [[SOCKET_CHANNEL], []]
    for channels in given:
        with pytest.raises(AddressError) as info:
            resolve_address("tcp:1.2.3.4:5", channels, command)
        assert str(info.value) == text
    neither = f"neither 'uri' or 'channels' argument are specified in '{command}' qmp command "
    absent: list[list[dict[str, Any]] | None] = [None, []]
    for maybe in absent:
        with pytest.raises(AddressError) as info:
            resolve_address(None, maybe, command)
        assert str(info.value) == neither


def test_more_than_one_channel() -> None:
    with pytest.raises(AddressError, match=r"^Channel list has more than one entries$"):
        resolve_address(None, [SOCKET_CHANNEL, SOCKET_CHANNEL])


def test_uri_and_channel_forms_agree() -> None:
    assert resolve_address(None, [SOCKET_CHANNEL]) == parse_uri("tcp:10.12.34.9:1050")
    assert resolve_address("unix:/tmp/s", None, "migrate-incoming") == parse_uri("unix:/tmp/s")
    # "" is a URI (an unknown protocol), not an absent argument
    with pytest.raises(AddressError, match="unknown migration protocol: $"):
        resolve_address("", None)


@pytest.mark.parametrize("addr, expected", [
    ({"transport": "socket", "type": "unix", "path": "/tmp/s"},
     SocketMigrationAddress(UnixSocketAddress("/tmp/s"))),
    ({"transport": "socket", "type": "fd", "str": "4"},
     SocketMigrationAddress(FdSocketAddress("4"))),
    ({"transport": "socket", "type": "vsock", "cid": "3", "port": "9"},
     SocketMigrationAddress(VsockSocketAddress("3", "9"))),
    ({"transport": "socket", "type": "inet", "host": "::1", "port": "0", "ipv6": True},
     inet("::1", "0", ipv6=True)),
    ({"transport": "exec", "args": ["/usr/bin/gzip", "-c"]},
     ExecMigrationAddress(("/usr/bin/gzip", "-c"))),
    ({"transport": "rdma", "host": "10.0.0.1", "port": "4446"},
     RdmaMigrationAddress(InetSocketAddress("10.0.0.1", "4446"))),
    ({"transport": "file", "filename": "/tmp/vm.state", "offset": 4096},
     FileMigrationAddress("/tmp/vm.state", 4096)),
])
def test_channel_addresses(addr: dict[str, Any], expected: MigrationAddress) -> None:
    args = validate(MIGRATE_ARGS, {"channels": [{"channel-type": "main", "addr": addr}]})
    assert resolve_address(args.get("uri"), args["channels"]) == expected
    assert expected.to_qapi() == addr
    assert address_from_qapi(validate(MIGRATION_ADDRESS, expected.to_qapi())) == expected


def test_channel_schema_texts() -> None:
    def fails(addr: dict[str, Any]) -> str:
        with pytest.raises(ArgumentError) as info:
            validate(MIGRATE_ARGS, {"channels": [{"channel-type": "main", "addr": addr}]})
        return str(info.value)
    assert fails({"transport": "file", "filename": "x", "offset": "0x1000"}) == (
        "Parameter 'channels[0].addr.offset' expects uint64")
    assert fails({"transport": "socket", "type": "inet", "host": "h", "port": 1050}) == (
        "Invalid parameter type for 'channels[0].addr.port', expected: string")
    assert fails({"transport": "socket", "type": "inet", "host": "h"}) == (
        "Parameter 'channels[0].addr.port' is missing")
    assert fails({"transport": "pipe"}) == "Parameter 'transport' does not accept value 'pipe'"
    with pytest.raises(ArgumentError, match="'channel-type' does not accept value 'cpr'"):
        validate(MIGRATE_ARGS, {"channels": [{"channel-type": "cpr", "addr": {}}]})


def test_migrate_incoming_accepts_exit_on_error() -> None:
    args = validate(MIGRATE_INCOMING_ARGS, {"uri": "defer", "exit-on-error": False})
    assert args == {"uri": "defer", "exit-on-error": False}
    with pytest.raises(ArgumentError, match="'resume' is unexpected"):
        validate(MIGRATE_INCOMING_ARGS, {"uri": "tcp::1", "resume": True})


def test_commands_register_and_introspect() -> None:
    table = CommandTable()
    for spec in MIGRATION_COMMANDS:
        table.register(spec.name, spec.args, spec.returns, lambda ctx, args: None)
    for ev in MIGRATION_EVENTS:
        table.register_event(ev.name, ev.data)
    info = cached_schema_info(table)
    names = [e["name"] for e in info if e["meta-type"] in ("command", "event")]
    assert names == ["migrate", "migrate-incoming", "migrate_cancel", "migrate-continue",
                     "migrate-set-capabilities", "query-migrate-capabilities",
                     "migrate-set-parameters", "query-migrate-parameters", "query-migrate",
                     "migrate-start-postcopy", "migrate-recover", "migrate-pause",
                     "MIGRATION", "MIGRATION_PASS"]
    tags = {e.get("tag") for e in info if e["meta-type"] == "object"}
    assert {"transport", "type"} <= tags
